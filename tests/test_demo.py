"""The demo model: its synthetic domain, its recipe's pieces, and — on the shipped weights — that
``easyref generate --model demo`` works offline and takes the colour from the references."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from easyref_cli.cli import app
from easyref_cli.demo import base, build, evidence, synthetic, weights_dir
from easyref_cli.errors import UsageError


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------- the synthetic domain


def test_groups_are_seeded_and_share_colour_and_shape():
    a = synthetic.make_group(5, 6)
    b = synthetic.make_group(5, 6)
    assert [d.render().tobytes() for d in a] == [d.render().tobytes() for d in b]
    assert len({d.colour for d in a}) == 1 and len({d.shape for d in a}) == 1
    # …and vary in everything else
    assert len({d.centre for d in a}) > 1 and len({d.background for d in a}) > 1
    assert synthetic.make_group(6, 6)[0] != a[0]


def test_the_mask_is_the_drawn_shape_and_the_background_tint_says_where_a_pixel_is():
    import numpy as np

    for drawing in synthetic.make_group(9, 8):
        mask = np.asarray(drawing.mask()) > 0
        assert (mask == synthetic.saturated(drawing.render())).all()
    plain = np.asarray(synthetic.background(120), dtype=int)
    assert (plain[:, :, 1] == 120).all() and plain.std(axis=(0, 1))[1] == 0  # green is the grey
    assert (plain[0, -1, 0] - plain[0, 0, 0]) == 2 * synthetic.TINT  # red rises from left to right…
    assert (plain[-1, 0, 2] - plain[0, 0, 2]) == 2 * synthetic.TINT  # …blue from top to bottom
    assert not synthetic.saturated(synthetic.background(90)).any()  # too faint to count as a colour


def test_dominant_colour_reads_every_drawing_and_nothing_from_grey():
    stream = synthetic.iter_drawings(123)
    drawings = [next(stream) for _ in range(300)]
    assert all(synthetic.dominant_colour(d.render()) == d.colour for d in drawings)
    assert {d.colour for d in drawings} == set(synthetic.COLOURS)
    assert synthetic.dominant_colour(Image.new("RGB", (64, 64), (128, 128, 128))) is None
    assert synthetic.hue_agreement([drawings[0].render()], [drawings[0].colour]) == 1.0
    with pytest.raises(ValueError):
        synthetic.hue_agreement([], [])


def test_the_shape_classifier_reads_every_drawing_and_nothing_from_grey():
    stream = synthetic.iter_drawings(31)
    drawings = [next(stream) for _ in range(200)]
    assert all(synthetic.classify_shape(d.render()) == d.shape for d in drawings)
    assert {d.shape for d in drawings} == set(synthetic.SHAPES)
    assert synthetic.classify_shape(Image.new("RGB", (64, 64), (120, 120, 120))) is None
    red = next(d for d in drawings if d.colour == "red")
    assert synthetic.classify_shape(red.render(), "blue") is None  # no pixel of that colour


def test_the_placement_classifier_reads_every_drawing_and_nothing_from_grey():
    stream = synthetic.iter_drawings(47)
    drawings = [next(stream) for _ in range(500)]
    assert all(synthetic.classify_placement(d.render()) == (d.cell, d.size) for d in drawings)
    assert {d.cell for d in drawings} == set(synthetic.POSITIONS) and {d.size for d in drawings} == set(synthetic.SIZES)
    assert synthetic.classify_placement(Image.new("RGB", (64, 64), (120, 120, 120))) is None
    # every prompt the evidence asks for parses to the cell and size a drawing of that caption has
    for _, prompt in evidence.PROMPTS:
        cell, size = evidence.asked_placement(prompt)
        assert synthetic.POSITIONS[cell] in prompt and size in prompt


def test_captions_for_the_adapter_name_neither_colour_nor_shape():
    drawing = synthetic.make_group(1, 1, "red", "circle")[0]
    assert drawing.caption().split()[2:4] == ["red", "circle"]
    prompt = build.caption(drawing)
    assert not set(prompt.split()) & (set(synthetic.COLOURS) | set(synthetic.SHAPES))
    assert prompt.startswith(f"a {drawing.size} shape ") and prompt.endswith(drawing.position)


def test_examples_are_the_documented_groups_and_controls(tmp_path):
    folders = synthetic.write_examples(tmp_path / "groups")
    assert [f.name for f in folders] == [f"{c}-{s}" for c, s, _ in synthetic.EXAMPLE_GROUPS]
    for folder, (colour, _, _) in zip(folders, synthetic.EXAMPLE_GROUPS, strict=False):
        images = sorted(folder.glob("*.png"))
        assert len(images) == 3
        assert all(synthetic.dominant_colour(Image.open(p)) == colour for p in images)
    controls = synthetic.write_controls(tmp_path / "controls")
    assert [synthetic.classify_shape(Image.open(p)) for p in controls] == list(synthetic.SHAPES)
    shipped = Path(__file__).parents[1] / "examples"
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert written == sorted(p.relative_to(shipped) for p in shipped.rglob("*.png"))
    for path in written:  # the shipped examples are these pictures (regenerated with the domain)
        assert Image.open(shipped / path).tobytes() == Image.open(tmp_path / path).tobytes(), path


def test_held_out_groups_cover_every_pair_and_swapping_changes_every_colour_and_shape():
    groups = evidence.held_out_groups()
    assert len({(g.colour, g.shape) for g in groups}) == len(synthetic.COLOURS) * len(synthetic.SHAPES)
    assert {g.colour for g in evidence.held_out_groups(6)} == set(synthetic.COLOURS)
    assert {g.shape for g in evidence.held_out_groups(6)} == set(synthetic.SHAPES)  # the CI subset sees every shape
    for subset in (groups, groups[:6]):
        swapped = evidence.swapped(subset)
        assert [g.name for g in swapped] == [g.name for g in subset]
        assert all(s.colour != g.colour and s.shape != g.shape for s, g in zip(swapped, subset, strict=True))
        assert all(s.references[0].colour == s.colour and s.references[0].shape == s.shape for s in swapped)


def test_evidence_scores_each_picture_against_references_prompt_and_folder(tmp_path):
    groups = evidence.held_out_groups(2)
    swapped = evidence.swapped(groups)
    # "pictures" that are drawings: of the references' colour and shape, placed as the prompt asks
    for group in swapped:
        (tmp_path / group.name).mkdir()
        for pid, prompt in evidence.PROMPTS:
            cell, size = evidence.asked_placement(prompt)
            drawing = next(
                d for d in (synthetic.random_drawing(__import__("random").Random(k), group.colour, group.shape)
                            for k in range(10_000)) if d.cell == cell and d.size == size
            )  # fmt: skip
            drawing.render().save(tmp_path / group.name / f"{pid}_0.png")
    result = evidence.score(swapped, tmp_path, original=groups)
    assert result["images"] == 2 * len(evidence.PROMPTS)
    assert result["colour"] == result["shape"] == result["position"] == result["size"] == 1.0
    assert result["keeps_folder_colour"] == result["keeps_folder_shape"] == result["no_colour"] == 0.0
    table = evidence.markdown({"groups": 2, "prompts": dict(evidence.PROMPTS), "images_per_prompt": 1,
                               "as_given": result, "swapped": result})  # fmt: skip
    assert "| references as given | 10 | **100%** | **100%** | **100%** | **100%** |" in table
    assert f"per shape: {groups[1].shape} 0/0" not in table and f"{swapped[0].shape} 5/5" in table


# --------------------------------------------------------------------------- the recipe's pieces


def test_training_data_passes_easyref_train_validation(tmp_path):
    from easyref_cli.train import data as train_data

    files = build.write_training_data(tmp_path, groups=3, per_group=4, seed=0)
    for stage, path in files.items():
        report = train_data.validate_data(path, tmp_path, decode=True)
        items = train_data.require_valid(report, path)
        assert len(items) == 12, stage
    multi = json.loads(files["multi"].read_text())
    assert all(item["target"] not in item["image_file"] and len(item["image_file"]) == 3 for item in multi)
    single = json.loads(files["single"].read_text())
    assert all(item["image_file"][0] != item["target"] for item in single)
    assert train_data.require_masks(items, files["multi"]) is None
    for item in multi:  # each target's loss mask: its shape and a ring one latent pixel (4 px) wide around it
        drawn = synthetic.shape_mask(Image.open(tmp_path / item["target"]))
        mask = np.asarray(Image.open(tmp_path / item["mask"])) > 0
        assert mask[drawn].all() and 0 < mask.sum() - drawn.sum() < 4 * 4 * drawn.sum()


@pytest.mark.slow
def test_base_models_vae_fit_and_unet_pretraining_run(tmp_path):
    import torch

    torch.manual_seed(0)
    pipe = base.build_base_pipeline(tmp_path / "sdxl")
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size * 4 == synthetic.IMAGE_SIZE
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    fitted = base.fit_vae(pipe.vae, 2, seed=0, batch_size=2, log=lambda _: None)
    assert pipe.vae.config.scaling_factor == pytest.approx(fitted["scaling_factor"]) and fitted["scaling_factor"] > 0
    trained = base.train_base_unet(pipe, 2, seed=0, images=8, batch_size=2, log=lambda _: None)
    assert torch.isfinite(torch.tensor(trained["final_loss"]))
    assert any(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.mark.slow
def test_an_interrupted_base_pretraining_resumes_exactly(tmp_path, monkeypatch):
    """A stopped base pre-training resumes to the weights of an uninterrupted one (with the attribute
    heads, so their state is covered too, and the shape-weighted loss)."""
    import torch

    attribute_loss = 0.1

    def fresh():
        torch.manual_seed(0)
        return base.build_base_pipeline(tmp_path / "sdxl")

    settings = {"seed": 0, "images": 8, "batch_size": 2, "log": lambda _: None, "attribute_loss": attribute_loss,
                "shape_weight": 4.0}  # fmt: skip
    uninterrupted = fresh()
    base.train_base_unet(uninterrupted, 4, **settings)

    state = tmp_path / base.BASE_STATE
    loss, calls = base._unet_loss, []

    def interrupted_at_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(base, "_unet_loss", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        base.train_base_unet(fresh(), 4, state=state, save_every=2, **settings)
    monkeypatch.setattr(base, "_unet_loss", loss)
    resumed = fresh()
    done = base.train_base_unet(resumed, 4, state=state, save_every=2, **settings)
    assert done["resumed_at"] == 2
    for module in ("unet", "text_encoder", "text_encoder_2"):
        expected = getattr(uninterrupted, module).state_dict()
        assert all(torch.equal(expected[k], v) for k, v in getattr(resumed, module).state_dict().items()), module
    again = base.train_base_unet(fresh(), 4, state=state, **settings)  # finished: nothing left to train
    assert again["resumed_at"] == 4 and again["final_loss"] == pytest.approx(done["final_loss"])
    with pytest.raises(SystemExit, match="another base run"):  # a state resumes only the same run
        base.train_base_unet(fresh(), 6, state=state, **settings)


def test_demo_schedule_is_zero_terminal_snr_v_prediction(tmp_path):
    """The recipe's (and the shipped model's) scheduler: SDXL's betas rescaled so the noisiest
    training input holds nothing of the picture, v-prediction, sampling from t = 999."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    built = base.build_base_pipeline(tmp_path / "sdxl").scheduler.config
    with open(weights_dir() / "sdxl" / "scheduler" / "scheduler_config.json") as f:
        shipped = json.load(f)
    for config in (built, shipped):
        assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
        assert DDPMScheduler.from_config(config).alphas_cumprod[-1] == 0  # what training noises to
        euler = EulerDiscreteScheduler.from_config(config)
        euler.set_timesteps(25)
        assert euler.timesteps[0] == 999  # trailing: sampling starts where training saw pure noise


