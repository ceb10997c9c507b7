"""`easyref generate` (and inspect / presets / doctor) through the real Typer app, in process.

The contract is issue 3: output count, provenance round trip, precedence, resume, exit codes,
bad inputs and determinism. Models are the session's tiny random models (64², 2 steps: an image
costs a fraction of a second), always passed as explicit local paths. Subprocess tests (SIGINT,
the installed script, torch-free dry run) live in ``test_cli_subprocess.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from easyref_cli import files
from easyref_cli.cli import app
from easyref_cli.constants import OFFICIAL_NEGATIVE_PROMPT
from easyref_cli.model import hub
from easyref_cli.plan import build_plan
from easyref_cli.records import job_record
from easyref_cli.runlog import RunSummary
from easyref_cli.testing import make_reference_images, tiny_cli_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

cli = CliRunner()

#: An mtime far in the past: files that keep it were not rewritten.
OLD_NS = 1_000_000_000 * 1_000_000_000


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def model_args(tiny) -> list[str]:
    return tiny_cli_args(tiny, batch_size=None)


def make_groups(root: Path, names=("alpha", "beta"), n: int = 2, size=(64, 48)) -> Path:
    """A parent folder holding one sub-folder of reference images per name."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        make_reference_images(root / name, n=n, size=size, seed=i)
    return root


def write_prompts(path: Path, prompts: list, defaults: dict | None = None) -> Path:
    data: dict = {}
    if defaults:
        data["defaults"] = defaults
    data["prompts"] = prompts
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args], catch_exceptions=False)


def generate(tiny, *args):
    return invoke("generate", *args, *model_args(tiny), "-q")


def read_manifest(out: Path) -> list[dict]:
    """Every manifest line, each of which must be a JSON object."""
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    assert all(isinstance(e, dict) for e in entries)
    return entries


def pngs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.png"))


def record_of(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["easyref"])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def no_tmp_files(out: Path) -> bool:
    return not [n for _, _, names in os.walk(out) for n in names if n.endswith(".tmp")]


@pytest.fixture
def forbid_model_load(monkeypatch):
    """Any attempt to resolve or load a model fails the test."""
    _forbid(monkeypatch)


