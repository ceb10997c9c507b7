"""`easyref train`: data, stages, the accelerate loop, checkpoints and resume, on tiny models (CPU).

Runs at resolution 64 with batch 1 and single-threaded torch (these tiny ops are dominated by thread
overhead; on a shared 2-core machine one thread is several times faster).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from easyref_cli.clitools import handle_errors
from easyref_cli.constants import INSTRUCTION
from easyref_cli.errors import UsageError
from easyref_cli.testing import make_reference_images
from easyref_cli.train import STAGE_DEFAULTS, TrainConfig
from easyref_cli.train import data as D
from easyref_cli.train.command import train_command

runner = CliRunner()
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("train")(handle_errors(train_command))


@app.callback()
def _root() -> None:
    """Throwaway app: `train` is registered as cli.py does."""


def _reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; start (and leave) this module with fresh ones."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module", autouse=True)
def _isolated_runtime(tiny):  # after `tiny`, which sets the session's thread count when it is built
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _reset_accelerate()
    yield
    _reset_accelerate()
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# a tiny dataset: 3 groups of 4 images (80x64, so the centre crop matters), official JSON
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    for g in range(3):
        make_reference_images(root / f"g{g}", n=4, size=(80, 64), seed=g)
    items = []
    for g in range(3):
        files = [f"g{g}/ref_{i:02d}.png" for i in range(4)]
        items.append({"image_file": files[:3], "text": [f"group {g} shapes", "coloured shapes"], "target": files[3]})
        items.append({"image_file": files[0], "text": "a picture of shapes"})  # its own reference
    items.append({"target": "g0/ref_01.png", "text": ["a face"], "face": [[10, 8, 40, 44]]})
    data = root / "data.json"
    data.write_text(json.dumps(items))
    return data


def config(tiny, data, out, **overrides) -> TrainConfig:
    values = dict(
        stage="align",
        data=data,
        data_root=data.parent,
        base_model=tiny.base_model,
        mllm=tiny.mllm,
        output_dir=out,
        max_steps=2,
        save_steps=2,
        resolution=64,
        batch_size=1,
        gradient_accumulation=1,
        lora_rank=4,
        device="cpu",
        num_workers=0,
        show_progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def cli_args(tiny, data, out, *extra):
    return [
        "train",
        "--data",
        str(data),
        "--data-root",
        str(data.parent),
        "--base-model",
        str(tiny.base_model),
        "--mllm",
        str(tiny.mllm),
        "--output-dir",
        str(out),
        "--resolution",
        "64",
        "--batch-size",
        "1",
        "--gradient-accumulation",
        "1",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "-q",
        *extra,
    ]


def make_trainer(cfg):
    from easyref_cli.train.trainer import Trainer

    items = D.require_valid(D.validate_data(cfg.data, cfg.data_root), cfg.data)
    return Trainer(cfg, items).setup()


def trainable(trainer) -> set[str]:
    from easyref_cli.train.trainer import trainable_parameter_names

    return set(trainable_parameter_names(trainer.unwrapped))


def attention_paths(trainer) -> list[str]:
    return [n[: -len(".processor")] for n in trainer.unwrapped.unet.attn_processors]


def expected_names(trainer, stage: str) -> set[str]:
    """The exact trainable set of a stage, built independently from the module tree."""
    model = trainer.unwrapped
    names = {f"encoder.final_layer.{n}" for n, _ in model.encoder.final_layer.named_parameters()}
    names |= {f"encoder.projector.{n}" for n, _ in model.encoder.projector.named_parameters()}
    paths = attention_paths(trainer)
    names |= {f"unet.{p}.processor.{k}.weight" for p in paths if p.endswith("attn2") for k in ("to_k_ip", "to_v_ip")}
    if stage in ("single", "multi"):
        names |= {f"encoder.visual.{n}" for n, _ in model.encoder.visual.named_parameters()}
        names |= {f"encoder.language_model.{n}" for n, _ in model.encoder.language_model.named_parameters()}
        names |= {
            f"unet.{p}.processor.{k}_lora.{part}.weight"
            for p in paths
            for k in ("to_q", "to_k", "to_v", "to_out")
            for part in ("down", "up")
        }
    return names


# --------------------------------------------------------------------------------------------
# configuration and data (torch-free parts)
# --------------------------------------------------------------------------------------------


def test_stage_defaults_follow_the_official_scripts(tmp_path):
    base = dict(data=tmp_path, data_root=tmp_path, base_model=tmp_path, mllm=tmp_path, output_dir=tmp_path)
    for stage, defaults in STAGE_DEFAULTS.items():
        cfg = TrainConfig(stage=stage, **base).resolved()
        assert (cfg.batch_size, cfg.gradient_accumulation, cfg.learning_rate, cfg.truncate_rate) == (
            defaults["batch_size"],
            defaults["gradient_accumulation"],
            defaults["learning_rate"],
            defaults["truncate_rate"],
        )
    assert TrainConfig(stage="multi", **base).resolved().truncate_rate == 0.4
    # the official scripts: --random_crop for align and single, adaptive_resize (aspect) for multi
    assert [TrainConfig(stage=s, **base).resolved().resize for s in ("align", "single", "multi")] == [
        "crop", "crop", "aspect",
    ]  # fmt: skip
    assert TrainConfig(stage="multi", resize="crop", **base).resolved().resize == "crop"
    with pytest.raises(UsageError) as err:
        TrainConfig(
            stage="align", resolution=100, max_steps=0, mixed_precision="fp8", resize="aspect", batch_size=2, **base
        ).resolved()
    for text in ("--resolution", "--max-steps", "--mixed-precision", "--batch-size 1"):
        assert text in str(err.value)
    with pytest.raises(UsageError, match="--stage"):
        TrainConfig(stage="pretrain", **base).resolved()


def test_read_items_official_formats(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            [
                {"image_file": ["a.png", "b.png"], "text": ["x", "y"], "target": "c.png"},
                {"image_file": "a.png", "text": "own reference"},
                {"image_file": ["a.png"], "text": []},
                {
                    "target": "f.png",
                    "text": "face",
                    "face": [[1, 2, 30, 40], [0, 0, 5, 5]],
                    "image_file": "ignored.png",
                },
                # the official README's own example: a detector score after the box; a box past the edge
                {"target": "f.png", "text": "scored", "face": [[-4, -2.5, 30, 40, 0.99]]},
            ]
        )
    )
    items = D.read_items(path)
    assert items[0].references == ("a.png", "b.png") and items[0].target == "c.png" and items[0].texts == ("x", "y")
    assert items[1].target == "a.png" and items[1].references == ("a.png",)
    assert items[2].texts == ()
    assert items[3].face == (1.0, 2.0, 30.0, 40.0) and items[3].references == () and items[3].files == ("f.png",)
    assert items[4].face == (-4.0, -2.5, 30.0, 40.0)

    path.write_text(
        json.dumps(
            [
                {"image_file": ["a.png", "b.png"], "text": "two refs, no target"},
                {"image_file": "a.png"},
                {"target": "f.png", "text": "x", "face": [[5, 5, 2, 2]]},
                "not an object",
                {"target": "f.png", "text": "x", "face": [[5, 5, 20]]},
            ]
        )
    )
    with pytest.raises(UsageError) as err:
        D.read_items(path)
    for index in range(5):
        assert f"item {index}:" in str(err.value)


def test_plan_sample_shuffle_truncation_and_dropping():
    item = D.TrainItem(index=0, target="t.png", references=("1", "2", "3", "4", "5"), texts=("a", "b"))
    rng = random.Random(0)
    plans = [D.plan_sample(item, rng, truncate_rate=0.4) for _ in range(4000)]
    counts = [len(p.references) for p in plans]
    truncated = sum(c < 5 for c in counts) / len(plans)
    assert 0.36 < truncated < 0.44 and min(counts) == 2 and max(c for c in counts if c < 5) == 4
    assert all(set(p.references) <= set(item.references) and len(set(p.references)) == len(p.references) for p in plans)
    assert len({p.references for p in plans if len(p.references) == 5}) > 20  # order is shuffled
    image_only = sum(p.drop_image and not p.drop_text for p in plans) / len(plans)
    text_only = sum(p.drop_text and not p.drop_image for p in plans) / len(plans)
    both = sum(p.drop_image and p.drop_text for p in plans) / len(plans)
    for rate in (image_only, text_only, both):
        assert 0.035 < rate < 0.065
    assert all(p.caption == "" for p in plans if p.drop_text)
    assert {p.caption for p in plans if not p.drop_text} == {"a", "b"}
    # two references are never truncated; the same generator state gives the same plan
    pair = D.TrainItem(index=1, target="t", references=("1", "2"), texts=("a",))
    assert all(len(D.plan_sample(pair, rng, truncate_rate=1.0).references) == 2 for _ in range(50))
    assert D.plan_sample(item, D.sample_rng(3, 1, 7)) == D.plan_sample(item, D.sample_rng(3, 1, 7))


def test_face_reference_is_a_square_crop_inside_the_image():
    from PIL import Image

    image = Image.new("RGB", (100, 80))
    image.paste((255, 0, 0), (10, 10, 30, 40))  # the "face"
    for percent in (0, 25, 49):
        x1, y1, x2, y2 = D.expand_box(D.square_box(10, 10, 30, 40), 100, 80, percent)
        assert x2 - x1 == y2 - y1 and 0 <= x1 and 0 <= y1 and x2 <= 100 and y2 <= 80
    crop = D.face_reference(image, (10, 10, 30, 40), 0, flip=False)
    assert crop.width == crop.height == 30
    flipped = D.face_reference(image, (10, 10, 30, 40), 0, flip=True)
    assert list(flipped.getdata()) == list(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT).getdata())
    # a face at the edge (negative coordinates): the crop is shifted back inside, still square
    for percent in (0, 25):
        x1, y1, x2, y2 = D.expand_box(D.square_box(-4, -2.5, 30, 40), 100, 80, percent)
        assert x2 - x1 == y2 - y1 and 0 <= x1 and 0 <= y1 and x2 <= 100 and y2 <= 80
    edge = D.face_reference(image, (-4, -2.5, 30, 40), 0, flip=False)
    assert edge.width == edge.height == 42


# --------------------------------------------------------------------------------------------
# bad data: listed, exit 2, nothing trains
# --------------------------------------------------------------------------------------------


def test_bad_data_lists_every_problem_and_exits_2(tiny, dataset, tmp_path):
    root = tmp_path / "bad"
    make_reference_images(root, n=2, size=(64, 64))
    (root / "corrupt.png").write_bytes(b"definitely not a png")
    good = (root / "ref_00.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    data = root / "data.json"
    data.write_text(
        json.dumps(
            [
                {"image_file": ["ref_00.png", "missing_a.png"], "text": "x", "target": "ref_01.png"},
                {"image_file": ["corrupt.png", "ref_00.png"], "text": "y", "target": "missing_b.png"},
                {"image_file": "truncated.png", "text": "z"},
            ]
        )
    )
    out = tmp_path / "out"
    res = runner.invoke(app, cli_args(tiny, data, out, "--stage", "align", "--check-data"))
    assert res.exit_code == 2, res.output
    for name in ("missing_a.png", "missing_b.png", "corrupt.png", "truncated.png"):
        assert name in res.output
    assert "ref_00.png" not in res.output and "ref_01.png" not in res.output  # good files are not listed
    res = runner.invoke(app, cli_args(tiny, data, out, "--stage", "align"))  # training validates first, too
    assert res.exit_code == 2
    assert "missing_a.png" in res.output and "corrupt.png" in res.output
    assert not out.exists()

    minimal = ["train", "--stage", "multi", "--data", str(dataset), "--data-root", str(dataset.parent)]
    ok = runner.invoke(app, [*minimal, "--check-data"])  # no models or output folder needed
    assert ok.exit_code == 0, ok.output
    assert "7 items" in ok.output and "1 face items" in ok.output
    res = runner.invoke(app, minimal)
    assert res.exit_code == 2 and "--base-model, --mllm, --output-dir" in res.output
    assert not out.exists()


def test_dataset_sample_matches_the_inference_prompt(tiny, dataset):
    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.encoder import ReferenceEncoder
    from easyref_cli.model.pipeline import load_sdxl

    encoder = ReferenceEncoder.from_pretrained(tiny.mllm, load_checkpoint(tiny.adapter))
    sdxl = load_sdxl(tiny.base_model, torch.float32)
    items = D.read_items(dataset)
    ds = D.TrainDataset(
        items,
        dataset.parent,
        mllm=D.MllmPreprocessor.from_encoder(encoder),
        clip_tokenizers=(sdxl.tokenizer, sdxl.tokenizer_2),
        resolution=64,
        image_drop_rate=0.0,
        text_drop_rate=0.0,
        both_drop_rate=0.0,
    )
    sample = ds[0]
    assert (
        sample["pixel_values"].shape == (3, 64, 64)
        and -1.0 <= sample["pixel_values"].min() < sample["pixel_values"].max() <= 1.0
    )
    # 80x64 target: short side → 64, centre crop of the 80-wide image (left 8); SDXL time ids
    assert sample["original_size"].tolist() == [64, 80] and sample["crop_top_left"].tolist() == [0, 8]
    assert sample["target_size"].tolist() == [64, 64]
    text = encoder.tokenizer.decode(sample["mllm_input_ids"][0])
    assert INSTRUCTION + sample["caption"] in text and text.count("<|vision_start|>") == sample["num_references"] == 3
    assert (
        sample["mllm_input_ids"].shape[1]
        == sum(1 for t in sample["mllm_input_ids"][0] if t != encoder.image_token_id) + sample["ref_tokens"]
    )
    # an image that is its own reference is shown to the MLLM with exactly the target's resize and crop
    seen = []
    ds_seen = copy.copy(ds)
    ds_seen.mllm = lambda images, caption: seen.append(images) or ds.mllm(images, caption)
    own = ds_seen[1]
    assert own["num_references"] == 1 and own["caption"] == "a picture of shapes" and seen[0][0].size == (64, 64)
    target = ((own["pixel_values"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(target, torch.from_numpy(np.array(seen[0][0])))
    # dropped image: one black 512² reference, caption kept
    ds_drop = copy.copy(ds)
    ds_drop.plan_kwargs = dict(ds.plan_kwargs, image_drop_rate=1.0)
    dropped = ds_drop[0]
    assert dropped["num_references"] == 1 and dropped["caption"] in ("group 0 shapes", "coloured shapes")
    black = encoder.prepare_images([D.black_reference()])
    assert torch.equal(dropped["ref_pixel_values"], black.pixel_values)
    # the same (seed, epoch, index) gives the same sample
    assert torch.equal(ds[0]["mllm_input_ids"], sample["mllm_input_ids"])
    # aspect mode: ~resolution² pixels, sides multiples of 64, no crop (time ids say so)
    ds_aspect = copy.copy(ds)
    ds_aspect.resize, ds_aspect.resolution = "aspect", 128
    wide = ds_aspect[0]
    assert wide["pixel_values"].shape == (3, 128, 192)
    assert wide["target_size"].tolist() == [128, 192]
    assert wide["original_size"].tolist() == [128, 192]  # read after adaptive_resize, as the official code does
    assert wide["crop_top_left"].tolist() == [0, 0]
    batch = D.collate([ds[0], ds[2], ds[6]])
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["time_ids"].shape == (3, 6)
    assert [t.shape for t in batch["clip_ids"]] == [(3, 77), (3, 77)]
    assert batch["mllm"]["grid_thw"].shape[0] == sum(batch["num_references"])


# --------------------------------------------------------------------------------------------
# the three stages
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def align_run(tiny, dataset, tmp_path_factory):
    """`easyref train --stage align --init tiny.adapter`, 2 steps, through the CLI (accelerate inside)."""
    out = tmp_path_factory.mktemp("align") / "run"
    res = runner.invoke(
        app,
        cli_args(
            tiny,
            dataset,
            out,
            "--stage",
            "align",
            "--init",
            str(tiny.adapter),
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--learning-rate",
            "1e-3",
        ),
    )
    assert res.exit_code == 0, res.output
    return out


def test_align_cli_run_writes_checkpoints_state_and_log(align_run):
    assert sorted(p.name for p in align_run.glob("checkpoint-*.safetensors")) == [
        "checkpoint-1.safetensors",
        "checkpoint-2.safetensors",
    ]
    log = [json.loads(line) for line in (align_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all({"step", "loss", "lr", "samples_per_s"} <= set(r) and r["loss"] > 0 for r in log)
    assert log[0]["lr"] == pytest.approx(1e-3)
    assert json.loads((align_run / "state" / "trainer_state.json").read_text())["step"] == 2
    assert json.loads((align_run / "run_config.json").read_text())["stage"] == "align"


def test_align_checkpoint_loads_into_encode_and_changes_it(tiny, ref_group, align_run, tmp_path):
    from safetensors import safe_open

    from easyref_cli.commands.encode import encode_group
    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.pipeline import load_sdxl

    ckpt_path = align_run / "checkpoint-2.safetensors"
    ckpt = load_checkpoint(ckpt_path)
    ckpt.check_unet(load_sdxl(tiny.base_model, torch.float32).unet)  # what `easyref generate` checks
    assert not ckpt.has_lora and not ckpt.mllm  # align trains neither (and the init had neither)

    def encode(adapter):
        out = tmp_path / f"{Path(adapter).stem}.safetensors"
        encode_group(
            ref_group,
            caption="a cat",
            mllm=str(tiny.mllm),
            adapter=str(adapter),
            out=out,
            device="cpu",
            dtype="float32",
        )
        with safe_open(str(out), "pt") as f:
            return f.get_tensor("cond"), f.get_tensor("uncond")

    before, after = encode(tiny.adapter), encode(ckpt_path)
    assert before[0].shape == after[0].shape == (64, 64)
    assert (before[0] - after[0]).abs().max() > 1e-3 and (before[1] - after[1]).abs().max() > 1e-3


def test_single_then_multi_stage_train_the_specified_parameters(tiny, dataset, align_run, tmp_path):
    from easyref_cli.model.checkpoint import load_checkpoint, mllm_keys_5_to_445
    from easyref_cli.model.encoder import ReferenceEncoder

    single = make_trainer(
        config(tiny, dataset, tmp_path / "single", stage="single", init=align_run / "checkpoint-2.safetensors")
    )
    assert trainable(single) == expected_names(single, "single")
    single_result = single.run()
    assert single_result.step == 2
    ckpt = load_checkpoint(single_result.checkpoints[-1])
    assert ckpt.lora_rank == 4 and set(ckpt.lora) == set(attention_paths(single))
    # the fine-tuned MLLM is saved in transformers-4.45 names, complete for the official strict loader
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny.mllm)
    last = f"model.layers.{model.config.text_config.num_hidden_layers - 1}."
    official = {k for k in mllm_keys_5_to_445(model.state_dict()) if not k.startswith(last)}  # + lm_head.weight
    from safetensors import safe_open

    with safe_open(str(single_result.checkpoints[-1]), "pt") as f:
        saved = {k[len("multimodal_llm.") :] for k in f.keys() if k.startswith("multimodal_llm.")}
    assert saved == official
    encoder = ReferenceEncoder.from_pretrained(tiny.mllm, ckpt)  # applies the multimodal_llm subset
    assert encoder.num_tokens == 64

    multi = make_trainer(config(tiny, dataset, tmp_path / "multi", stage="multi", init=single_result.checkpoints[-1]))
    assert trainable(multi) == expected_names(multi, "multi") == trainable(single)
    assert multi.dataset.plan_kwargs["truncate_rate"] == 0.4
    assert multi.run().step == 2


def test_training_lora_processors_match_the_merged_inference_model(tiny, dataset, align_run, tmp_path):
    """A trained checkpoint means at inference (LoRA merged + decoupled attention) what it meant in training."""
    from easyref_cli.model import adapter
    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.pipeline import load_sdxl
    from easyref_cli.train import lora

    ckpt = load_checkpoint(tiny.adapter_lora)
    train_unet = load_sdxl(tiny.base_model, torch.float32).unet
    lora.install_train_processors(
        train_unet,
        ip_weights=ckpt.ip,
        lora_rank=ckpt.lora_rank,
        lora_weights=ckpt.lora,
        num_tokens=ckpt.num_tokens,
        cross_attention_dim=ckpt.cross_attention_dim,
    )
    infer_unet = load_sdxl(tiny.base_model, torch.float32).unet
    adapter.merge_lora(infer_unet, ckpt.lora)
    adapter.install_adapter(
        infer_unet, ckpt.ip, num_tokens=ckpt.num_tokens, cross_attention_dim=ckpt.cross_attention_dim
    )
    torch.manual_seed(0)
    args = (torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77 + 64, 64))
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        a = train_unet(*args, added_cond_kwargs=added).sample
        b = infer_unet(*args, added_cond_kwargs=added).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ip, lora_weights = lora.processor_weights(
        {p[: -len(".processor")]: m for p, m in train_unet.attn_processors.items()}
    )
    assert set(ip) == set(ckpt.ip) and set(lora_weights) == set(ckpt.lora)


# --------------------------------------------------------------------------------------------
# learning and resuming
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_masked_mse_weights_the_mask_averaged_per_latent_pixel():
    from easyref_cli.train.trainer import masked_mse

    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    plain = torch.nn.functional.mse_loss(prediction, target)
    for fill in (0.0, 1.0):  # a uniform mask weights nothing more than anything else
        torch.testing.assert_close(masked_mse(prediction, target, torch.full((2, 1, 12, 12), fill), 3.0), plain)
    mask = (torch.rand(2, 1, 12, 12, generator=g) > 0.5).float()  # pixels: 4 × 4 per latent pixel
    weights = np.ones((2, 1, 3, 3))
    for b in range(2):
        for y in range(3):
            for x in range(3):
                weights[b, 0, y, x] = 1 + 3.0 * mask[b, 0, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4].mean().item()
    errors = (prediction - target).numpy() ** 2
    expected = (weights * errors).sum() / (weights.sum() * 4)  # the weighted mean over every latent value
    assert masked_mse(prediction, target, mask, 3.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.fixture
def masked_data(dataset, tmp_path):
    """The module's data with a loss mask per item: its target in grey (so a sample's mask can be checked
    against its target's crop)."""
    import shutil

    from PIL import Image

    root = tmp_path / "masked"
    shutil.copytree(dataset.parent, root)
    items = json.loads(dataset.read_text())
    for item in items:
        target = item.get("target") or item["image_file"]
        item["mask"] = target.replace(".png", "-mask.png")
        Image.open(root / target).convert("L").save(root / item["mask"])
    data = root / "masked.json"
    data.write_text(json.dumps(items))
    return data