# --------------------------------------------------------------------------- the shipped model


def test_demo_weights_are_shipped_small_and_recorded():
    root = weights_dir()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    record = json.loads((root / "build.json").read_text())
    assert set(record["steps"]) >= {"vae", "unet", "mllm", "align", "single", "multi"}
    assert record["total_seconds"] > 0
    assert set(record["unet"]["from_text"]["per_colour"]) == set(synthetic.COLOURS)
    assert set(record["unet"]["from_text"]["per_shape"]) == set(synthetic.SHAPES)
    assert set(record["mllm"]["reads"]) == {"colour", "shape", "position", "size"}
    # the base trained on with the pooled embedding of the placement only, and checked that way
    assert record["unet_place"]["pooled_from"] == "placement" and record["steps"]["unet_place"] > 0
    assert set(record["unet_place"]["from_text"]["per_shape"]) == set(synthetic.SHAPES)
    # and on again the same way (``unet_more``), checked per shape and size
    assert record["unet_more"]["pooled_from"] == "placement"
    assert record["steps"]["unet_more"] == build.STEPS["unet_more"]
    assert len(record["unet_more"]["from_text"]["shape_per_size"]) == len(synthetic.SHAPES) * len(synthetic.SIZES)
    assert all(record["seconds"][step] > 0 for step in ("unet", "mllm", "align", "single", "multi", "anneal"))
    # the last run: multi again from multi's checkpoint, its rate decayed (cosine), as STAGE_RUNS says
    assert record["anneal_settings"]["stage"] == "multi" and record["anneal_settings"]["lr_scheduler"] == "cosine"
    assert record["steps"]["anneal"] == build.STEPS["anneal"]


