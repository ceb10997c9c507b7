"""Small reliability fixes: replayed settings are validated, runaway YAML aliases are refused, the
report never overwrites a file it did not write, the aspect-ratio error names the image, the
offline hint names the demo, and log lines do not glue onto progress bars. No model is loaded."""

from __future__ import annotations

import io
import logging
import math
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from easyref_cli import files
from easyref_cli.clitools import BarSafeHandler
from easyref_cli.errors import InputError, ModelError, UsageError
from easyref_cli.testing import make_reference_images

# ----------------------------------------------------------------------------------------------
# 1. --from-image: the recorded settings get the prompt file's validation
# ----------------------------------------------------------------------------------------------


def _record_png(tmp_path: Path, **changes) -> Path:
    """A PNG whose easyref record is a planned job's, with ``changes`` written over it."""
    from easyref_cli.plan import build_plan
    from easyref_cli.records import job_record

    groups = tmp_path / "groups"
    make_reference_images(groups / "alpha", n=2, size=(64, 48), seed=0)
    plan = build_plan(groups=[groups], out_dir=tmp_path / "out", prompt="p", cli={"width": 64, "height": 64})
    record = {**job_record(plan.jobs[0], plan.models.as_dict()), **changes}
    png = tmp_path / "made" / "p_0.png"
    files.write_png_atomic(png, Image.new("RGB", (64, 64)), record=record)
    return png


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("steps", -5, "must be ≥ 1"),
        ("guidance", math.nan, "finite"),
        ("width", 63, "multiple of 8"),
        ("scheduler", "bogus", "must be one of"),
        ("index", -1, "must be ≥ 0"),
        ("index", "x", "integer"),
    ],
)
def test_replay_refuses_settings_a_prompt_file_would_refuse(tmp_path, key, value, says):
    from easyref_cli.plan import build_plan

    png = _record_png(tmp_path, **{key: value})
    with pytest.raises(InputError) as err:
        build_plan(from_image=png, out_dir=tmp_path / "again", groups_root=tmp_path / "groups")
    message = str(err.value)
    assert str(png) in message and f"{key}: " in message and says in message


def test_replay_of_a_valid_record_still_plans(tmp_path):
    from easyref_cli.plan import build_plan

    png = _record_png(tmp_path, steps=3, guidance=2)
    plan = build_plan(from_image=png, out_dir=tmp_path / "again", groups_root=tmp_path / "groups")
    assert (plan.jobs[0].settings.steps, plan.jobs[0].settings.guidance) == (3, 2.0)


# ----------------------------------------------------------------------------------------------
# 2. YAML aliases: a "billion laughs" file is refused before it is built
# ----------------------------------------------------------------------------------------------


