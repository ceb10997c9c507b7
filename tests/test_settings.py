"""The settings schema: everything derived from one definition, and a setting added through it.

``guidance_rescale`` is the proof: added after record schema 1 as one field in ``settings.py`` plus
its use in ``model/pipeline.py``, it reaches the CLI, prompt files, presets, the job id, the PNG
record, replay, the batch key and diffusers, and at its default it changes no existing job id or
record byte.
"""

from __future__ import annotations

import ast
import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from easyref_cli import plan as P
from easyref_cli import prompts, records, settings
from easyref_cli.cli import app
from easyref_cli.errors import InputError, UsageError
from easyref_cli.settings import DEFAULTS, SPECS, GenerationSettings, identity_values, pipeline_values
from easyref_cli.testing import make_reference_images

PACKAGE = Path(__file__).resolve().parents[1] / "easyref_cli"


@pytest.fixture
def refs(tmp_path):
    make_reference_images(tmp_path / "refs" / "cats", n=2, size=(16, 16))
    return tmp_path / "refs"


def _plan(tmp_path, refs, **kw):
    return P.build_plan(groups=[refs], out_dir=tmp_path / "out", prompt="a cat", **kw)


# ----------------------------------------------------------------------------------------------
# Derived, not repeated
# ----------------------------------------------------------------------------------------------


def test_pipeline_settings_are_request_fields_with_the_same_defaults():
    from easyref_cli.model.pipeline import GenerationRequest

    request = {f.name: f.default for f in fields(GenerationRequest)}
    for key, value in pipeline_values(GenerationSettings()).items():
        assert key in request, f"{key} is a pipeline setting but not a GenerationRequest field"
        if key not in ("seed", "scheduler"):  # a request's scheduler None keeps the pipeline's own
            assert request[key] == value, key


def test_keys_of_prompt_files_presets_and_records_come_from_the_schema():
    from easyref_cli.presets import PRESET_KEYS

    assert set(PRESET_KEYS) == set(SPECS) | {"description"}
    assert set(prompts.PROMPT_KEYS) == {s for s, spec in SPECS.items() if spec.per_prompt} | {
        "prompt", "id", "seeds", "groups", "control",
    }  # fmt: skip
    assert set(settings.record_types()) == set(settings.IDENTITY_KEYS)
    assert all(SPECS[k].identity for k in pipeline_values(GenerationSettings()))  # pixels → job id


def test_every_flagged_setting_is_a_generate_option_with_its_default():
    res = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "400"})
    text = " ".join(res.output.split())
    for key, spec in SPECS.items():
        for flag in spec.flags:
            assert flag in text, flag
        if spec.flags:
            assert spec.cli_help(DEFAULTS[key]) in text, key