def test_evidence_runs_a_build_folder_with_the_settings_of_model_demo(tmp_path):
    """``evidence --weights BUILD`` (a build not installed yet) plans the jobs ``--model demo`` plans."""

    def planned(*model):
        res = invoke("generate", "examples/groups", "--prompt", "a large shape in the centre", "-o", tmp_path / "o",
                     "--dry-run", "--json", *model)  # fmt: skip
        assert res.exit_code == 0, res.output
        jobs = [json.loads(line) for line in res.stdout.splitlines()]
        return [{k: v for k, v in job.items() if k not in ("job_id", "model")} for job in jobs]

    assert planned(*evidence.model_args(weights_dir())) == planned("--model", "demo")


def test_model_demo_conflicts_and_missing_weights(tmp_path, monkeypatch):
    from easyref_cli.models import chosen_models

    res = invoke("generate", "examples/groups", "--prompt", "a large shape in the centre", "-o", tmp_path / "o",
                 "--model", "demo", "--adapter", "x.safetensors", "--dry-run")  # fmt: skip
    assert res.exit_code == 2 and "--model demo replaces" in res.output
    monkeypatch.setattr("easyref_cli.demo.weights_dir", lambda: tmp_path / "nothing")
    with pytest.raises(UsageError, match="demo.build"):
        chosen_models("demo")