def _billion_laughs(path: Path) -> Path:
    lines = ['lol0: &l0 "lol"']
    lines += [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path.write_text("\n".join(lines) + "\nprompts: *l9\n", encoding="utf-8")
    return path


def test_billion_laughs_prompt_file_is_refused(tmp_path):
    from easyref_cli.prompts import load_prompt_file
    from easyref_cli.yamlio import MAX_ALIAS_NODES, load_yaml_with_lines

    path = _billion_laughs(tmp_path / "laughs.yaml")
    with pytest.raises(UsageError) as err:
        load_yaml_with_lines(path, what="prompt file")
    message = str(err.value)
    # lol6 (line 7) is the first anchor whose repeats pass the bound: 9**6 > 100,000
    assert message.startswith(f"{path}:7: ") and f"{MAX_ALIAS_NODES:,} nodes" in message
    with pytest.raises(UsageError, match=re.escape(str(path))):
        load_prompt_file(path)


def test_billion_laughs_preset_is_refused(tmp_path):
    from easyref_cli.presets import load_preset

    path = _billion_laughs(tmp_path / "laughs.yaml")
    with pytest.raises(UsageError, match=re.escape(f"{path}:7: ")):
        load_preset(str(path))


def test_recursive_alias_is_refused(tmp_path):
    from easyref_cli.yamlio import load_yaml_with_lines

    path = tmp_path / "loop.yaml"
    path.write_text("prompts:\n  - &p [1, *p]\n", encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(f"{path}:2: ") + ".*recursive"):
        load_yaml_with_lines(path)


def test_ordinary_anchors_and_merge_keys_still_load(tmp_path):
    from easyref_cli.yamlio import load_yaml_with_lines

    path = tmp_path / "prompts.yaml"
    path.write_text(
        "defaults: &d\n  steps: 3\n  guidance: 2\nseeds: &s [1, 2, 3]\n"
        "prompts:\n  - {prompt: a, <<: *d, steps: 4, seeds: *s}\n  - {prompt: b, <<: *d, seeds: *s}\n",
        encoding="utf-8",
    )
    data, lines = load_yaml_with_lines(path)
    assert data["prompts"] == [
        {"prompt": "a", "steps": 4, "guidance": 2, "seeds": [1, 2, 3]},
        {"prompt": "b", "steps": 3, "guidance": 2, "seeds": [1, 2, 3]},
    ]
    assert lines[("prompts", 1)] == 7


# ----------------------------------------------------------------------------------------------
# 3. easyref report never overwrites a file it did not write
# ----------------------------------------------------------------------------------------------


def _out_with_image_at(out: Path, name: str, group: str = "alpha") -> Path:
    """An output folder whose one finished image is ``OUT/name`` (as ``--name-template`` allows)."""
    refs = make_reference_images(out.parent / "refs", n=1, size=(32, 32))
    record = {
        "job_id": "job0",
        "group": group,
        "prompt_id": "p",
        "seed": 0,
        "prompt": "a",
        "output": name,
        "references": [{"path": str(p.resolve()), "sha256": files.sha256_file(p)} for p in refs],
    }
    files.write_png_atomic(out / name, Image.new("RGB", (64, 64), (10, 200, 30)), record=record)
    with files.ManifestWriter(out / files.MANIFEST_NAME) as manifest:
        manifest.write(
            {"job_id": "job0", "status": "ok", "path": str(out / name), "group": group, "prompt_id": "p", "seed": 0}
        )
    return out / name


def test_report_leaves_a_generated_image_named_like_a_sheet(tmp_path, caplog):
    from easyref_cli.eval.report import build_report, is_report_file

    image = _out_with_image_at(tmp_path / "out", "report/alpha.png")
    before = image.read_bytes()
    with caplog.at_level(logging.WARNING):
        result = build_report(tmp_path / "out", thumb=32)
    assert image.read_bytes() == before
    assert result.sheets["alpha"] == tmp_path / "out" / "report" / "alpha-2.png"
    assert is_report_file(result.sheets["alpha"]) and not is_report_file(image)
    assert 'href="alpha-2.png"' in result.index.read_text(encoding="utf-8")
    assert str(image) in caplog.text
    # a second report overwrites its own sheet and index, still not the image
    again = build_report(tmp_path / "out", thumb=32)
    assert again.sheets == result.sheets and image.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out" / "report").iterdir()) == ["alpha-2.png", "alpha.png", "index.html"]


def test_report_refuses_to_overwrite_an_index_it_did_not_write(tmp_path):
    from easyref_cli.eval.report import build_report

    _out_with_image_at(tmp_path / "out", "alpha/p_0.png")
    index = tmp_path / "out" / "report" / "index.html"
    index.parent.mkdir()
    index.write_text("my own notes\n", encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(str(index))):
        build_report(tmp_path / "out", thumb=32)
    assert index.read_text(encoding="utf-8") == "my own notes\n"
    assert sorted(p.name for p in index.parent.iterdir()) == ["index.html"]  # nothing else written


# ----------------------------------------------------------------------------------------------
# 4. The aspect-ratio limit names the image
# ----------------------------------------------------------------------------------------------


class _NoProcessor:
    def __call__(self, **_):  # pragma: no cover - the aspect check fails first
        raise AssertionError("the image processor should not run")


def test_extreme_aspect_reference_names_the_image(tmp_path):
    from easyref_cli.model.encoder import ReferenceEncoder

    wide = tmp_path / "wide.png"
    Image.new("RGB", (4000, 8), (255, 0, 0)).save(wide)
    fine = Image.new("RGB", (64, 48))
    stub = type("Stub", (), {"image_processor": _NoProcessor()})()
    with Image.open(wide) as opened:  # an image that knows its file
        with pytest.raises(InputError) as err:
            ReferenceEncoder.prepare_images(stub, [fine, opened])
    message = str(err.value)
    assert str(wide) in message and "4000×8" in message and "500:1" in message and "200:1" in message
    loaded = files.load_image(wide)  # what a run encodes: load_image passes the file on
    with pytest.raises(InputError, match=re.escape(f"reference image {wide} (4000×8 pixels)")):
        ReferenceEncoder.prepare_images(stub, [fine, loaded])
    loaded.info.pop("path")  # an image that does not know its file: its place in the group
    with pytest.raises(InputError, match=r"reference image 2 of 2 \(4000×8 pixels\)"):
        ReferenceEncoder.prepare_images(stub, [fine, loaded])


# ----------------------------------------------------------------------------------------------
# 5. The offline hint names the trained demo
# ----------------------------------------------------------------------------------------------


def test_missing_hub_model_hint_names_the_demo(tmp_path, monkeypatch):
    from easyref_cli.model import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelError) as err:
        hub.resolve_folder("nobody/no-such-model", "--base-model")
    assert "--base-model DIR" in str(err.value) and "--model demo` for an offline run" in str(err.value)
    with pytest.raises(ModelError, match="easyref eval --model tiny"):
        hub.resolve_folder("nobody/no-such-model", "--clip-model")


# ----------------------------------------------------------------------------------------------
# 6. A log record during a progress bar gets its own line
# ----------------------------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    """What a terminal shows: ``\\r`` returns to the line start, so split on it too."""
    return [part.strip() for part in re.split(r"[\r\n]", text) if part.strip()]


def test_log_record_during_a_bar_is_on_its_own_line(monkeypatch):
    from tqdm.auto import tqdm

    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    handler = BarSafeHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("easyref_cli.test_bar")
    log.addHandler(handler)
    log.propagate = False
    try:
        bar = tqdm(total=3, desc="generating", file=sys.stderr, mininterval=0)
        bar.update(1)
        log.error("job x failed: boom")
        bar.update(2)
        bar.close()
    finally:
        log.removeHandler(handler)
        log.propagate = True
    text = stderr.getvalue()
    assert "ERROR easyref_cli.test_bar: job x failed: boom" in _lines(text)
    assert "generating" in text  # the bar was drawn around it
    # the plain handler it replaces glued the message onto the bar's line
    glued = io.StringIO()
    bar = tqdm(total=3, desc="generating", file=glued, mininterval=0)
    bar.update(1)
    logging.StreamHandler(glued).emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, "boom", (), None))
    bar.close()
    assert "boom" not in _lines(glued.getvalue())


def test_setup_logging_installs_the_bar_safe_handler():
    from easyref_cli.clitools import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(0, False)
        assert [type(h) for h in root.handlers] == [BarSafeHandler] and root.handlers[0].stream is sys.stderr
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