def test_loss_masks_are_validated_and_resized_and_cropped_with_their_target(masked_data, tmp_path):
    import types

    from PIL import Image

    from easyref_cli.errors import InputError

    root = masked_data.parent
    items = D.require_valid(D.validate_data(masked_data, root, decode=True), masked_data)
    assert all(item.mask and item.mask in item.files for item in items)
    fake_mllm = lambda refs, caption: (  # noqa: E731
        None,
        types.SimpleNamespace(pixel_values=torch.zeros(1, 1), grid_thw=torch.ones(1, 3), token_counts=[1]),
    )
    grey = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Pillow's RGB → L
    for resize, shape in (("crop", (1, 64, 64)), ("aspect", (1, 64, 128))):  # 80×64 pictures: cropped / widened
        ds = D.TrainDataset(items, root, mllm=fake_mllm, clip_tokenizers=[], resolution=64, resize=resize, masks=True)
        for index in range(len(items)):
            sample = ds[index]
            mask = sample["loss_mask"].numpy()
            assert mask.shape == shape and 0 <= mask.min() and mask.max() <= 1
            target = (sample["pixel_values"].numpy() + 1) * 127.5
            close = np.abs(mask[0] * 255 - np.tensordot(grey, target, axes=1)) <= 2.5  # rounding; bicubic clips
            assert close.mean() > 0.99, (resize, index)
        assert D.collate([ds[0], ds[1]])["loss_mask"].shape == (2, *shape)
    assert "loss_mask" not in D.TrainDataset(items, root, mllm=fake_mllm, clip_tokenizers=[], resolution=64)[0]

    # a mask of the wrong size, a missing one, a malformed key: named before training
    Image.new("L", (64, 64)).save(root / "small.png")
    bad = json.loads(masked_data.read_text())
    bad[0]["mask"], bad[1]["mask"] = "small.png", "nowhere.png"
    (root / "bad.json").write_text(json.dumps(bad))
    problems = D.validate_data(root / "bad.json", root).problems
    assert len(problems) == 1 and "nowhere.png: file not found (item 1)" in problems[0]
    bad[1]["mask"] = bad[2]["mask"]
    (root / "bad.json").write_text(json.dumps(bad))
    problems = D.validate_data(root / "bad.json", root).problems
    assert (
        len(problems) == 1
        and "small.png: loss mask is 64×64, its target g0/ref_03.png is 80×64 (item 0)" in problems[0]
    )
    bad[1]["mask"] = ["a.png"]
    (root / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UsageError, match="item 1: 'mask' must be a non-empty string"):
        D.read_items(root / "bad.json")

    # --mask-weight on data without masks: every item without one is listed
    plain = D.read_items(masked_data.with_name("data.json"))
    with pytest.raises(UsageError, match=r"7 of 7 items have none \(items 0, 1, 2, 3, 4, 5, 6\)"):
        D.require_masks(plain, masked_data)
    with pytest.raises(InputError, match="item 0 has no 'mask'"):
        D.TrainDataset(plain, root, mllm=fake_mllm, clip_tokenizers=[], resolution=64, masks=True)[0]