@pytest.fixture(scope="module")
def evidence_run(tmp_path_factory):
    """Six held-out groups (every colour, every shape) × 2 prompts, references as given and swapped."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the subprocesses: tiny ops run faster on one thread
    root = tmp_path_factory.mktemp("evidence")
    subset = ("centre", "top-left")  # the centre and a corner, large and small
    return root, evidence.run(root, groups=6, images_per_prompt=1, sheet_groups=2, prompt_ids=subset)


@pytest.mark.slow
def test_generate_with_model_demo_works_offline(tmp_path):
    out = tmp_path / "out"
    res = invoke("generate", "examples/groups", "--prompts", "examples/prompts.yaml", "--model", "demo", "-o", out)
    assert res.exit_code == 0, res.output
    pictures = sorted(out.rglob("*.png"))
    assert len(pictures) == 4 * 2 * 2
    with Image.open(pictures[0]) as image:
        assert image.size == (64, 64)
    sheet = tmp_path / "sheet.png"
    evidence.main([str(sheet), "--sheet-of", "examples/groups", str(out)])
    with Image.open(sheet) as image:  # 4 groups × (3 references + 4 pictures), enlarged 2×
        assert image.size[1] == 18 + 4 * 128 and image.size[0] > 7 * 128


@pytest.mark.slow
def test_colour_and_shape_follow_the_references_and_position_and_size_the_prompt(evidence_run):
    _, result = evidence_run
    given, swapped = result["as_given"], result["swapped"]
    assert given["images"] == swapped["images"] == 6 * 2
    # on a subset (every colour once, every shape), in both runs: the references' colour (chance 1/6; the
    # full evidence 100%) and shape (chance 1/4; here 10 of 12, full: 85%: docs/DEMO.md), the prompt's
    # position (chance 1/9; full: 100%) and size (full: 98%); the swapped run leaves the folders' colours
    # behind (full: none keeps it) and their shapes (here 1 of 12 keeps it, full: 6%).
    for run in (given, swapped):
        assert run["colour"] >= 0.9 and run["position"] >= 0.9 and run["size"] >= 0.75, run
        assert run["shape"] >= 8 / 12, run
    assert swapped["keeps_folder_colour"] <= 0.1 and swapped["keeps_folder_shape"] <= 0.25


@pytest.mark.slow
def test_evidence_writes_table_and_contact_sheet(evidence_run):
    root, result = evidence_run
    assert json.loads((root / "evidence.json").read_text())["as_given"] == result["as_given"]
    table = (root / "evidence.md").read_text()
    assert "references swapped between groups" in table and "%" in table
    with Image.open(root / "contact-sheet.png") as sheet:  # 2 sections × 2 groups; 4 references + 3 pictures
        assert sheet.width > 7 * 128 and sheet.height > 4 * 128


@pytest.mark.slow
def test_the_demo_controlnet_draws_the_control_shape_in_the_references_colour(tmp_path):
    from easyref_cli.demo.controlnet import evaluate

    out = evaluate(tmp_path, count=2)
    assert out["with ControlNet"]["images"] == out["without ControlNet"]["images"] == 8
    # the prompt already places the shape (full evaluation: IoU 0.48 without, 0.82 with; here 0.43 and 0.80);
    # the control's outline puts it there, in the control's shape (full: 78% against 28%; here 4 and 2 of 8),
    # in the references' colour
    with_, without = out["with ControlNet"], out["without ControlNet"]
    assert with_["mean_iou"] >= 0.7 and with_["mean_iou"] > without["mean_iou"]
    assert with_["shape"] > without["shape"]
    assert with_["colour"] >= 0.9


def test_the_demo_controlnet_trains_each_drawing_in_its_references_colour():
    """Training pairs: the control's shape, place and size drawn in the colour of the reference group whose
    tokens (for the item's caption) come with it; a tenth get the unconditional tokens and keep their colour."""
    import random

    import torch

    from easyref_cli.demo.controlnet import UNCOND_REFERENCE_RATE, _with_references

    class Bank:  # group g's tokens are g everywhere; the unconditional ones -1
        groups = [synthetic.make_group(i, 3) for i in range(8)]
        uncond = torch.full((4, 2), -1.0)
        asked: list = []

        def tokens(self, group, caption):
            self.asked.append(caption)
            return torch.full((4, 2), float(group))

    stream = synthetic.iter_drawings(5)
    controls = [next(stream) for _ in range(400)]
    captions = [d.caption(colour=False, shape=False) if i % 3 else "" for i, d in enumerate(controls)]
    bank = Bank()
    targets, refs = _with_references(controls, captions, random.Random(0), bank)
    assert refs.shape == (400, 4, 2) and len(targets) == 400
    unconditional, asked = 0, []
    for control, caption, target, ref in zip(controls, captions, targets, refs, strict=True):
        assert (target.shape, target.cell, target.centre, target.side) == (
            control.shape,
            control.cell,
            control.centre,
            control.side,
        )
        if ref[0, 0] < 0:
            unconditional += 1
            assert target == control
        else:
            group = bank.groups[int(ref[0, 0])]
            assert target.colour == group[0].colour and target.rgb in {d.rgb for d in group}
            asked.append(caption)
    assert bank.asked == asked  # each item's tokens were encoded with its own caption
    assert abs(unconditional / 400 - UNCOND_REFERENCE_RATE) < 0.05


@pytest.mark.slow
def test_a_demo_controlnet_training_step_runs_on_the_demo_model_with_references(tmp_path, monkeypatch):
    """One step of the real recipe on the installed demo weights: the gradient reaches the ControlNet's
    zero-initialised output convolutions through the UNet with its adapter reading reference tokens."""
    from diffusers import ControlNetModel

    from easyref_cli.demo import controlnet

    monkeypatch.setattr(controlnet, "REFERENCE_GROUPS", 2)
    record = controlnet.train(tmp_path, steps=1, batch_size=2)
    assert record["references"] == {"groups": 2, "uncond_rate": controlnet.UNCOND_REFERENCE_RATE}
    assert record["steps"] == 1 and record["final_loss"] > 0
    trained = ControlNetModel.from_pretrained(tmp_path / controlnet.CONTROLNET_DIRNAME)
    assert any(block.weight.abs().sum() > 0 for block in trained.controlnet_down_blocks)


def test_the_demo_controlnet_goes_with_the_demo_model_only(tmp_path):
    (tmp_path / "g").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "g" / "a.png")
    args = ["generate", str(tmp_path / "g"), "-p", "a shape", "-o", str(tmp_path / "o"), "--dry-run",
            "--controlnet", "demo", "--control-image", str(tmp_path / "g" / "a.png")]  # fmt: skip
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "use it with --model demo" in refused.output
    planned = CliRunner().invoke(app, [*args, "--model", "demo"])
    assert planned.exit_code == 0, planned.output