def test_no_module_spells_out_a_list_of_setting_names():
    """Only settings.py may hold a literal collection of setting keys (one definition)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in SPECS]
                if len(names) >= 3:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {names}")
    assert not offenders, offenders


def test_validation_wording_is_shared(tmp_path, refs):
    with pytest.raises(UsageError, match="--guidance-rescale: must be ≤ 1.0, got 2.0"):
        _plan(tmp_path, refs, cli={"guidance_rescale": 2.0})
    (tmp_path / "p.yaml").write_text("defaults:\n  guidance_rescale: -1\nprompts: [a]\n")
    with pytest.raises(UsageError, match=r"p\.yaml:2: defaults\.guidance_rescale: must be ≥ 0.0"):
        P.build_plan(groups=[refs], out_dir=tmp_path / "o", prompts_file=tmp_path / "p.yaml")


# ----------------------------------------------------------------------------------------------
# guidance_rescale end to end through the schema
# ----------------------------------------------------------------------------------------------


def test_new_setting_at_its_default_changes_no_job_id_or_record(tmp_path, refs):
    plain = _plan(tmp_path, refs).jobs[0]
    explicit = _plan(tmp_path, refs, cli={"guidance_rescale": 0}).jobs[0]
    rescaled = _plan(tmp_path, refs, cli={"guidance_rescale": 0.7}).jobs[0]
    assert explicit.job_id == plain.job_id and rescaled.job_id != plain.job_id
    assert "guidance_rescale" not in identity_values(plain.settings)
    assert (
        records.job_record(plain, {"base_model": "b", "mllm": "m", "adapter": "a"}).keys()
        == records.job_record(explicit, {"base_model": "b", "mllm": "m", "adapter": "a"}).keys()
    )
    assert identity_values(rescaled.settings)["guidance_rescale"] == 0.7


def test_new_setting_from_prompt_file_and_preset(tmp_path, refs):
    (tmp_path / "preset.yaml").write_text("guidance_rescale: 0.3\n")
    (tmp_path / "p.yaml").write_text("prompts:\n  - a\n  - prompt: b\n    guidance_rescale: 0.9\n")
    plan = P.build_plan(
        groups=[refs], out_dir=tmp_path / "o", prompts_file=tmp_path / "p.yaml", preset=str(tmp_path / "preset.yaml")
    )
    assert [j.settings.guidance_rescale for j in plan.jobs] == [0.3, 0.9]


def test_new_setting_replays_and_old_records_default_it(tmp_path, refs):
    job = _plan(tmp_path, refs, cli={"guidance_rescale": 0.5}).jobs[0]
    record = records.job_record(job, {"base_model": "b", "mllm": "m", "adapter": "a"})
    assert records.parse_record(record).settings == job.settings
    old = {k: v for k, v in record.items() if k != "guidance_rescale"}
    assert records.parse_record(old).settings.guidance_rescale == 0.0
    with pytest.raises(InputError, match="guidance_rescale: unexpected value 'x'"):
        records.parse_record({**record, "guidance_rescale": "x"})


def test_requests_with_other_rescale_are_not_batched():
    from easyref_cli.model.pipeline import GenerationRequest

    a = GenerationRequest(prompt="p", ref_embeds=None, seed=1)
    assert a.batch_key() == replace(a, seed=2, prompt="q").batch_key()
    assert a.batch_key() != replace(a, guidance_rescale=0.7).batch_key()


def test_rescale_reaches_diffusers_and_changes_pixels(tiny, ref_group, monkeypatch):
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl as sdxl_module
    import numpy as np

    from easyref_cli.files import load_image
    from easyref_cli.model.pipeline import EasyRefPipeline

    seen = []
    real = sdxl_module.rescale_noise_cfg
    monkeypatch.setattr(
        sdxl_module, "rescale_noise_cfg", lambda *a, **k: seen.append(k.get("guidance_rescale")) or real(*a, **k)
    )
    pipe = EasyRefPipeline.from_pretrained(tiny.base_model, tiny.mllm, tiny.adapter_lora, device="cpu")
    embeds = pipe.encode_references([load_image(p) for p in sorted(ref_group.iterdir())], "a cat")
    kw = dict(ref_embeds=embeds, seed=3, steps=2, width=64, height=64, guidance=7.0)
    plain, zero = pipe("a cat", **kw), pipe("a cat", guidance_rescale=0.0, **kw)
    rescaled = pipe("a cat", guidance_rescale=0.7, **kw)
    assert seen == [0.7, 0.7]  # diffusers rescales only when asked, once per step
    assert np.array_equal(np.asarray(plain), np.asarray(zero))
    assert not np.array_equal(np.asarray(plain), np.asarray(rescaled))


def test_cli_flag_record_and_replay(tiny, tmp_path, refs):
    runner = CliRunner()
    models = ["--base-model", str(tiny.base_model), "--mllm", str(tiny.mllm), "--adapter", str(tiny.adapter_lora)]
    common = [*models, "--device", "cpu", "--width", "64", "--height", "64", "--steps", "2", "-q", "--no-cache"]
    res = runner.invoke(app, ["generate", str(refs), "--prompt", "a cat", "-o", str(tmp_path / "a"),
                              "--guidance-rescale", "0.7", *common])  # fmt: skip
    assert res.exit_code == 0, res.output
    [png] = sorted((tmp_path / "a").rglob("*.png"))
    record = records.parse_record(json.loads(__import__("PIL.Image").Image.open(png).text["easyref"]))
    assert record.settings.guidance_rescale == 0.7
    res = runner.invoke(app, ["generate", "--from-image", str(png), "-o", str(tmp_path / "b"), *models, "--groups-root", str(refs),
                              "--device", "cpu", "-q", "--no-cache"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / png.relative_to(tmp_path / "a")).read_bytes() == png.read_bytes()


# ----------------------------------------------------------------------------------------------
# zero_negative: records made before it keep their meaning
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "negative, mode, kept",
    [
        ("blurry", "never", False),  # encoded, as before: same pixels, same id
        ("blurry", "empty", False),
        ("blurry", "always", True),
        ("", "never", True),  # encodes "" where records without the key zeroed (SDXL config): a new job
        ("", "empty", False),  # what an empty negative meant before
        ("", "always", True),
    ],
)
def test_zero_negative_is_recorded_only_where_it_changes_the_meaning(negative, mode, kept):
    s = GenerationSettings(negative_prompt=negative, zero_negative=mode)
    assert ("zero_negative" in identity_values(s)) is kept
    replayed = settings.from_record(identity_values(s))  # what a record of it replays as
    assert identity_values(replayed) == identity_values(s)  # the same job
    if kept or mode == "never":
        assert replayed.zero_negative == mode


def test_old_records_with_an_empty_negative_replay_with_zeroed_negatives():
    old = {
        "prompt": "p", "negative_prompt": "", "caption": "p", "instruction": "i", "seed": 1, "steps": 2,
        "guidance": 5.0, "scale": 1.0, "width": 64, "height": 64, "scheduler": "euler", "references": [{"path": "/x"}],
    }  # fmt: skip
    assert records.parse_record(old).settings.zero_negative == "empty"
    assert records.parse_record({**old, "negative_prompt": "x"}).settings.zero_negative == "never"


def test_default_negative_is_the_official_one_and_empty_is_another_job(tmp_path, refs):
    from easyref_cli.constants import OFFICIAL_NEGATIVE_PROMPT

    default = _plan(tmp_path, refs).jobs[0]
    assert default.settings.negative_prompt == OFFICIAL_NEGATIVE_PROMPT
    empty = _plan(tmp_path, refs, cli={"negative_prompt": ""}).jobs[0]
    zeroed = _plan(tmp_path, refs, cli={"negative_prompt": "", "zero_negative": "empty"}).jobs[0]
    assert len({default.job_id, empty.job_id, zeroed.job_id}) == 3
    assert "zero_negative" not in identity_values(zeroed.settings)  # the id an empty negative always had


def test_exif_orientation_enters_the_job_only_when_ignored(tmp_path, refs):
    apply = _plan(tmp_path, refs).jobs[0]
    ignore = _plan(tmp_path, refs, cli={"exif_orientation": "ignore"}).jobs[0]
    assert "exif_orientation" not in identity_values(apply.settings)
    assert identity_values(ignore.settings)["exif_orientation"] == "ignore" and ignore.job_id != apply.job_id
    record = records.job_record(ignore, {"base_model": "b", "mllm": "m", "adapter": "a"})
    assert records.parse_record(record).settings.exif_orientation == "ignore"


def test_generate_feeds_raw_pixels_when_exif_is_ignored(tiny, tmp_path):
    from PIL import Image

    from easyref_cli.testing import make_reference_images

    [src] = make_reference_images(tmp_path / "src", n=1, size=(64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "g" / "tagged").mkdir(parents=True)
    Image.open(src).save(tmp_path / "g" / "tagged" / "a.png", exif=exif)
    models = ["--base-model", str(tiny.base_model), "--mllm", str(tiny.mllm), "--adapter", str(tiny.adapter_lora)]
    common = [*models, "--device", "cpu", "--width", "64", "--height", "64", "--steps", "1", "-q"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    runs = {}
    for mode in ("apply", "ignore"):
        out = tmp_path / mode
        args = ["generate", str(tmp_path / "g"), "--prompt", "a cat", "-o", str(out), "--exif-orientation", mode]
        res = CliRunner().invoke(app, [*args, *common, *cache])
        assert res.exit_code == 0, res.output
        runs[mode] = (out / "tagged" / "a-cat_0.png").read_bytes()
    assert runs["apply"] != runs["ignore"]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3  # two conditions, one uncond


def test_official_seed_mode_in_plans_records_and_errors(tmp_path, refs):
    cpu = _plan(tmp_path, refs, cli={"images_per_prompt": 3}).jobs
    official = _plan(tmp_path, refs, cli={"images_per_prompt": 3, "seed_mode": "official"}).jobs
    other_n = _plan(tmp_path, refs, cli={"images_per_prompt": 4, "seed_mode": "official"}).jobs
    assert "images_per_prompt" not in identity_values(cpu[1].settings)
    assert identity_values(official[1].settings)["images_per_prompt"] == 3  # the stream's size is in the job
    assert official[1].job_id not in {cpu[1].job_id, other_n[1].job_id}
    record = records.job_record(official[2], {"base_model": "b", "mllm": "m", "adapter": "a"})
    replay = records.parse_record(record)
    assert (replay.settings.seed_mode, replay.settings.images_per_prompt, replay.index) == ("official", 3, 2)
    (tmp_path / "p.yaml").write_text("prompts:\n  - prompt: a\n    seeds: [1, 5]\n")
    with pytest.raises(UsageError, match="give seed and images_per_prompt, not seeds"):
        P.build_plan(groups=[refs], out_dir=tmp_path / "o", prompts_file=tmp_path / "p.yaml",
                     cli={"seed_mode": "official"})  # fmt: skip
    with pytest.raises(UsageError, match="per-step noise of the euler_a scheduler"):
        _plan(tmp_path, refs, cli={"seed_mode": "official", "scheduler": "euler_a"})


def test_official_seed_mode_replays_from_the_record(tiny, tmp_path, refs):
    runner = CliRunner()
    models = ["--base-model", str(tiny.base_model), "--mllm", str(tiny.mllm), "--adapter", str(tiny.adapter_lora)]
    common = [*models, "--device", "cpu", "-q", "--no-cache"]
    size = ["--width", "64", "--height", "64", "--steps", "2"]
    res = runner.invoke(app, ["generate", str(refs), "--prompt", "a cat", "-o", str(tmp_path / "a"), "-n", "2",
                              "--seed", "9", "--seed-mode", "official", *size, *common])  # fmt: skip
    assert res.exit_code == 0, res.output
    second = tmp_path / "a" / "cats" / "a-cat_10.png"
    res = runner.invoke(
        app, ["generate", "--from-image", str(second), "-o", str(tmp_path / "b"), *common, "--groups-root", str(refs)]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "cats" / "a-cat_10.png").read_bytes() == second.read_bytes()


def test_official_mode_ids_follow_the_noise_stream_not_just_the_seed(tmp_path, refs):
    """seed 0 -n 2 makes image 'seed 1' from stream 0, slice 1; seed 1 -n 2 makes it from stream 1,
    slice 0: the same output name, another picture, so another job (resume must not keep it)."""
    a = _plan(tmp_path, refs, cli={"seed": 0, "images_per_prompt": 2, "seed_mode": "official"}).jobs[1]
    b = _plan(tmp_path, refs, cli={"seed": 1, "images_per_prompt": 2, "seed_mode": "official"}).jobs[0]
    assert a.output == b.output and a.seed == b.seed == 1
    assert a.job_id != b.job_id
    cpu_a = _plan(tmp_path, refs, cli={"seed": 0, "images_per_prompt": 2}).jobs[1]
    cpu_b = _plan(tmp_path, refs, cli={"seed": 1, "images_per_prompt": 2}).jobs[0]
    assert cpu_a.job_id == cpu_b.job_id  # one CPU generator per image: the seed alone decides


def _official_png(tmp_path, refs, device: str) -> tuple[Path, P.Plan]:
    from PIL import Image

    from easyref_cli import files

    plan = _plan(tmp_path, refs, cli={"seed_mode": "official"}, device="cpu")
    job = plan.jobs[0]
    record = {**records.job_record(job, plan.models.as_dict()), "device": device}
    path = plan.output_path(job)
    files.write_png_atomic(path, Image.new("RGB", (8, 8)), record=record)
    return path, plan


def test_official_mode_noise_device_is_part_of_resume_and_replay(tmp_path, refs):
    from easyref_cli.resume import check_existing_outputs

    path, plan = _official_png(tmp_path, refs, "cuda")
    with pytest.raises(UsageError, match="made with other settings"):
        check_existing_outputs(plan)  # same job id, but its noise came from a CUDA stream
    assert P.build_plan(from_image=path, out_dir=tmp_path / "r").device == "cuda"
    with pytest.raises(UsageError, match="drawn on cuda; replay it with --device cuda"):
        P.build_plan(from_image=path, out_dir=tmp_path / "r", device="cpu")
    path, plan = _official_png(tmp_path / "cpu", refs, "cpu")
    check_existing_outputs(plan)  # the same stream: resume keeps it


def test_record_schema_says_when_a_record_needs_a_newer_reader(tmp_path, refs):
    models = {"base_model": "b", "mllm": "m", "adapter": "a"}
    plain = records.job_record(_plan(tmp_path, refs).jobs[0], models)
    rescaled = records.job_record(_plan(tmp_path, refs, cli={"guidance_rescale": 0.5}).jobs[0], models)
    assert plain["schema"] == 1 and rescaled["schema"] == 2  # schema 1 while 0.1 reads it right
    with pytest.raises(InputError, match="schema 4, newer than this easyref-cli reads"):
        records.parse_record({**plain, "schema": 4})


def test_a1111_text_leaves_out_a_negative_prompt_that_was_zeroed():
    from easyref_cli.files import format_parameters

    record = {"prompt": "p", "negative_prompt": "blurry", "steps": 2}
    assert "Negative prompt: blurry" in format_parameters(record)
    assert "Negative prompt" not in format_parameters({**record, "zero_negative": "always"})