def test_mask_weight_weights_the_trainer_loss_and_is_off_by_default(tiny, dataset, masked_data, tmp_path):
    import dataclasses

    assert (
        TrainConfig(stage="align", data=dataset, data_root=".", base_model=".", mllm=".", output_dir=".").mask_weight
        == 0
    )
    with pytest.raises(UsageError, match="--mask-weight cannot be negative"):
        config(tiny, masked_data, tmp_path / "negative", mask_weight=-1.0).resolved()
    assert "mask_weight" not in config(tiny, dataset, tmp_path).resolved().run_record()  # older runs still resume
    assert config(tiny, dataset, tmp_path, mask_weight=2.0).resolved().run_record()["mask_weight"] == 2.0

    out = tmp_path / "no-masks"
    res = runner.invoke(app, cli_args(tiny, dataset, out, "--stage", "align", "--mask-weight", "2"))
    assert res.exit_code == 2 and "--mask-weight weights the loss by each item's 'mask'" in res.output, res.output
    assert not out.exists()

    drops = dict(image_drop_rate=0.0, text_drop_rate=0.0, both_drop_rate=0.0)
    trainer = make_trainer(config(tiny, masked_data, tmp_path / "masked", mask_weight=4.0, **drops))
    batch = D.collate([trainer.dataset[0], trainer.dataset[1]])
    generator = torch.Generator().manual_seed(0)
    latents = trainer.encode_latents(batch["pixel_values"], generator)
    fixed = dict(
        latents=latents, noise=torch.randn(latents.shape, generator=generator), timesteps=torch.tensor([250, 600])
    )
    with torch.no_grad():
        masked = trainer.compute_loss(batch, **fixed).item()
        uniform = trainer.compute_loss(batch | {"loss_mask": torch.ones_like(batch["loss_mask"])}, **fixed).item()
        trainer.config = dataclasses.replace(trainer.config, mask_weight=0.0)
        plain = trainer.compute_loss(batch, **fixed).item()
    assert uniform == pytest.approx(plain, rel=1e-5)
    assert abs(masked - plain) > 1e-3 * plain