def test_a_build_folder_continues_where_it_stopped(tmp_path, monkeypatch):
    """Stages that reached their steps on the same base, start and settings are kept, one that stopped
    short resumes (``easyref train --resume``), one whose start or settings changed restarts; every run
    is listed."""
    calls = []

    def fake_stage(stage, *, out, steps, resume, mask_weight, lr_scheduler, seed, init, **_):
        name = out.name.removeprefix("train-")
        calls.append((name, steps, resume))
        assert mask_weight == weight
        # anneal: multi once more, from multi's checkpoint, in another order, its rate decayed
        assert (stage, lr_scheduler, seed) == (("multi", "cosine", 1) if name == "anneal" else (name, "constant", 0))
        if name == "anneal":
            assert init == tmp_path / "train-multi" / f"checkpoint-{steps_now['multi']}.safetensors"
        (out / "state").mkdir(parents=True, exist_ok=True)
        checkpoint = out / f"checkpoint-{steps}.safetensors"
        checkpoint.write_text(f"{stage} {steps} run {len(calls)}")  # each run its own weights
        return checkpoint

    monkeypatch.setattr(build, "run_stage", fake_stage)
    monkeypatch.setattr(build, "write_training_data", lambda root, **_: (root.mkdir(), (root / "multi.json").touch()))
    (tmp_path / "base-unet.done").write_text('{"unet": 100}\n')
    steps = {"align": 4, "single": 4, "multi": 4, "anneal": 4}
    steps_now = dict(steps)
    weight = 4.0
    every = [("align", 4, False), ("single", 6, False), ("multi", 8, False), ("anneal", 4, False)]

    def train(**more):
        steps_now.update(steps | more)
        ledger = build.Ledger(tmp_path, {"seed": 0, "steps": steps | more})
        return build._train_easyref(tmp_path, ledger, steps | more, 0, quick=True, mask_weight=weight)

    train()
    assert calls == [("align", 4, False), ("single", 4, False), ("multi", 4, False), ("anneal", 4, False)]
    calls.clear()
    assert train() == tmp_path / "train-anneal" / "checkpoint-4.safetensors" and calls == []  # all done
    train(anneal=8)  # a decay to zero over 8 steps is another run than over 4: it starts again
    assert calls == [("anneal", 8, False)]
    with pytest.raises(SystemExit, match="more than the 4 asked for"):  # fewer never delete it
        train()
    assert (tmp_path / "train-anneal" / "checkpoint-8.safetensors").exists()
    calls.clear()
    train(single=6, multi=8)  # single resumes; multi and anneal, trained from the old single, start again
    assert calls == [("single", 6, True), ("multi", 8, False), ("anneal", 4, False)]
    record = json.loads((tmp_path / "build.json").read_text())
    stages = [run["step"] for run in record["runs"] if run["step"] != "data"]
    assert stages == ["align", "single", "multi", "anneal", "anneal", "single", "multi", "anneal"]
    assert record["seconds"]["multi"] == record["runs"][-2]["seconds"]  # only the run that made it
    assert record["anneal_settings"] == {"name": "anneal", "stage": "multi", "batch_size": 8, "learning_rate": 5e-4,
                                         "lr_scheduler": "cosine", "seed_offset": 1, "mask_weight": 4.0}  # fmt: skip
    with pytest.raises(SystemExit, match="more than the 4 asked for"):  # fewer steps never delete a stage
        train(single=6)
    calls.clear()
    (tmp_path / "base-unet.done").write_text('{"unet": 200}\n')  # a retrained base: every stage again
    train(single=6, multi=8)
    assert calls == every
    calls.clear()
    (tmp_path / "base-mllm.done").write_text('{"qwen2vl": 20}\n')  # a pre-trained Qwen2-VL: every stage again
    train(single=6, multi=8)
    assert calls == every
    calls.clear()
    (tmp_path / "base-unet_place.done").write_text('{"unet_place": 10}\n')  # the base trained on: every stage again
    train(single=6, multi=8)
    assert calls == every
    calls.clear()
    (tmp_path / "base-unet_more.done").write_text('{"unet_more": 10}\n')  # and on again: every stage again
    train(single=6, multi=8)
    assert calls == every
    calls.clear()
    weight = 2.0  # another loss: every stage again
    train(single=6, multi=8)
    assert calls == every
    assert json.loads((tmp_path / "build.json").read_text())["multi_settings"]["mask_weight"] == 2.0
    calls.clear()
    edited = [dataclasses.replace(run, learning_rate=1e-4) if run.name == "single" else run for run in build.STAGE_RUNS]
    monkeypatch.setattr(build, "STAGE_RUNS", tuple(edited))  # single's rate edited: single and what follows
    train(single=6, multi=8)
    assert calls == every[1:]
    assert json.loads((tmp_path / "build.json").read_text())["single_settings"]["learning_rate"] == 1e-4

    def stopped(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "run_stage", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(single=6, multi=12)
    last_run = json.loads((tmp_path / "build.json").read_text())["runs"][-1]
    assert last_run["step"] == "multi" and last_run["stopped"] and last_run["steps_from"] == 8

    def stopped_at_half(stage, *, out, steps, **_):  # a decaying run stopped half way (Ctrl-C)
        (out / "state").mkdir(parents=True, exist_ok=True)
        (out / f"checkpoint-{steps // 2}.safetensors").write_text(f"{stage} half")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "run_stage", fake_stage)
    train(single=6, multi=12)  # multi resumed and finished; anneal again from it
    monkeypatch.setattr(build, "run_stage", stopped_at_half)
    with pytest.raises(KeyboardInterrupt):
        train(single=6, multi=12, anneal=10)
    monkeypatch.setattr(build, "run_stage", fake_stage)
    calls.clear()
    train(single=6, multi=12, anneal=10)  # the same command again: the same decay, resumed
    assert calls == [("anneal", 10, True)]


