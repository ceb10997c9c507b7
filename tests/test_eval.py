"""`easyref eval` and `easyref report` (issue 6).

Metric maths on fixed embeddings; the output-folder reader on hand-made folders (PNGs + manifest
written with files.py, no models); then an end-to-end run on an OUT made by `easyref generate`
with the session's tiny models, scored by tiny random CLIP / DINOv2 / DINO ViT folders built here.
The commands go through a throwaway Typer app registered the way cli.py registers them.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from easyref_cli import files
from easyref_cli.clitools import handle_errors
from easyref_cli.errors import UsageError
from easyref_cli.eval import collect_images, metrics, report
from easyref_cli.eval.command import eval_command, report_command
from easyref_cli.eval.tiny import build_tiny_clip, build_tiny_dino_vit, build_tiny_dinov2
from easyref_cli.testing import make_reference_images

app = typer.Typer(pretty_exceptions_enable=False)
app.command("eval")(handle_errors(eval_command))
app.command("report")(handle_errors(report_command))
cli = CliRunner()


def invoke(*args, cli_app=app):
    return cli.invoke(cli_app, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------------------------
# Cosine maths on fixed embeddings
# ----------------------------------------------------------------------------------------------


def test_cosine_matches_hand_computed_values():
    assert metrics.cosine([3, 4], [4, 3]) == pytest.approx(24 / 25)
    assert metrics.cosine([1, 0], [0, 5]) == pytest.approx(0.0)
    assert metrics.cosine([1, 2, 3], [-2, -4, -6]) == pytest.approx(-1.0)
    assert metrics.cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    assert metrics.cosine([2, 0, 0], [2, 0, 0]) == 1.0
    assert metrics.cosine([0, 0], [1, 0]) == 0.0  # zero vectors do not divide by zero
    assert metrics.mean_cosine([1, 0], [[1, 0], [0, 1], [-1, 0]]) == pytest.approx(0.0)
    assert metrics.mean_cosine([1, 0], []) is None
    assert np.allclose(np.linalg.norm(metrics.normalize([[3, 4], [0, 2]]), axis=-1), 1.0)


def test_image_scores_on_fixed_embeddings():
    scores = metrics.image_scores(
        clip_image=[1, 0, 0],
        clip_refs=[[1, 0, 0], [0, 1, 0], [1, 1, 0]],
        clip_text=[1, 0, 1],
        dino_image=[3, 4],
        dino_refs=[[4, 3], [3, 4]],
        clip_target=[0, 0, 2],
        dino_target=[-3, -4],
    )
    assert scores["clip_i"] == pytest.approx((1 + 0 + 1 / math.sqrt(2)) / 3)
    assert scores["clip_t"] == pytest.approx(1 / math.sqrt(2))
    assert scores["dino_i"] == pytest.approx((24 / 25 + 1) / 2)
    assert scores["clip_i_target"] == pytest.approx(0.0)
    assert scores["dino_i_target"] == pytest.approx(-1.0)
    no_target = metrics.image_scores(
        clip_image=[1, 0], clip_refs=[[1, 0]], clip_text=[0, 1], dino_image=[1], dino_refs=[[1]]
    )
    assert no_target["clip_i_target"] is None and no_target["dino_i_target"] is None


def test_summarize_means_per_group_and_overall():
    rows = [
        {
            "group": "a",
            "clip_i": 0.2,
            "clip_t": 0.1,
            "dino_i": 0.5,
            "target": "t.png",
            "clip_i_target": 1.0,
            "dino_i_target": 0.0,
        },
        {
            "group": "a",
            "clip_i": 0.4,
            "clip_t": 0.3,
            "dino_i": 0.7,
            "target": None,
            "clip_i_target": None,
            "dino_i_target": None,
        },
        {
            "group": "b",
            "clip_i": 0.9,
            "clip_t": -0.1,
            "dino_i": 0.1,
            "target": "u.png",
            "clip_i_target": 0.5,
            "dino_i_target": 0.5,
        },
    ]
    out = metrics.summarize(rows, with_targets=True)
    a, b, overall = out["groups"]["a"], out["groups"]["b"], out["overall"]
    assert list(out["groups"]) == ["a", "b"]
    assert a["count"] == 2 and a["target_count"] == 1
    assert a["clip_i"] == pytest.approx(0.3) and a["clip_t"] == pytest.approx(0.2) and a["dino_i"] == pytest.approx(0.6)
    assert a["clip_i_target"] == pytest.approx(1.0) and a["dino_i_target"] == pytest.approx(0.0)
    assert b["count"] == 1 and b["clip_i"] == pytest.approx(0.9)
    assert overall["count"] == 3 and overall["target_count"] == 2
    assert overall["clip_i"] == pytest.approx(0.5)  # mean over images, not over group means
    assert overall["clip_i_target"] == pytest.approx(0.75)
    plain = metrics.summarize(rows, with_targets=False)["overall"]
    assert "clip_i_target" not in plain and "target_count" not in plain


def test_markdown_table_layout():
    summary = metrics.summarize(
        [{"group": "x|y", "clip_i": 0.12345, "clip_t": 0.5, "dino_i": None}], with_targets=False
    )
    lines = metrics.markdown_table(summary).splitlines()
    assert lines[0] == "| group | images | CLIP-I | CLIP-T | DINO-I |"
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: |"
    assert lines[2] == "| x\\|y | 1 | 0.1235 | 0.5000 | – |"
    assert lines[3].startswith("| **overall** | 1 |")


# ----------------------------------------------------------------------------------------------
# Hand-made output folders (no models)
# ----------------------------------------------------------------------------------------------


def _png(path: Path, colour=(200, 40, 40), size=(40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (120, 120, 120))
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 8, size[1] - 6), fill=colour)
    image.save(path)
    return path


def make_out(out: Path, refs: list[Path], jobs: list[dict]) -> Path:
    """An output folder as `easyref generate` writes it: PNGs with records + manifest lines.

    Each job: group, prompt_id, seed, prompt, status (default ok); ``write: False`` leaves the PNG out.
    """
    references = [{"path": str(p.resolve()), "sha256": files.sha256_file(p)} for p in refs]
    with files.ManifestWriter(out / files.MANIFEST_NAME) as manifest:
        for k, job in enumerate(jobs):
            job_id = job.get("job_id", f"job{k:04d}")
            name = f"{job['group']}/{job['prompt_id']}_{job['seed']}.png"
            status = job.get("status", "ok")
            if status == "ok" and job.get("write", True):
                record = {
                    "job_id": job.get("record_job_id", job_id),
                    "group": job["group"],
                    "prompt_id": job["prompt_id"],
                    "seed": job["seed"],
                    "prompt": job["prompt"],
                    "output": name,
                    "references": references,
                }
                image = Image.new("RGB", (64, 64), ((40 * k) % 256, 90, 160))
                files.write_png_atomic(out / name, image, record=record)
            manifest.write(
                {
                    "job_id": job_id,
                    "status": status,
                    "path": str(out / name),
                    "group": job["group"],
                    "prompt_id": job["prompt_id"],
                    "seed": job["seed"],
                }
            )
    return out


@pytest.fixture
def refs(tmp_path) -> list[Path]:
    return [_png(tmp_path / "refs" / "r1.png"), _png(tmp_path / "refs" / "r2.png", (30, 200, 30))]


def test_command_module_imports_no_heavy_libraries():
    """cli.py imports eval.command at start-up: `easyref --help` must not pay for torch or Pillow."""
    import subprocess
    import sys

    code = (
        "import sys, easyref_cli.eval.command; "
        "print(sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_finished_is_a_usage_error(tmp_path, refs):
    out = make_out(
        tmp_path / "out", refs, [{"group": "g", "prompt_id": "p", "seed": 0, "prompt": "a", "status": "error"}]
    )
    res = invoke("report", out)
    assert res.exit_code == 2 and "no finished image" in res.stderr and "1 failed" in res.stderr


def test_missing_manifest_is_a_clear_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in ("eval", "report"):
        res = invoke(command, tmp_path / "empty")
        assert res.exit_code == 2, res.output
        assert res.stderr.startswith("Error: ")
        assert str(tmp_path / "empty" / "manifest.jsonl") in res.stderr
        assert "easyref generate" in res.stderr
        res = invoke(command, tmp_path / "nope")
        assert res.exit_code == 2 and "output folder not found" in res.stderr
    assert not (tmp_path / "empty" / "eval").exists()


def test_collect_images_latest_status_resume_missing_and_moved_folders(tmp_path, refs):
    out = make_out(
        tmp_path / "out",
        refs,
        [
            {"group": "g", "prompt_id": "p", "seed": 0, "prompt": "a"},
            {"group": "g", "prompt_id": "p", "seed": 1, "prompt": "a", "status": "error"},
            {"group": "h", "prompt_id": "p", "seed": 0, "prompt": "b"},
            {"group": "h", "prompt_id": "p", "seed": 1, "prompt": "b", "write": False},  # deleted by hand
        ],
    )
    with files.ManifestWriter(out / files.MANIFEST_NAME) as manifest:  # a resumed run logs "skipped"
        manifest.write(
            {
                "job_id": "job0000",
                "status": "skipped",
                "path": str(out / "g/p_0.png"),
                "group": "g",
                "prompt_id": "p",
                "seed": 0,
            }
        )
    folder = collect_images(out)
    assert [(im.group, im.seed) for im in folder.images] == [("g", 0), ("h", 0)]
    assert folder.counts() == {"images": 2, "groups": 2, "failed": 1, "missing": 1, "superseded": 0}
    assert folder.images[0].name == "g/p_0.png" and folder.images[0].prompt == "a"
    assert [p.name for p in folder.images[0].references] == ["r1.png", "r2.png"]

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    again = collect_images(moved)
    assert [im.path for im in again.images] == [moved / "g/p_0.png", moved / "h/p_0.png"]


def test_overwritten_job_counts_once(tmp_path, refs):
    out = make_out(
        tmp_path / "out",
        refs,
        [
            {"group": "g", "prompt_id": "p", "seed": 0, "prompt": "old", "job_id": "old", "write": False},
            {"group": "g", "prompt_id": "p", "seed": 0, "prompt": "new", "job_id": "new"},
        ],
    )
    folder = collect_images(out)
    assert [im.job_id for im in folder.images] == ["new"] and folder.superseded == 1


def test_missing_reference_fails_before_any_model_loads(tmp_path, refs):
    out = make_out(tmp_path / "out", refs, [{"group": "g", "prompt_id": "p", "seed": 0, "prompt": "a"}])
    refs[1].unlink()
    res = invoke("eval", out, "--clip-model", tmp_path / "no-clip", "--device", "cpu")
    assert res.exit_code == 2
    assert "r2.png" in res.stderr and "missing" in res.stderr and "no-clip" not in res.stderr


def test_target_lookup_order_and_ambiguity(tmp_path):
    root = tmp_path / "targets"
    per_group = _png(root / "g.jpg")
    per_prompt = _png(root / "g" / "p.PNG")
    per_image = _png(root / "g" / "p_3.png")
    finder = metrics.TargetFinder(root)
    assert finder.find("g", "p", 3) == per_image
    assert finder.find("g", "p", 4) == per_prompt
    assert finder.find("g", "q", 4) == per_group
    assert finder.find("other", "p", 3) is None
    _png(root / "g" / "p.webp")
    with pytest.raises(UsageError, match="several targets"):
        metrics.TargetFinder(root).find("g", "p", 4)
    with pytest.raises(UsageError, match="no such folder"):
        metrics.TargetFinder(tmp_path / "none")


def test_fit_lines_wraps_and_truncates():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = report._font(12)
    text = "a very long prompt about a lighthouse on a cliff at dusk in watercolour " * 4
    lines = report.fit_lines(draw, text, font, 120, 2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 120 for line in lines)
    assert report.fit_lines(draw, "short", font, 120, 2) == ["short"]
    word = report.fit_lines(draw, "x" * 200, font, 50, 3)
    assert len(word) == 3 and all(draw.textlength(line, font=font) <= 50 for line in word)
    assert report.fit_lines(draw, "猫 🐱 naïve", font, 200, 1)  # non-latin text does not crash


def test_report_escapes_html_and_names_sheets_safely(tmp_path, refs):
    weird = '<b>&"x'
    long_prompt = "an extremely detailed prompt " * 12
    out = make_out(
        tmp_path / "out",
        refs,
        [
            {"group": weird, "prompt_id": "p", "seed": 0, "prompt": long_prompt},
            {"group": "index", "prompt_id": "p", "seed": 0, "prompt": "<script>alert(1)</script>"},
        ],
    )
    res = invoke("report", out, "--thumb-size", "64", "-q")
    assert res.exit_code == 0, res.output
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "<b>&" not in page and html.escape(weird) in page
    assert "<script>" not in page
    assert "No metrics yet" in page
    assert sorted(p.name for p in (out / "report").iterdir()) == ['<b>&"x.png', "index.html", "index_.png"]
    for sheet in (out / "report").glob("*.png"):
        with Image.open(sheet) as im:
            im.verify()


# ----------------------------------------------------------------------------------------------
# End to end: OUT from `easyref generate` (tiny models), tiny random CLIP and DINO
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "dinov2": build_tiny_dinov2(root / "dinov2"),
        "dino_vit": build_tiny_dino_vit(root / "dino-vit"),
    }


@pytest.fixture(scope="module")
def generated(tiny, tmp_path_factory) -> Path:
    """2 groups × 1 prompt × 2 seeds at 64², made by the real `easyref generate`."""
    from easyref_cli.cli import app as easyref_app

    root = tmp_path_factory.mktemp("eval_run")
    for i, name in enumerate(("alpha", "beta")):
        make_reference_images(root / "groups" / name, n=2, size=(64, 48), seed=i)
    prompts = root / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"prompts": [{"prompt": "a red circle in the same style", "id": "circle"}]}))
    out = root / "out"
    res = invoke(
        "generate",
        root / "groups",
        "--prompts",
        prompts,
        "-o",
        out,
        "-n",
        "2",
        "--base-model",
        tiny.base_model,
        "--mllm",
        tiny.mllm,
        "--adapter",
        tiny.adapter_lora,
        "--device",
        "cpu",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "-q",
        cli_app=easyref_app,
    )
    assert res.exit_code == 0, res.output
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval" / "per_image.jsonl").read_text().splitlines()]


def test_eval_end_to_end_with_self_targets(generated, scorers, monkeypatch):
    embedded: list[list[Path]] = []
    for cls in (metrics.ClipEmbedder, metrics.DinoEmbedder):
        original = cls.embed_images

        def spy(self, paths, *args, _original=original, **kwargs):
            embedded.append([Path(p).resolve() for p in paths])
            return _original(self, paths, *args, **kwargs)

        monkeypatch.setattr(cls, "embed_images", spy)

    res = invoke(
        "eval",
        generated,
        "--clip-model",
        scorers["clip"],
        "--dino-model",
        scorers["dinov2"],
        "--targets",
        generated,
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "-q",
    )
    assert res.exit_code == 0, res.output

    # Each distinct image embedded once per model: 4 generated + 2×2 references (targets = outputs).
    assert [len(paths) for paths in embedded] == [8, 8]
    assert all(len(set(paths)) == len(paths) for paths in embedded)

    rows = _rows(generated)
    assert len(rows) == 4 and {r["group"] for r in rows} == {"alpha", "beta"}
    for row in rows:
        assert row["references"] == 2 and row["prompt"] == "a red circle in the same style"
        assert row["target"] is not None and Path(row["target"]).name == Path(row["path"]).name
        for key in ("clip_i", "clip_t", "dino_i", "clip_i_target", "dino_i_target"):
            assert math.isfinite(row[key]) and -1.0 <= row[key] <= 1.0, (key, row[key])
        # An image compared with itself scores 1.
        assert row["clip_i_target"] == pytest.approx(1.0, abs=1e-6)
        assert row["dino_i_target"] == pytest.approx(1.0, abs=1e-6)
        assert row["clip_i"] < 1.0 - 1e-6  # noise pictures are not their references

    data = json.loads((generated / "eval" / "metrics.json").read_text())
    assert data["counts"] == {"images": 4, "groups": 2, "failed": 0, "missing": 0, "superseded": 0}
    assert data["models"] == {"clip": str(scorers["clip"]), "dino": str(scorers["dinov2"])}
    assert data["overall"]["count"] == 4 and data["overall"]["target_count"] == 4
    assert data["overall"]["clip_i"] == pytest.approx(np.mean([r["clip_i"] for r in rows]))
    alpha = [r for r in rows if r["group"] == "alpha"]
    assert data["groups"]["alpha"]["dino_i"] == pytest.approx(np.mean([r["dino_i"] for r in alpha]))
    assert data["groups"]["alpha"]["clip_i_target"] == pytest.approx(1.0, abs=1e-6)

    table = res.stdout.splitlines()
    assert table[0].startswith("| group | images | with target | CLIP-I")
    assert table[2].startswith("| alpha | 2 | 2 |") and table[3].startswith("| beta | 2 | 2 |")
    assert table[4].startswith("| **overall** | 4 | 4 |")


def test_eval_accepts_dino_vit_and_writes_no_target_keys(generated, scorers):
    res = invoke(
        "eval", generated, "--clip-model", scorers["clip"], "--dino-model", scorers["dino_vit"], "--device", "cpu", "-q"
    )
    assert res.exit_code == 0, res.output
    rows = _rows(generated)
    assert len(rows) == 4 and all("clip_i_target" not in r for r in rows)
    assert all(-1.0 <= r["dino_i"] <= 1.0 for r in rows)
    assert "target" not in res.stdout


@pytest.mark.parametrize(
    "option, value, fragments",
    [
        ("--clip-model", "missing-folder", ["--clip-model", "no such folder"]),
        (
            "--clip-model",
            "nobody/no-such-clip",
            ["nobody/no-such-clip", "not in the Hugging Face cache", "hf download"],
        ),
        ("--dino-model", "nobody/no-such-dino", ["nobody/no-such-dino", "--dino-model"]),
        ("--clip-model", "<dinov2>", ["'dinov2' model, not clip", "hf download openai/clip-vit-large-patch14"]),
        ("--dino-model", "<clip>", ["'clip' model, not dinov2"]),
        ("--dino-model", "<empty>", ["cannot load the config", "--dino-model wants"]),
    ],
)
def test_missing_or_wrong_weights_exit_2_with_guidance(
    generated, scorers, tmp_path, monkeypatch, option, value, fragments
):
    def no_loading(*args, **kwargs):
        raise AssertionError("both models are checked before either is loaded")

    monkeypatch.setattr(metrics.ClipEmbedder, "load", no_loading)
    special = {
        "<dinov2>": scorers["dinov2"],
        "<clip>": scorers["clip"],
        "<empty>": tmp_path,
        "missing-folder": tmp_path / "missing-folder",
    }
    models = {"--clip-model": scorers["clip"], "--dino-model": scorers["dinov2"]}
    models[option] = special.get(value, value)
    res = invoke("eval", generated, *[x for kv in models.items() for x in kv], "--device", "cpu", "-q")
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("Error: ")
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


def test_report_after_eval(generated, scorers):
    res = invoke(
        "eval", generated, "--clip-model", scorers["clip"], "--dino-model", scorers["dinov2"], "--device", "cpu", "-q"
    )
    assert res.exit_code == 0, res.output
    res = invoke("report", generated)
    assert res.exit_code == 0, res.output
    report_dir = generated / "report"
    assert res.stdout.strip() == str(report_dir / "index.html")
    sheets = sorted(report_dir.glob("*.png"))
    assert [p.name for p in sheets] == ["alpha.png", "beta.png"]
    for sheet in sheets:
        with Image.open(sheet) as im:
            im.verify()
        with Image.open(sheet) as im:
            assert im.format == "PNG" and im.width >= 2 * 192 and im.height > 2 * 192
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    for sheet in sheets:
        assert f'href="{sheet.name}"' in page and f'src="{sheet.name}"' in page
    assert "<table>" in page and "CLIP-I" in page and "DINO-I" in page and "overall" in page
    assert "http://" not in page and "https://" not in page  # static, nothing fetched


def test_model_tiny_smoke_run_and_its_conflicts(generated, scorers):
    res = invoke("eval", generated, "--model", "tiny", "--clip-model", scorers["clip"])
    assert res.exit_code == 2 and "--model tiny replaces" in res.stderr
    res = invoke("eval", generated, "--model", "huge")
    assert res.exit_code == 2 and "--model must be one of tiny" in res.stderr
    res = invoke("eval", generated, "--model", "tiny", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "RANDOM" in res.stderr and "| **overall** | 4 |" in res.stdout
    assert json.loads((generated / "eval" / "metrics.json").read_text())["models"]["clip"].endswith("clip")