def test_loss_on_a_fixed_batch_goes_down(tiny, dataset, tmp_path):
    """Alignment from scratch (official initialisation, no --init): overfit one batch, fixed noise and timesteps."""
    trainer = make_trainer(
        config(
            tiny,
            dataset,
            tmp_path / "overfit",
            learning_rate=3e-3,
            max_steps=100,
            image_drop_rate=0.0,
            text_drop_rate=0.0,
            both_drop_rate=0.0,
        )
    )
    assert trainable(trainer) == expected_names(trainer, "align")
    batch = D.collate([trainer.dataset[0], trainer.dataset[1]])
    generator = torch.Generator().manual_seed(0)
    latents = trainer.encode_latents(batch["pixel_values"], generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([250, 600])
    fixed = dict(latents=latents, noise=noise, timesteps=timesteps)
    losses = [trainer.train_step(batch, **fixed).item() for _ in range(30)]
    with torch.no_grad():
        final = trainer.compute_loss(batch, **fixed).item()
    # only the reference path trains (the random UNet stays frozen), so the reachable drop is modest
    assert final < losses[-1] < losses[15] < losses[0], losses
    assert final < 0.95 * losses[0], losses


def test_resume_continues_from_the_saved_step_with_identical_optimizer_state(tiny, dataset, tmp_path):
    """Stop at step 5 (7 items, batch 2: epoch 1, one batch in), resume to 7, compare with a straight run to 7."""
    from safetensors.torch import load_file

    init = dict(
        init=tiny.adapter,
        learning_rate=1e-3,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=10,
        batch_size=2,
        save_steps=5,
    )
    first = make_trainer(config(tiny, dataset, tmp_path / "run", max_steps=5, **init))
    first.run()
    optimizer_state = copy.deepcopy(first.optimizer.state_dict())
    scheduler_state = copy.deepcopy(first.lr_scheduler.state_dict())

    resumed = make_trainer(config(tiny, dataset, tmp_path / "run", max_steps=7, resume=True, **init))
    assert (resumed.step, resumed.epoch, resumed.batches_in_epoch) == (5, 1, 1) and resumed.resumed_from == 5
    state = resumed.optimizer.state_dict()
    assert state["param_groups"] == optimizer_state["param_groups"]
    assert state["state"].keys() == optimizer_state["state"].keys() and len(state["state"]) == len(
        resumed.trainable_params
    )
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            assert torch.equal(state["state"][index][key], value), (index, key)
    assert resumed.lr_scheduler.state_dict() == scheduler_state
    assert resumed.run().step == 7
    log = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6, 7]

    # an uninterrupted run to step 7 ends with the same weights: same data order, augmentation and noise
    straight = make_trainer(config(tiny, dataset, tmp_path / "straight", max_steps=7, **init))
    straight.run()
    a = load_file(str(tmp_path / "run" / "checkpoint-7.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoint-7.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_output_dir_and_resume_guards(tiny, dataset, align_run, tmp_path):
    """A finished run is not overwritten; --resume refuses changed options. Both before any model loads."""
    res = runner.invoke(app, cli_args(tiny, dataset, align_run, "--stage", "align", "--init", str(tiny.adapter)))
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(
        app,
        cli_args(
            tiny,
            dataset,
            align_run,
            "--stage",
            "align",
            "--init",
            str(tiny.adapter),
            "--resume",
            "--learning-rate",
            "5e-4",
        ),
    )
    assert res.exit_code == 2 and "learning_rate" in res.output
    res = runner.invoke(app, cli_args(tiny, dataset, tmp_path / "fresh", "--stage", "align", "--resume"))
    assert res.exit_code == 2 and "no saved training state" in res.output
    res = runner.invoke(app, cli_args(tiny, dataset, tmp_path / "tb", "--stage", "align", "--report-to", "wandb"))
    assert res.exit_code == 2 and "--report-to" in res.output


def test_ctrl_c_saves_at_the_next_step_and_exits_130(tiny, dataset, tmp_path, monkeypatch):
    from easyref_cli.train.trainer import Trainer

    original = Trainer.run

    def run_with_ctrl_c(self):
        self._stop = True  # what the first Ctrl-C sets
        return original(self)

    out = tmp_path / "run"
    args = cli_args(tiny, dataset, out, "--stage", "align", "--init", str(tiny.adapter), "--save-steps", "100")
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run", run_with_ctrl_c)
        res = runner.invoke(app, [*args, "--max-steps", "5"])
    assert res.exit_code == 130, res.output
    assert (out / "checkpoint-1.safetensors").is_file()
    assert json.loads((out / "state" / "trainer_state.json").read_text())["step"] == 1
    with (out / "train_log.jsonl").open("a") as log:  # a step logged after the last save (e.g. a crash)
        log.write(json.dumps({"step": 2, "loss": 9.0}) + "\n")
    res = runner.invoke(app, [*args, "--max-steps", "2", "--resume"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[1]["loss"] != 9.0  # trained again, logged once


def test_tensorboard_is_optional(tiny, dataset, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    res = runner.invoke(app, cli_args(tiny, dataset, tmp_path / "tb", "--stage", "align", "--report-to", "tensorboard"))
    assert res.exit_code == 2 and "pip install tensorboard" in res.output


@pytest.mark.slow
def test_accelerate_launch_two_processes(tiny, dataset, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo): train, save, resume."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "easyref_train.py"
    script.write_text(
        "import typer\n"
        "from easyref_cli.clitools import handle_errors\n"
        "from easyref_cli.train.command import train_command\n"
        "app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)\n"
        "app.command('train')(handle_errors(train_command))\n"
        "app.callback()(lambda: None)\n"
        "app()\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "run"

    def launch(*extra):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            str(script),
            *cli_args(
                tiny,
                dataset,
                out,
                "--stage",
                "single",
                "--init",
                str(tiny.adapter_lora),
                "--gradient-accumulation",
                "2",
                "--save-steps",
                "1",
                *extra,
            ),
        ]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    first = launch("--max-steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch("--max-steps", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # one line per step: only the main process writes
    state = out / "state"
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()
    from easyref_cli.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "checkpoint-2.safetensors")
    assert ckpt.lora_rank == 4 and ckpt.mllm


@pytest.mark.parametrize("doc", ["README.md", "docs/TRAINING.md"])
def test_documented_recipe_counts_optimizer_steps(doc):
    """Each stage's --init is the previous stage's last checkpoint, numbered in optimizer steps
    (the official global_step counts micro-batches: its checkpoint-250000 is 125,000 of ours)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    commands = re.findall(r"easyref train --stage.*?(?=\n\S|\n\n|\Z)", text, flags=re.S)
    steps = {}
    for command in commands:
        stage, max_steps = re.search(r"--stage\s+(\w+)", command), re.search(r"--max-steps\s+(\d+)", command)
        if max_steps is None:  # --check-data and the like
            continue
        steps[stage.group(1)] = int(max_steps.group(1))
        init = re.search(r"--init\s+runs/(\w+)/checkpoint-(\d+)", command)
        if init:
            assert int(init.group(2)) == steps[init.group(1)], command
    assert steps["single"] == 125_000  # the official stage-2 run in optimizer steps
    assert "micro-batches" in text