def test_each_stage_run_is_the_real_train_command_with_its_settings(tmp_path, monkeypatch):
    """``run_stage`` hands a :data:`build.STAGE_RUNS` entry's stage, data, rate, schedule and seed to
    ``easyref train``; anneal is ``--stage multi`` on multi's data with a cosine schedule."""
    commands = []

    class Process:
        def __init__(self, command):
            commands.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(build.subprocess, "Popen", Process)
    data = {stage: tmp_path / f"{stage}.json" for stage in ("align", "single", "multi")}
    anneal = next(run for run in build.STAGE_RUNS if run.name == "anneal")
    assert [run.name for run in build.STAGE_RUNS] == ["align", "single", "multi", "anneal"]
    out = build.run_stage(
        anneal.stage, data=data, data_root=tmp_path, sdxl=tmp_path / "sdxl", mllm=tmp_path / "qwen2vl",
        out=tmp_path / "train-anneal", steps=12, init=tmp_path / "multi.safetensors", seed=anneal.seed_offset,
        batch_size=anneal.batch_size, learning_rate=anneal.learning_rate, lr_scheduler=anneal.lr_scheduler,
    )  # fmt: skip
    assert out == tmp_path / "train-anneal" / "checkpoint-12.safetensors"
    command = commands[0]
    option = lambda name: command[command.index(name) + 1]  # noqa: E731
    assert command[1:5] == ["-m", "easyref_cli", "train", "--stage"] and option("--stage") == "multi"
    assert option("--data") == str(data["multi"]) and option("--lr-scheduler") == "cosine"
    assert option("--seed") == "1" and option("--init") == str(tmp_path / "multi.safetensors")
    assert float(option("--learning-rate")) == anneal.learning_rate and "--lora-rank" in command
    from easyref_cli.train import LR_SCHEDULERS

    assert {run.lr_scheduler for run in build.STAGE_RUNS} <= set(LR_SCHEDULERS)