def _forbid(monkeypatch) -> None:
    def boom(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    from easyref_cli import run
    from easyref_cli.model.encoder import ReferenceEncoder
    from easyref_cli.model.pipeline import EasyRefPipeline

    monkeypatch.setattr(run, "resolve_models", boom)
    monkeypatch.setattr(ReferenceEncoder, "from_pretrained", boom)
    monkeypatch.setattr(EasyRefPipeline, "from_pretrained", boom)
    monkeypatch.setattr(hub, "resolve_folder", boom)
    monkeypatch.setattr(hub, "resolve_checkpoint", boom)


# ----------------------------------------------------------------------------------------------
# 1. Output count, layout, manifest  (one shared 2 groups × 2 prompts × 2 seeds run)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("base_run")
    groups = make_groups(root / "groups")
    prompts = write_prompts(
        root / "prompts.yaml",
        ["a watercolor lighthouse", {"prompt": "a robot", "id": "robot", "seed": 7}],
        defaults={"images_per_prompt": 2},
    )
    out = root / "out"
    res = generate(tiny, groups, "--prompts", prompts, "-o", out, "--cache-dir", root / "cache", "--batch-size", "1")
    return {"res": res, "groups": groups, "prompts": prompts, "out": out, "root": root}


def test_output_count_layout_and_manifest(base_run):
    res, out = base_run["res"], base_run["out"]
    assert res.exit_code == 0, res.output
    expected = {
        f"{g}/{p}_{s}.png"
        for g in ("alpha", "beta")
        for p, seeds in (("a-watercolor-lighthouse", (0, 1)), ("robot", (7, 8)))
        for s in seeds
    }
    assert {p.relative_to(out).as_posix() for p in pngs(out)} == expected
    entries = read_manifest(out)
    assert len(entries) == 8 and all(e["status"] == "ok" for e in entries)
    assert {Path(e["path"]).relative_to(out).as_posix() for e in entries} == expected
    assert len({e["job_id"] for e in entries}) == 8
    assert no_tmp_files(out)


# ----------------------------------------------------------------------------------------------
# 2. Provenance round trip: inspect, --parameters, --from-image
# ----------------------------------------------------------------------------------------------


def test_inspect_prints_the_full_record(base_run, tiny):
    png = base_run["out"] / "beta" / "robot_8.png"
    res = invoke("inspect", png)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record == record_of(png)
    assert record["prompt"] == "a robot" and record["caption"] == "a robot"
    assert record["seed"] == 8 and record["steps"] == 2 and record["guidance"] == 5.0
    assert (record["width"], record["height"], record["scheduler"]) == (64, 64, "euler")
    assert record["group"] == "beta" and record["prompt_id"] == "robot"
    assert record["instruction"].startswith("Visualize a scene")
    refs = sorted((base_run["groups"] / "beta").iterdir())
    # shareable by default: references relative to the groups root, local models by name
    assert [r["path"] for r in record["references"]] == [f"beta/{p.name}" for p in refs]
    assert [r["sha256"] for r in record["references"]] == [sha256(p) for p in refs]
    assert record["adapter_sha256"] == sha256(tiny.adapter_lora)
    assert record["base_model"] == tiny.base_model.name and record["mllm"] == tiny.mllm.name
    assert record["adapter"] == tiny.adapter_lora.name
    assert "carries" not in res.stdout and "AI label (XMP DigitalSourceType): trainedAlgorithmicMedia" in res.stderr
    for package in ("easyref-cli", "torch", "diffusers", "transformers"):
        assert record["versions"][package]
    assert record["attention"]["backend"] in ("sdpa", "xformers")
    assert record["attention"]["requested"] == "auto"
    assert "timings" not in record  # wall-clock times would make identical jobs differ in bytes
    line = next(e for e in read_manifest(base_run["out"]) if e["status"] == "ok" and e["path"].endswith("robot_7.png"))
    assert {"encode_s", "generate_s", "batch_size"} <= set(line["timings"])


def test_inspect_parameters_prints_a1111_text(base_run):
    png = base_run["out"] / "alpha" / "robot_7.png"
    res = invoke("inspect", png, "--parameters")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "a robot"
    assert lines[1] == f"Negative prompt: {OFFICIAL_NEGATIVE_PROMPT}"  # the built-in default
    assert len(lines) == 3
    for part in ("Steps: 2", "Sampler: Euler", "CFG scale: 5.0", "Seed: 7", "Size: 64x64", "EasyRef references: 2"):
        assert part in lines[2]
    with Image.open(png) as im:
        assert im.text["parameters"] == res.stdout.strip()


def test_inspect_rejects_a_plain_png(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    res = invoke("inspect", plain)
    assert res.exit_code == 2
    assert "plain.png" in res.stderr and "easyref" in res.stderr


@pytest.fixture(scope="module")
def from_image_run(base_run, tiny):
    png = base_run["out"] / "alpha" / "robot_8.png"
    out2 = base_run["root"] / "out_from_image"
    res = invoke(
        "generate", "--from-image", png, "-o", out2, "--device", "cpu", "-q", "--no-cache",
        "--groups-root", base_run["groups"], *model_args(tiny)[:6],
    )  # fmt: skip
    return {"res": res, "src": png, "dst": out2 / "alpha" / "robot_8.png", "out": out2}


def test_from_image_regenerates_the_same_picture(from_image_run):
    run = from_image_run
    assert run["res"].exit_code == 0, run["res"].output
    assert pngs(run["out"]) == [run["dst"]]
    assert np.array_equal(pixels(run["dst"]), pixels(run["src"]))
    old, new = record_of(run["src"]), record_of(run["dst"])
    assert new == old


def test_from_image_regenerates_identical_bytes(from_image_run):
    assert from_image_run["res"].exit_code == 0
    assert from_image_run["dst"].read_bytes() == from_image_run["src"].read_bytes()


def _record_png(tmp_path: Path) -> tuple[Path, Path]:
    """A PNG carrying a planning record (no model run): (png, its group folder)."""
    from easyref_cli.plan import build_plan
    from easyref_cli.records import job_record

    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    plan = build_plan(groups=[groups], out_dir=out, prompt="p", cli={"width": 64, "height": 64, "steps": 2})
    png = out / "alpha" / "p_0.png"
    files.write_png_atomic(png, Image.new("RGB", (64, 64)), record=job_record(plan.jobs[0], plan.models.as_dict()))
    return png, groups / "alpha"


def test_from_image_dry_run_uses_the_record(tmp_path, forbid_model_load):
    png, _ = _record_png(tmp_path)
    res = invoke("generate", "--from-image", png, "-o", tmp_path / "out2", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    [job] = [json.loads(line) for line in res.stdout.splitlines()]
    assert (job["prompt"], job["seed"], job["steps"], job["width"], job["output"]) == ("p", 0, 2, 64, "alpha/p_0.png")
    assert not (tmp_path / "out2").exists()


def test_from_image_does_not_silently_ignore_flags(tmp_path, forbid_model_load):
    png, _ = _record_png(tmp_path)
    res = invoke("generate", "--from-image", png, "-o", tmp_path / "out2", "--steps", "50", "--dry-run", "--json")
    if res.exit_code == 2:
        assert "--steps" in res.stderr
    else:
        assert json.loads(res.stdout.splitlines()[0])["steps"] == 50


def test_from_image_refuses_changed_references(tmp_path, forbid_model_load):
    png, group = _record_png(tmp_path)
    make_reference_images(group, n=2, size=(64, 48), seed=5)  # overwrite the references
    res = invoke("generate", "--from-image", png, "-o", tmp_path / "out2", "--device", "cpu")
    assert res.exit_code == 2
    assert "has changed" in res.stderr and "ref_00.png" in res.stderr
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------------------
# 7. Determinism: same command twice, batch size 1 vs 2
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repeat_run(base_run, tiny):
    out = base_run["root"] / "out_again"
    # No condition cache: the second run recomputes everything. The same batch size as the first run:
    # another one may round a pixel to the next 8-bit level (test_batch_size_does_not_change_pictures),
    # as it does on AVX-512 CPUs for the automatic batch size against 1.
    res = generate(
        tiny, base_run["groups"], "--prompts", base_run["prompts"], "-o", out, "--no-cache", "--batch-size", "1"
    )
    return {"res": res, "out": out}


@pytest.fixture(scope="module")
def batch2_run(base_run, tiny):
    out = base_run["root"] / "out_batch2"
    res = generate(
        tiny,
        base_run["groups"],
        "--prompts",
        base_run["prompts"],
        "-o",
        out,
        "--batch-size",
        "2",
        "--cache-dir",
        base_run["root"] / "cache",
    )
    return {"res": res, "out": out}


def _rel_pngs(out: Path) -> list[str]:
    return [p.relative_to(out).as_posix() for p in pngs(out)]


def test_same_command_twice_gives_identical_pictures_and_records(base_run, repeat_run):
    assert repeat_run["res"].exit_code == 0, repeat_run["res"].output
    a, b = base_run["out"], repeat_run["out"]
    assert _rel_pngs(a) == _rel_pngs(b) and len(_rel_pngs(a)) == 8
    for rel in _rel_pngs(a):
        assert np.array_equal(pixels(a / rel), pixels(b / rel)), rel
        ra, rb = record_of(a / rel), record_of(b / rel)
        assert ra == rb, rel


def test_same_command_twice_gives_identical_png_bytes(base_run, repeat_run):
    a, b = base_run["out"], repeat_run["out"]
    for rel in _rel_pngs(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_batch_size_does_not_change_pictures(base_run, batch2_run):
    """Batch 2 vs batch 1: same seeds (one CPU generator per image), so the same pictures.

    Not bit-exact on CPU: a batched UNet/VAE forward uses other GEMM blockings than batch 1, and
    a handful of pixels (measured: 1 pixel in 3 of 8 images) round to a neighbouring 8-bit level.
    So: every pixel within one level, and almost all identical.
    """
    assert batch2_run["res"].exit_code == 0, batch2_run["res"].output
    a, b = base_run["out"], batch2_run["out"]
    assert _rel_pngs(a) == _rel_pngs(b)
    for rel in _rel_pngs(a):
        pa, pb = pixels(a / rel).astype(int), pixels(b / rel).astype(int)
        assert np.abs(pa - pb).max() <= 1, rel
        assert (pa != pb).mean() < 0.01, rel
    assert {e["timings"]["batch_size"] for e in read_manifest(b) if e["status"] == "ok"} == {2}
    assert {e["timings"]["batch_size"] for e in read_manifest(a) if e["status"] == "ok"} == {1}


# ----------------------------------------------------------------------------------------------
# 3. Precedence: built-in < preset < YAML defaults < CLI flags < per-prompt field
# ----------------------------------------------------------------------------------------------

LAYERS = ("preset", "defaults", "cli", "prompt")
#: key → (built-in value, value per layer in LAYERS order)
PRECEDENCE_VALUES = {
    "steps": (30, (11, 12, 13, 14)),
    "guidance": (5.0, (1.5, 2.5, 3.5, 4.5)),
    "scale": (1.0, (0.1, 0.2, 0.3, 0.4)),
    "negative_prompt": (OFFICIAL_NEGATIVE_PROMPT, ("neg preset", "neg defaults", "neg cli", "neg prompt")),
    "width": (1024, (512, 256, 128, 64)),
    "seed": (0, (100, 200, 300, 400)),
}
LAYER_SETS = [tuple(layer for bit, layer in enumerate(LAYERS) if mask >> bit & 1) for mask in range(16)]


@pytest.mark.parametrize("present", LAYER_SETS, ids=lambda s: "+".join(s) or "builtin")
@pytest.mark.parametrize("key", list(PRECEDENCE_VALUES))
def test_precedence_table(tmp_path, key, present):
    builtin, values = PRECEDENCE_VALUES[key]
    value = dict(zip(LAYERS, values, strict=False))
    groups = make_groups(tmp_path / "groups", names=("alpha",), n=1)
    args = []
    if "preset" in present:
        preset = tmp_path / "mine.yaml"
        preset.write_text(yaml.safe_dump({"description": "test", key: value["preset"]}), encoding="utf-8")
        args += ["--preset", preset]
    item = {"prompt": "a cat", "id": "cat"}
    if "prompt" in present:
        item[key] = value["prompt"]
    defaults = {key: value["defaults"]} if "defaults" in present else None
    prompts = write_prompts(tmp_path / "p.yaml", [item], defaults=defaults)
    if "cli" in present:
        args += [f"--{key.replace('_', '-')}", value["cli"]]
    res = invoke("generate", groups, "--prompts", prompts, "-o", tmp_path / "out", "--dry-run", "--json", *args)
    assert res.exit_code == 0, res.output
    jobs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(jobs) == 1
    expected = value[present[-1]] if present else builtin
    assert jobs[0][key] == expected
    assert not (tmp_path / "out").exists()


def test_cli_maps_options_onto_the_plan(tmp_path, monkeypatch):
    """Patch run_plan and assert on the Plan it receives (STYLE habit 10)."""
    seen = {}

    def fake_run_plan(plan, options):
        seen["plan"], seen["options"] = plan, options
        return RunSummary(total=len(plan.jobs), ok=len(plan.jobs))

    monkeypatch.setattr("easyref_cli.run.run_plan", fake_run_plan)
    groups = make_groups(tmp_path / "groups")
    prompts = write_prompts(
        tmp_path / "p.yaml",
        [{"prompt": "one", "steps": 9, "negative_prompt": "blurry"}, {"prompt": "two", "seeds": [3, 5]}],
        defaults={"guidance": 2.0, "scale": 0.5, "steps": 7},
    )
    res = invoke(
        "generate",
        groups,
        "--prompts",
        prompts,
        "-o",
        tmp_path / "out",
        "--preset",
        "identity",
        "--steps",
        "8",
        "--width",
        "128",
        "--height",
        "64",
        "--seed",
        "11",
        "-n",
        "2",
        "--scheduler",
        "DDIM",
        "--batch-size",
        "3",
        "--base-model",
        "bm",
        "--mllm",
        "ml",
        "--adapter",
        "ad.safetensors",
        "--device",
        "cpu",
        "--dtype",
        "fp16",
        "--attention",
        "sdpa",
        "--name-template",
        "{preset}/{group}-{prompt_id}-{index}",
        "--overwrite",
        "--fail-fast",
        "--json",
    )
    assert res.exit_code == 0, res.output
    plan = seen["plan"]
    assert plan.models.as_dict() == {"base_model": "bm", "mllm": "ml", "adapter": "ad.safetensors"}
    assert (plan.device, plan.dtype, plan.attention, plan.batch_size) == ("cpu", "float16", "sdpa", 3)
    assert plan.overwrite and plan.fail_fast and plan.preset == "identity"
    assert plan.out_dir == tmp_path / "out"
    assert seen["options"].json_out is not None
    by_prompt: dict[str, list] = {}
    for job in plan.jobs:
        by_prompt.setdefault(job.prompt_id, []).append(job)
    one, two = by_prompt["one"], by_prompt["two"]
    assert len(one) == 2 * 2 and len(two) == 2 * 2  # 2 groups × (2 seeds | seeds [3, 5])
    assert {j.seed for j in one} == {11, 12} and {j.seed for j in two} == {3, 5}
    assert {j.settings.steps for j in one} == {9} and {j.settings.steps for j in two} == {8}
    assert {j.settings.negative_prompt for j in one} == {"blurry"}
    assert all((j.settings.guidance, j.settings.scale, j.settings.scheduler) == (2.0, 0.5, "ddim") for j in plan.jobs)
    assert all((j.settings.width, j.settings.height) == (128, 64) for j in plan.jobs)
    assert {j.output.as_posix() for j in one if j.group.name == "alpha"} == {
        "identity/alpha-one-0.png",
        "identity/alpha-one-1.png",
    }


@pytest.mark.parametrize(
    "summary, code",
    [
        (RunSummary(total=2, ok=2), 0),
        (RunSummary(total=2, ok=1, skipped=1), 0),
        (RunSummary(total=2, ok=1, failed=1, errors=["x"]), 1),
        (RunSummary(total=2, ok=1, interrupted=True), 130),
    ],
    ids=["ok", "skips-are-ok", "failed", "interrupted"],
)
def test_exit_code_follows_the_run_summary(tmp_path, monkeypatch, summary, code):
    monkeypatch.setattr("easyref_cli.run.run_plan", lambda plan, options: summary)
    groups = make_groups(tmp_path / "groups", names=("alpha",), n=1)
    res = invoke("generate", groups, "--prompt", "a cat", "-o", tmp_path / "out")
    assert res.exit_code == code, res.output
    assert "done" in res.stderr and res.stdout == ""


# ----------------------------------------------------------------------------------------------
# 8. --dry-run (in process; the torch-free check is a subprocess test)
# ----------------------------------------------------------------------------------------------


def test_dry_run_lists_jobs_and_writes_nothing(tmp_path, forbid_model_load):
    groups = make_groups(tmp_path / "groups")
    out = tmp_path / "out"
    res = invoke("generate", groups, "--prompt", "a cat", "-n", "2", "-o", out, "--dry-run")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 5
    assert all(line.startswith("todo") for line in lines[:4])
    assert str(out / "alpha" / "a-cat_0.png") in lines[0]
    assert "4 jobs in 2 groups: 4 to generate, 0 already exist" in lines[-1]
    assert not out.exists()

    (out / "beta").mkdir(parents=True)
    (out / "beta" / "a-cat_1.png").write_bytes(b"x")  # not this job's image: the run would refuse, so does --dry-run
    res = invoke("generate", groups, "--prompt", "a cat", "-n", "2", "-o", out, "--dry-run", "--json")
    assert res.exit_code == 2 and "beta/a-cat_1.png" in res.output
    plan = build_plan(out_dir=out, groups=[groups], prompt="a cat", cli={"images_per_prompt": 2})
    (out / "beta" / "a-cat_1.png").unlink()
    files.write_png_atomic(
        out / "beta" / "a-cat_1.png", Image.new("RGB", (8, 8)), record=job_record(plan.jobs[3], plan.models.as_dict())
    )
    res = invoke("generate", groups, "--prompt", "a cat", "-n", "2", "-o", out, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    entries = [json.loads(line) for line in res.stdout.splitlines()]  # nothing but JSON on stdout
    assert len(entries) == 4 and all(isinstance(e, dict) for e in entries)
    assert [e["exists"] for e in entries] == [False, False, False, True]
    assert entries[3]["output"] == "beta/a-cat_1.png" and entries[3]["seed"] == 1
    assert sorted(p.name for p in out.rglob("*")) == ["a-cat_1.png", "beta"]


def test_dry_run_with_model_tiny_builds_no_model(tmp_path, monkeypatch):
    import easyref_cli.tiny as testing

    def boom(*_args, **_kwargs):
        raise AssertionError("--dry-run built the tiny models")

    monkeypatch.setattr(testing, "build_tiny_models", boom)
    groups = make_groups(tmp_path / "groups", names=("alpha",), n=1)
    res = invoke(
        "generate", groups, "--prompt", "a cat", "-o", tmp_path / "out", "--model", "tiny", "--dry-run", "--json"
    )
    assert res.exit_code == 0
    assert [json.loads(line)["width"] for line in res.stdout.splitlines()] == [64]


def test_json_prints_manifest_lines_only_on_stdout(tmp_path, tiny):
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    res = invoke("generate", groups, "--prompt", "a cat", "-n", "2", "-o", out, "--json", *model_args(tiny))
    assert res.exit_code == 0, res.output
    printed = [json.loads(line) for line in res.stdout.splitlines()]
    assert printed == read_manifest(out)
    assert [e["status"] for e in printed] == ["ok", "ok"]
    assert "2 done, 0 skipped, 0 failed" in res.stderr  # the summary goes to stderr


# ----------------------------------------------------------------------------------------------
# 4. Resume, nothing-to-do, --overwrite
# ----------------------------------------------------------------------------------------------


def test_resume_regenerates_only_missing_outputs(tmp_path, tiny, monkeypatch):
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    prompts = write_prompts(tmp_path / "p.yaml", [{"prompt": "a cat", "id": "cat"}], defaults={"images_per_prompt": 3})
    out = tmp_path / "out"
    cmd = (groups, "--prompts", prompts, "-o", out, "--batch-size", "1")  # bit-exact: the same batching both times

    res = generate(tiny, *cmd)
    assert res.exit_code == 0, res.output
    written = [out / "alpha" / f"cat_{s}.png" for s in range(3)]
    assert pngs(out) == written
    first_bytes = {p: p.read_bytes() for p in written}
    for p in written:
        os.utime(p, ns=(OLD_NS, OLD_NS))
    written[1].unlink()

    res = generate(tiny, *cmd)
    assert res.exit_code == 0, res.output
    assert pngs(out) == written
    assert [p.stat().st_mtime_ns == OLD_NS for p in written] == [True, False, True]
    with Image.open(io.BytesIO(first_bytes[written[1]])) as first:
        assert np.array_equal(pixels(written[1]), np.asarray(first.convert("RGB")))
    entries = read_manifest(out)
    assert [e["status"] for e in entries[:3]] == ["ok"] * 3 and len(entries) == 6
    assert {Path(e["path"]).name: e["status"] for e in entries[3:]} == {
        "cat_0.png": "skipped",
        "cat_1.png": "ok",
        "cat_2.png": "skipped",
    }
    assert no_tmp_files(out)

    # Nothing left to do: no model may load at all.
    with monkeypatch.context() as m:
        _forbid(m)
        res = generate(tiny, *cmd)
    assert res.exit_code == 0, res.output
    assert [e["status"] for e in read_manifest(out)[6:]] == ["skipped"] * 3
    assert [p.stat().st_mtime_ns == OLD_NS for p in written] == [True, False, True]

    for p in written:
        os.utime(p, ns=(OLD_NS, OLD_NS))
    res = generate(tiny, *cmd, "--overwrite")
    assert res.exit_code == 0, res.output
    assert all(p.stat().st_mtime_ns != OLD_NS for p in written)
    assert [e["status"] for e in read_manifest(out)[9:]] == ["ok"] * 3
    assert pngs(out) == written


def _signal_handler_installed(signum: int) -> bool:
    return signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler, None)


def test_sigterm_stops_after_the_image_in_flight(tmp_path, tiny, monkeypatch):
    """SIGTERM (in process; SIGINT is the subprocess test): finish the image, flush, exit 130."""
    real_write = files.write_png_atomic
    written = []
    before = signal.getsignal(signal.SIGTERM)

    def write_then_signal(path, image, *, record, **kw):
        real_write(path, image, record=record, **kw)
        written.append(Path(path))
        if len(written) == 1:
            assert _signal_handler_installed(signal.SIGTERM), "no SIGTERM handler during the run"
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files, "write_png_atomic", write_then_signal)
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    res = generate(tiny, groups, "--prompt", "a cat", "-n", "3", "-o", out)
    assert res.exit_code == 130, res.output
    assert pngs(out) == written == [out / "alpha" / "a-cat_0.png"]
    assert [e["status"] for e in read_manifest(out)] == ["ok"]
    assert "interrupted" in res.stderr
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    assert no_tmp_files(out)


def test_second_signal_aborts_and_discards_the_image_in_flight(tmp_path, tiny, monkeypatch):
    real_write = files.write_png_atomic

    def signal_twice_then_write(path, image, *, record, **kw):
        assert _signal_handler_installed(signal.SIGINT), "no SIGINT handler during the run"
        os.kill(os.getpid(), signal.SIGINT)  # first: stop after this image
        os.kill(os.getpid(), signal.SIGINT)  # second: abort now
        real_write(path, image, record=record, **kw)

    monkeypatch.setattr(files, "write_png_atomic", signal_twice_then_write)
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    res = generate(tiny, groups, "--prompt", "a cat", "-n", "2", "-o", out)
    assert res.exit_code == 130, res.output
    assert pngs(out) == [] and no_tmp_files(out)
    assert [e for e in read_manifest(out) if e["status"] == "ok"] == []


def test_forbid_model_load_fixture_bites(tmp_path, forbid_model_load):
    """Guard for the guard: with pending jobs, the patched loaders are reached."""
    groups = make_groups(tmp_path / "groups", names=("alpha",), n=1)
    with pytest.raises(AssertionError, match="a model was loaded"):
        invoke(
            "generate",
            groups,
            "--prompt",
            "a cat",
            "-o",
            tmp_path / "out",
            "--base-model",
            "x",
            "--mllm",
            "y",
            "--adapter",
            "z",
        )


# ----------------------------------------------------------------------------------------------
# 5. Exit codes 1 (per-job failures, --fail-fast) and 2 (usage errors before any model)
# ----------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_failed_group_is_recorded_and_others_still_run(tmp_path, tiny):
    groups = make_groups(tmp_path / "groups", names=("alpha", "beta", "gamma"))
    broken = groups / "beta" / "ref_01.png"
    _truncate(broken)
    out = tmp_path / "out"
    res = generate(tiny, groups, "--prompt", "a cat", "-n", "2", "-o", out)
    assert res.exit_code == 1, res.output
    assert {p.relative_to(out).as_posix() for p in pngs(out)} == {
        f"{g}/a-cat_{s}.png" for g in ("alpha", "gamma") for s in (0, 1)
    }
    entries = read_manifest(out)
    errors = [e for e in entries if e["status"] == "error"]
    assert len(entries) == 6 and len(errors) == 2
    assert all(e["group"] == "beta" and str(broken) in e["error"] for e in errors)
    assert "truncated" in errors[0]["error"]
    assert "4 done, 0 skipped, 2 failed" in res.stderr and str(broken) in res.stderr
    assert no_tmp_files(out)

    # A rerun retries only the failed jobs (still failing): exit 1, nothing rewritten.
    for p in pngs(out):
        os.utime(p, ns=(OLD_NS, OLD_NS))
    res = generate(tiny, groups, "--prompt", "a cat", "-n", "2", "-o", out)
    assert res.exit_code == 1
    assert all(p.stat().st_mtime_ns == OLD_NS for p in pngs(out))
    assert sorted(e["status"] for e in read_manifest(out)[6:]) == [
        "error",
        "error",
        "skipped",
        "skipped",
        "skipped",
        "skipped",
    ]


def test_fail_fast_stops_at_the_first_failure(tmp_path, tiny):
    groups = make_groups(tmp_path / "groups", names=("a-bad", "b-good"))
    (groups / "a-bad" / "ref_00.png").write_bytes(os.urandom(200))
    out = tmp_path / "out"
    res = generate(tiny, groups, "--prompt", "a cat", "-o", out, "--fail-fast")
    assert res.exit_code == 1, res.output
    assert pngs(out) == []
    entries = read_manifest(out)
    assert entries and all(e["status"] == "error" and e["group"] == "a-bad" for e in entries)
    assert "ref_00.png" in entries[0]["error"]


def _sabotage_seed(monkeypatch, seed: int, how: str) -> None:
    """Make the image of ``seed`` come out NaN (``nan``) or its batch run out of memory (``oom``)."""
    from easyref_cli.model.pipeline import EasyRefPipeline

    real_generate, real_denoise = EasyRefPipeline.generate, EasyRefPipeline._denoise

    def generate_(self, requests, *args, **kwargs):
        if how == "oom" and any(r.seed == seed for r in requests):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_generate(self, requests, *args, **kwargs)

    def denoise(self, *args, **kwargs):
        out = real_denoise(self, *args, **kwargs)
        generators = args[5] if len(args) > 5 else kwargs["generators"]
        for i, g in enumerate(generators):
            if how == "nan" and g.initial_seed() == seed:
                out.images[i][...] = np.nan
        return out

    monkeypatch.setattr(EasyRefPipeline, "generate", generate_)
    monkeypatch.setattr(EasyRefPipeline, "_denoise", denoise)


@pytest.mark.parametrize(
    "how, batch_size, message",
    [
        ("nan", 1, "NaN"),
        ("oom", 1, "out of memory"),
        ("nan", 2, "NaN"),
    ],
    ids=["nan", "oom", "nan-in-a-batch-of-2"],
)
def test_nan_or_oom_fails_only_that_job(tmp_path, tiny, monkeypatch, how, batch_size, message):
    _sabotage_seed(monkeypatch, 1, how)
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    res = generate(tiny, groups, "--prompt", "a cat", "-n", "3", "-o", out, "--batch-size", batch_size)
    assert res.exit_code == 1, res.output
    status = {e["seed"]: e["status"] for e in read_manifest(out)}
    assert status == {0: "ok", 1: "error", 2: "ok"}
    [error] = [e for e in read_manifest(out) if e["status"] == "error"]
    assert message in error["error"]
    assert [p.name for p in pngs(out)] == ["a-cat_0.png", "a-cat_2.png"]


def _usage_cases():
    """(id, setup(tmp, groups) -> args, fragments expected in stderr)."""

    def prompts(tmp, text):
        path = tmp / "p.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    def bad_yaml(tmp, groups):
        return [groups, "--prompts", prompts(tmp, "prompts:\n  - prompt: a\n    steps: 3: 4\n  - b\n")]

    def unknown_key(tmp, groups):
        return [groups, "--prompts", prompts(tmp, "prompts:\n  - prompt: a\n    colour: red\n")]

    def unknown_default(tmp, groups):
        return [groups, "--prompts", prompts(tmp, "defaults:\n  stepz: 3\nprompts:\n  - a\n")]

    def unknown_top(tmp, groups):
        return [groups, "--prompts", prompts(tmp, "prompt:\n  - a\n")]

    def empty_prompts(tmp, groups):
        return [groups, "--prompts", prompts(tmp, "prompts: []\n")]

    def empty_file(tmp, groups):
        return [groups, "--prompts", prompts(tmp, "")]

    def missing_prompts(tmp, groups):
        return [groups, "--prompts", tmp / "nope.yaml"]

    def both(tmp, groups):
        return [groups, "--prompt", "a", "--prompts", prompts(tmp, "prompts: [a]\n")]

    def neither(tmp, groups):
        return [groups]

    def unknown_preset(tmp, groups):
        return [groups, "--prompt", "a", "--preset", "nosuch"]

    def missing_preset_file(tmp, groups):
        return [groups, "--prompt", "a", "--preset", tmp / "nope.yaml"]

    def bad_preset_key(tmp, groups):
        (tmp / "pr.yaml").write_text("steps: 3\nsampler: euler\n", encoding="utf-8")
        return [groups, "--prompt", "a", "--preset", tmp / "pr.yaml"]

    def missing_group(tmp, groups):
        return [tmp / "nosuchdir", "--prompt", "a"]

    def empty_dir(tmp, groups):
        (tmp / "empty").mkdir()
        return [tmp / "empty", "--prompt", "a"]

    def only_non_images(tmp, groups):
        d = tmp / "texts"
        d.mkdir()
        (d / "notes.txt").write_text("hi")
        (d / ".hidden.png").write_bytes(b"x")
        return [d, "--prompt", "a"]

    def group_is_a_file(tmp, groups):
        return [groups / "alpha" / "ref_00.png", "--prompt", "a"]

    def duplicate_group_names(tmp, groups):
        make_reference_images(tmp / "other" / "alpha", n=1)
        return [groups / "alpha", tmp / "other" / "alpha", "--prompt", "a"]

    def width(tmp, groups):
        return [groups, "--prompt", "a", "--width", "100"]

    def steps(tmp, groups):
        return [groups, "--prompt", "a", "--steps", "0"]

    def scheduler(tmp, groups):
        return [groups, "--prompt", "a", "--scheduler", "nope"]

    def attention(tmp, groups):
        return [groups, "--prompt", "a", "--attention", "flash3"]

    def dtype(tmp, groups):
        return [groups, "--prompt", "a", "--dtype", "int8"]

    def unknown_group_filter(tmp, groups):
        return [groups, "--prompts", prompts(tmp, "prompts:\n  - prompt: a\n    groups: [zeta]\n")]

    def escaping_template(tmp, groups):
        return [groups, "--prompt", "a", "--name-template", "../{group}_{seed}"]

    def colliding_template(tmp, groups):
        return [groups, "--prompt", "a", "-n", "2", "--name-template", "{group}"]

    def bad_model(tmp, groups):
        return [groups, "--prompt", "a", "--model", "huge"]

    def from_image_and_groups(tmp, groups):
        return [groups, "--from-image", groups / "alpha" / "ref_00.png"]

    def from_image_without_record(tmp, groups):
        return ["--from-image", groups / "alpha" / "ref_00.png"]

    return [
        ("bad-yaml", bad_yaml, ["p.yaml:3", "YAML syntax error"]),
        ("unknown-prompt-key", unknown_key, ["p.yaml:3", "colour", "unknown key"]),
        ("unknown-defaults-key", unknown_default, ["p.yaml:2", "stepz"]),
        ("unknown-top-key", unknown_top, ["p.yaml", "prompt", "unknown top-level key"]),
        ("empty-prompt-list", empty_prompts, ["p.yaml", "empty"]),
        ("empty-prompt-file", empty_file, ["p.yaml", "empty"]),
        ("missing-prompt-file", missing_prompts, ["nope.yaml", "not found"]),
        ("both-prompt-sources", both, ["--prompts", "--prompt"]),
        ("no-prompt-source", neither, ["--prompts", "--prompt"]),
        ("unknown-preset", unknown_preset, ["nosuch", "style", "identity", "character"]),
        ("missing-preset-file", missing_preset_file, ["nope.yaml", "not found"]),
        ("bad-preset-key", bad_preset_key, ["pr.yaml", "sampler"]),
        ("missing-group-dir", missing_group, ["nosuchdir", "not found"]),
        ("empty-group-dir", empty_dir, ["empty", "no images"]),
        ("only-non-images", only_non_images, ["texts", "no images"]),
        ("group-is-a-file", group_is_a_file, ["ref_00.png", "not a directory"]),
        ("duplicate-group-names", duplicate_group_names, ["alpha", "unique"]),
        ("width-not-multiple-of-8", width, ["--width", "multiple of 8", "100"]),
        ("steps-zero", steps, ["--steps"]),
        ("unknown-scheduler", scheduler, ["--scheduler", "nope"]),
        ("unknown-attention", attention, ["--attention", "flash3"]),
        ("unknown-dtype", dtype, ["--dtype", "int8"]),
        ("unknown-group-filter", unknown_group_filter, ["p.yaml:3", "zeta"]),
        ("escaping-name-template", escaping_template, ["name template", ".."]),
        ("colliding-name-template", colliding_template, ["name template", "not unique"]),
        ("unknown-model", bad_model, ["--model", "huge"]),
        ("from-image-with-groups", from_image_and_groups, ["--from-image"]),
        ("from-image-without-record", from_image_without_record, ["ref_00.png", "easyref"]),
    ]


USAGE_CASES = _usage_cases()


@pytest.mark.parametrize("setup, fragments", [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES])
def test_usage_errors_exit_2_before_any_model(tmp_path, tiny, forbid_model_load, setup, fragments):
    groups = make_groups(tmp_path / "groups", n=1)
    out = tmp_path / "out"
    res = invoke("generate", *model_args(tiny), *setup(tmp_path, groups), "-o", out)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("Error: ")
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)
    assert "Traceback" not in res.output
    assert res.stdout == ""
    assert not out.exists() or not any(out.iterdir())


def test_missing_hub_weights_exit_2_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    groups = make_groups(tmp_path / "groups", names=("alpha",), n=1)
    out = tmp_path / "out"
    res = invoke("generate", groups, "--prompt", "a", "-o", out, "--device", "cpu", "-q")
    assert res.exit_code == 2, res.output
    assert "stabilityai/stable-diffusion-xl-base-1.0" in res.stderr
    assert "--base-model" in res.stderr and "--model demo" in res.stderr
    assert pngs(out) == []


def test_no_args_prints_help():
    res = invoke("generate")
    assert res.exit_code in (0, 2)
    assert "--prompts" in res.output and "precedence" in res.output.lower()


# ----------------------------------------------------------------------------------------------
# 6. Bad inputs: image modes that must work (one shared run), and ones that must fail cleanly
# ----------------------------------------------------------------------------------------------


def _rgba(d: Path) -> None:
    a = np.random.default_rng(1).integers(0, 256, (40, 56, 4), dtype=np.uint8)
    a[..., 3] = np.linspace(0, 255, 56, dtype=np.uint8)[None, :]
    Image.fromarray(a, "RGBA").save(d / "rgba.png")


def _cmyk(d: Path) -> None:
    Image.new("CMYK", (48, 40), (10, 200, 30, 40)).save(d / "cmyk.jpg", quality=90)
    with Image.open(d / "cmyk.jpg") as im:
        assert im.mode == "CMYK"


def _png16(d: Path) -> None:
    a = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(a).save(d / "deep.png")
    with Image.open(d / "deep.png") as im:
        assert im.mode.startswith("I")


def _exif_rotated(d: Path) -> None:
    im = Image.new("RGB", (64, 32), (200, 20, 20))
    im.paste((20, 20, 200), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to display
    im.save(d / "rotated.jpg", exif=exif.tobytes())


def _unicode_names(d: Path) -> None:
    make_reference_images(d, n=1)
    (d / "ref_00.png").rename(d / "café_猫_ü.png")


def _large(d: Path) -> None:
    a = np.random.default_rng(2).integers(0, 256, (3000 // 50, 4000 // 50, 3), dtype=np.uint8)
    Image.fromarray(a).resize((4000, 3000), Image.NEAREST).save(d / "large.jpg", quality=80)


def _with_junk(d: Path) -> None:
    make_reference_images(d, n=2)
    (d / "notes.txt").write_text("not an image")
    (d / ".DS_Store").write_bytes(b"\0\1")
    (d / "._ref_00.png").write_bytes(b"AppleDouble")
    (d / "sub").mkdir()
    make_reference_images(d / "sub", n=1)


IMAGE_CASES = {
    "rgba-png": _rgba,
    "cmyk-jpeg": _cmyk,
    "png-16-bit": _png16,
    "exif-rotated-jpeg": _exif_rotated,
    "unicode-file-names": _unicode_names,
    "グループ-é": lambda d: make_reference_images(d, n=1),  # a unicode group dir name
    "large-4000x3000-jpeg": _large,
    "non-image-files": _with_junk,
}


@pytest.fixture(scope="module")
def odd_inputs_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_inputs")
    groups = root / "groups"
    for name, make in IMAGE_CASES.items():
        d = groups / name
        d.mkdir(parents=True)
        make(d)
    out = root / "out"
    res = invoke(
        "generate", groups, "--prompt", "a cat", "-o", out, *model_args(tiny), "-v", "--cache-dir", root / "cache"
    )
    return {"res": res, "out": out, "groups": groups, "entries": read_manifest(out) if out.exists() else []}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_odd_but_valid_reference_images_work(odd_inputs_run, case):
    run = odd_inputs_run
    assert run["res"].exit_code == 0, run["res"].output
    name = unicodedata.normalize("NFC", case)
    png = run["out"] / name / "a-cat_0.png"
    assert png.is_file()
    [entry] = [e for e in run["entries"] if e["group"] == name]
    assert entry["status"] == "ok" and Path(entry["path"]) == png
    record = record_of(png)
    images = sorted(
        p for p in (run["groups"] / case).iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt"
    )
    assert [Path(r["path"]).name for r in record["references"]] == [p.name for p in images]
    assert [r["sha256"] for r in record["references"]] == [sha256(p) for p in images]


def test_ignored_writtenare_listed_with_verbose(odd_inputs_run):
    stderr = odd_inputs_run["res"].stderr
    for name in ("notes.txt", ".DS_Store", "._ref_00.png", "sub"):
        assert name in stderr, name


def test_exif_orientation_is_applied():
    # The CLI run above proves the file works; this pins what the encoder sees.
    import tempfile

    from easyref_cli.files import load_image

    with tempfile.TemporaryDirectory() as d:
        _exif_rotated(Path(d))
        im = load_image(Path(d) / "rotated.jpg")
    assert im.size == (32, 64) and im.mode == "RGB"


@pytest.mark.parametrize(
    "write, fragment",
    [
        (lambda d: (d / "corrupt.png").write_bytes(os.urandom(512)), "corrupt.png"),
        (lambda d: (d / "corrupt.png").write_bytes(b""), "corrupt.png"),
        (lambda d: (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300)), "corrupt.jpg"),
    ],
    ids=["random-bytes-png", "empty-png", "garbage-jpeg"],
)
def test_corrupt_reference_fails_its_jobs_cleanly(tmp_path, tiny, write, fragment):
    groups = make_groups(tmp_path / "groups", names=("alpha", "beta"), n=1)
    write(groups / "beta")
    out = tmp_path / "out"
    res = generate(tiny, groups, "--prompt", "a cat", "-o", out)
    assert res.exit_code == 1, res.output
    assert pngs(out) == [out / "alpha" / "a-cat_0.png"]
    [error] = [e for e in read_manifest(out) if e["status"] == "error"]
    assert fragment in error["error"] and error["group"] == "beta"
    assert fragment in res.stderr and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------
# 10. presets and doctor
# ----------------------------------------------------------------------------------------------


def test_presets_list():
    res = invoke("presets", "list")
    assert res.exit_code == 0, res.output
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    assert {"style", "identity", "character"} <= set(names)


@pytest.mark.parametrize("name", ["style", "identity", "character"])
def test_presets_show(name):
    res = invoke("presets", "show", name)
    assert res.exit_code == 0, res.output
    assert "#" in res.stdout  # comments say why
    data = yaml.safe_load(res.stdout)
    assert {"scale", "guidance", "steps", "width", "height", "negative_prompt"} <= set(data)


def test_presets_show_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# mine\nsteps: 3\n", encoding="utf-8")
    res = invoke("presets", "show", path)
    assert res.exit_code == 0 and "steps: 3" in res.stdout


def test_presets_show_unknown():
    res = invoke("presets", "show", "nosuch")
    assert res.exit_code == 2
    assert "nosuch" in res.stderr and "style" in res.stderr


def test_doctor(tiny):
    res = invoke("doctor", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "--attention auto" in res.stdout and "torch" in res.stdout
    assert "float32" in res.stdout and "default models" in res.stdout
    assert "--model demo" in res.stdout and "MiB" in res.stdout