def test_the_build_record_names_the_cpu_of_each_run(tmp_path):
    """Two sittings of one build on different CPUs: each run in ``build.json`` says which."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n")
    assert build._cpu_name(cpuinfo) == "Intel(R) Xeon(R) Processor"
    assert (
        build._cpu_name(tmp_path / "missing") and build._cpu_name(tmp_path / "missing") != "Intel(R) Xeon(R) Processor"
    )
    ledger = build.Ledger(tmp_path, {"seed": 0})
    ledger.timed("data", lambda: None)
    record = json.loads((tmp_path / "build.json").read_text())
    assert record["runs"][0]["cpu"] == record["machine"]["cpu"] == build._cpu_name()


def test_a_build_folder_refuses_other_settings_for_what_it_built(tmp_path):
    build._marker(tmp_path / "base-unet.done", {"unet": 100})
    build._marker(tmp_path / "base-unet.done", {"unet": 100})  # the same: fine
    with pytest.raises(SystemExit, match="use another WORK folder"):
        build._marker(tmp_path / "base-unet.done", {"unet": 2000})
    (tmp_path / "build.json").write_text('{"seed": 1}')
    with pytest.raises(SystemExit, match="another seed"):
        build.Ledger(tmp_path, {"seed": 0, "steps": {}})


def test_the_shape_weights_cover_the_shape_and_its_outline_only():
    drawing = synthetic.make_group(5, 1, "blue", "cross")[0]
    weights = base._shape_weights([drawing], 4.0)[0, 0]
    assert weights.shape == (16, 16) and weights.min() == 1.0 and weights.max() == 5.0
    x0, y0, x1, y1 = (int(v) // 4 for v in drawing.box)
    outside = weights.clone()
    outside[max(0, y0 - 1) : y1 + 2, max(0, x0 - 1) : x1 + 2] = 1.0
    assert (outside == 1.0).all()  # nothing beyond one latent pixel around the shape's box
    assert (weights[y0 : y1 + 1, x0 : x1 + 1] > 1).float().mean() > 0.5


def test_the_attribute_loss_reads_only_what_the_caption_names():
    import torch

    drawing = synthetic.make_group(3, 1, "red", "cross")[0]
    heads = base._attribute_heads(32, seed=0)
    pooled = torch.randn(1, 32)
    assert base._attribute_loss(heads, pooled, [drawing], [""]).item() == 0.0  # CFG's empty caption names nothing
    without_colour = drawing.caption(colour=False)
    before = base._attribute_loss(heads, pooled, [drawing], [without_colour]).item()
    with torch.no_grad():
        heads["colour"].weight.add_(1.0)  # the colour head does not count for a caption without its word…
    assert base._attribute_loss(heads, pooled, [drawing], [without_colour]).item() == pytest.approx(before)
    full = base._attribute_loss(heads, pooled, [drawing], [drawing.caption()]).item()
    assert full > before  # …and does for one with it
    assert set(base.ATTRIBUTES) == {"cell", "size", "colour", "shape"}


def test_placement_pooling_gives_the_unet_the_caption_without_colour_and_shape(tmp_path, monkeypatch):
    """``pooled_from="placement"``: the UNet's pooled embedding is the picked caption's without its colour and
    shape words (what the stages' prompts say), the empty caption stays empty, and the attribute heads are
    asked only what that caption names."""
    import torch

    torch.manual_seed(0)
    pipe = base.build_base_pipeline(tmp_path / "sdxl")
    seen: dict = {}
    placement, loss, attributes = base._placement_captions, base._unet_loss, base._attribute_loss

    def spy_placement(caption_ids, picks, drawings, table):
        rows = placement(caption_ids, picks, drawings, table)
        seen.update(before=[table.captions[c] for c in caption_ids], after=[table.captions[c] for c in rows])
        seen.update(drawn=[drawings[i] for i in picks], ids_2=table.ids_2[rows])
        return rows

    def spy_loss(pipe_, scheduler, x0, hidden, pooled, *rest):
        with torch.no_grad():
            seen["expected"] = base.pooled_text(pipe_, seen["ids_2"])
        seen["pooled"] = pooled.detach().clone()
        return loss(pipe_, scheduler, x0, hidden, pooled, *rest)

    def spy_attributes(heads, pooled, drawings, captions):
        seen["asked"] = captions
        return attributes(heads, pooled, drawings, captions)

    monkeypatch.setattr(base, "_placement_captions", spy_placement)
    monkeypatch.setattr(base, "_unet_loss", spy_loss)
    monkeypatch.setattr(base, "_attribute_loss", spy_attributes)
    trained = base.train_base_unet(
        pipe, 1, seed=0, images=16, batch_size=16, log=lambda _: None, attribute_loss=0.1, pooled_from="placement"
    )
    assert trained["pooled_from"] == "placement"
    for before, after, drawing in zip(seen["before"], seen["after"], seen["drawn"], strict=True):
        assert after == ("" if before == "" else drawing.caption(colour=False, shape=False))
    assert seen["before"] != seen["after"]  # some picked captions named a colour or a shape
    assert seen["asked"] == seen["after"]
    assert torch.equal(seen["pooled"], seen["expected"])
    with pytest.raises(ValueError, match="pooled_from"):
        base.train_base_unet(pipe, 1, seed=0, images=8, batch_size=2, log=lambda _: None, pooled_from="prompt")


def test_the_from_text_check_can_pool_the_placement(tmp_path):
    """``_prompt_embeds`` is the pipeline's own conditioning (empty negative prompt) with only the pooled
    part taken from the other prompts."""
    import torch

    torch.manual_seed(0)
    pipe = base.build_base_pipeline(tmp_path / "sdxl")
    prompts, places = ["a large red circle in the centre"], ["a large shape in the centre"]
    keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    with torch.no_grad():
        own = pipe.encode_prompt(prompt=prompts, device="cpu", negative_prompt=[""])
        placed = pipe.encode_prompt(prompt=places, device="cpu", negative_prompt=[""])
        same, mixed = base._prompt_embeds(pipe, prompts, prompts), base._prompt_embeds(pipe, prompts, places)
    assert all(torch.equal(same[k], v) for k, v in zip(keys, own, strict=True))
    assert torch.equal(mixed["prompt_embeds"], own[0]) and torch.equal(mixed["negative_prompt_embeds"], own[1])
    assert torch.equal(mixed["pooled_prompt_embeds"], placed[2]) and not torch.equal(placed[2], own[2])


def test_the_placement_run_trains_the_base_on_once_and_the_stages_build_on_it(tmp_path, monkeypatch):

    import torch

    torch.manual_seed(0)
    base.build_base_pipeline(tmp_path / "sdxl")
    calls = []

    def fake_train(pipe, steps, *, seed, lr, state, pooled_from, **loss):
        calls.append((steps, seed, lr, state.name, pooled_from, loss))
        return {"final_loss": 0.1}

    monkeypatch.setattr(base, "train_base_unet", fake_train)
    monkeypatch.setattr(base, "from_text_accuracy", lambda pipe, pooled_from: {"pooled_from": pooled_from})
    ledger = build.Ledger(tmp_path, {"seed": 2, "steps": {}})
    loss = build.BaseLoss()
    steps = {"unet_place": 30, "unet_more": 40}
    build._place_base(tmp_path, ledger, steps, 2, loss)
    (place_lr, place_seed), (more_lr, more_seed) = (run[1:] for run in build.PLACE_RUNS)
    assert calls == [
        (30, 2 + place_seed, place_lr, "base-place-state.pt", "placement", dataclasses.asdict(loss)),
        (40, 2 + more_seed, more_lr, "base-unet_more-state.pt", "placement", dataclasses.asdict(loss)),
    ]
    assert ledger.record["unet_place"]["from_text"] == {"pooled_from": "placement"}
    assert ledger.record["unet_more"]["from_text"] == {"pooled_from": "placement"}
    seconds = set(json.loads((tmp_path / "build.json").read_text())["seconds"])
    assert {"unet_place", "unet_place_check", "unet_more", "unet_more_check"} <= seconds
    build._place_base(tmp_path, ledger, steps, 2, loss)
    assert len(calls) == 2  # done: kept
    (tmp_path / "base-unet.done").write_text("{}")
    built_on = build._built_on(tmp_path, None, 0.0, build.STAGE_RUNS[0], 4)
    assert json.loads(built_on["unet_place"])["unet_place"] == 30
    assert json.loads(built_on["unet_more"])["unet_more"] == 40
    with pytest.raises(SystemExit, match="use another WORK folder"):
        build._place_base(tmp_path, ledger, steps | {"unet_more": 41}, 2, loss)
    (tmp_path / "base-unet_more.done").unlink()  # a folder from before the second run: it trains that one only
    build._place_base(tmp_path, ledger, steps, 2, loss)
    assert [call[0] for call in calls] == [30, 40, 40]


# --------------------------------------------------------------------------- the Qwen2-VL pre-training


@pytest.fixture(scope="module")
def tiny_qwen2vl(tmp_path_factory):
    from easyref_cli.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl"), 0)


def test_qwen2vl_pretraining_learns_only_the_answer_after_the_picture(tiny_qwen2vl):
    from easyref_cli.demo import mllm
    from easyref_cli.model.encoder import build_prompt

    captioner = mllm.Captioner(tiny_qwen2vl)
    drawings = synthetic.make_group(4, 2, "green", "triangle")
    pixel_values, grid, counts = captioner.images(drawings)
    assert counts[0] == counts[1] and counts[0] * 4 == int(grid[0].prod())  # rule 2: 64² → 308² → 11² tokens
    answers = [mllm.answer(drawings[0], short=False), mllm.answer(drawings[1], short=True)]
    assert answers[1] == "a green triangle" and answers[0] == drawings[0].caption()
    ids, labels = captioner.batch(counts, answers)
    tok = captioner.tokenizer
    for row, label, text in zip(ids, labels, answers, strict=True):
        prompt = tok(build_prompt([counts[0]], "", mllm.INSTRUCTION), add_special_tokens=False)["input_ids"]
        assert row[: len(prompt)].tolist() == prompt and (label[: len(prompt)] == -100).all()
        learnt = label[label != -100].tolist()
        assert tok.decode(learnt) == text + "<|im_end|>"  # the answer and its end, nothing else
    losses = captioner.token_losses(ids, labels, pixel_values, grid)
    assert losses.shape == (2, ids.shape[1] - 1)
    assert ((losses > 0) == (labels[:, 1:] != -100)).all()


@pytest.mark.slow
def test_an_interrupted_qwen2vl_pretraining_resumes_exactly_and_is_saved(tiny_qwen2vl, tmp_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import load_file

    from easyref_cli.demo import mllm

    def fresh(name):
        return Path(shutil.copytree(tiny_qwen2vl, tmp_path / name))

    settings = {"seed": 0, "batch_size": 2, "log": lambda _: None}
    before = load_file(tiny_qwen2vl / "model.safetensors")
    uninterrupted = fresh("whole")
    mllm.pretrain_qwen2vl(uninterrupted, 4, **settings)
    expected = load_file(uninterrupted / "model.safetensors")
    assert any(not torch.equal(before[k], v) for k, v in expected.items())  # trained and saved back
    assert sorted(p.name for p in uninterrupted.iterdir()) == sorted(p.name for p in tiny_qwen2vl.iterdir())

    losses, calls = mllm.Captioner.token_losses, []

    def interrupted_at_step_3(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return losses(self, *args)

    state, stopped = tmp_path / "state.pt", fresh("stopped")
    monkeypatch.setattr(mllm.Captioner, "token_losses", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        mllm.pretrain_qwen2vl(stopped, 4, state=state, save_every=2, **settings)
    assert all(torch.equal(before[k], v) for k, v in load_file(stopped / "model.safetensors").items())  # untouched
    monkeypatch.setattr(mllm.Captioner, "token_losses", losses)
    done = mllm.pretrain_qwen2vl(stopped, 4, state=state, save_every=2, **settings)
    assert done["resumed_at"] == 2
    resumed = load_file(stopped / "model.safetensors")
    assert all(torch.equal(expected[k], v) for k, v in resumed.items())
    with pytest.raises(SystemExit, match="another Qwen2-VL run"):
        mllm.pretrain_qwen2vl(stopped, 6, state=state, **settings)
    reads = mllm.reading_accuracy(stopped, pictures=2)
    assert set(reads) == {"colour", "shape", "position", "size"} and all(0 <= v <= 1 for v in reads.values())


@pytest.mark.slow
def test_base_from_keeps_a_pretrained_qwen2vl_and_makes_a_new_unet(tiny_qwen2vl, tmp_path):
    import shutil

    import torch

    old, work = tmp_path / "old", tmp_path / "new"
    torch.manual_seed(0)
    base.build_base_pipeline(old / "sdxl")
    shutil.copytree(tiny_qwen2vl, old / "qwen2vl")
    record = {"seed": 0, "steps": {"vae": 3, "unet": 5, "mllm": 7}, "mllm": {"reads": {}}}
    (old / "build.json").write_text(json.dumps(record))
    work.mkdir()
    ledger = build.Ledger(work, {"seed": 0, "steps": {}})
    build._start_from(old, work, ledger, 0)
    assert json.loads((work / "base-mllm.done").read_text()) == {"qwen2vl": 7}  # not pre-trained again
    assert (work / "qwen2vl" / "model.safetensors").read_bytes() == (old / "qwen2vl" / "model.safetensors").read_bytes()
    assert ledger.record["base_from"]["steps"] == {"vae": 3, "unet": 5, "mllm": 7, "mllm_more": None}
    assert not (work / "base-mllm_more.done").exists()  # that build had one Qwen2-VL run: the second runs here
    with pytest.raises(SystemExit, match="use another WORK folder"):  # other Qwen2-VL steps: an error, not a mix
        build._pretrain_mllm(work, ledger, {"mllm": 2500, "mllm_more": 1500}, 0)


def test_qwen2vl_pretraining_is_two_recorded_runs_done_once(tmp_path, monkeypatch):
    """Step 4 runs each of ``MLLM_RUNS`` once, with its own rate, seed and state file; a rerun keeps them,
    and the stages are built on both."""
    from easyref_cli.demo import mllm

    calls = []

    def fake_pretrain(path, steps, *, seed, lr, state, log):
        calls.append((steps, seed, lr, state.name))
        return {"steps": steps}

    monkeypatch.setattr(mllm, "pretrain_qwen2vl", fake_pretrain)
    monkeypatch.setattr(mllm, "reading_accuracy", lambda path: {"shape": 1.0})
    ledger = build.Ledger(tmp_path, {"seed": 3, "steps": {}})
    steps = {"mllm": 20, "mllm_more": 10}
    build._pretrain_mllm(tmp_path, ledger, steps, 3)
    assert calls == [(20, 3, 2e-3, "qwen2vl-state.pt"), (10, 4, 1e-3, "qwen2vl-mllm_more-state.pt")]
    assert ledger.record["mllm_more"] == {"steps": 10, "reads": {"shape": 1.0}}
    build._pretrain_mllm(tmp_path, ledger, steps, 3)
    assert len(calls) == 2  # done: kept
    (tmp_path / "base-unet.done").write_text("{}")
    assert json.loads(build._built_on(tmp_path, None, 0.0, build.STAGE_RUNS[0], 4)["mllm_more"]) == {"qwen2vl": 10}
    with pytest.raises(SystemExit, match="use another WORK folder"):
        build._pretrain_mllm(tmp_path, ledger, steps | {"mllm_more": 11}, 3)
