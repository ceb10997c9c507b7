"""`easyref report` and `easyref inspect` on images made from input images (ControlNet, img2img,
inpainting): the record's ``inputs`` read by collect_images, drawn beside each result in the contact
sheet, counted in index.html, and checked against their sha256 by inspect.

Output folders are hand-made (PNGs + manifest written with files.py, no models), as in test_eval.py.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easyref_cli import files
from easyref_cli.commands import inspect
from easyref_cli.eval import collect_images, report

MAGENTA = (255, 0, 255)  # the control image: no other pixel of a sheet has this colour
ORANGE = (255, 128, 0)  # the init image
ABSENT = object()  # leave the record's ``inputs`` key out


def _solid(path: Path, colour, size=(48, 40), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    """A reference image and the input images of an inpainting job with one ControlNet."""
    return {
        "ref": _solid(tmp_path / "refs" / "r1.png", (30, 200, 30)),
        "control": _solid(tmp_path / "in" / "pose01.png", MAGENTA),
        "init": _solid(tmp_path / "in" / "photo01.png", ORANGE),
        "mask": _solid(tmp_path / "in" / "mask01.png", 255, mode="L"),
    }


def _entry(path: Path) -> dict:
    return {"path": str(path.resolve()), "sha256": files.sha256_file(path)}


def all_inputs(sources: dict[str, Path]) -> dict:
    return {
        "name": "pose01",
        "control": [_entry(sources["control"])],
        "init": _entry(sources["init"]),
        "mask": _entry(sources["mask"]),
    }


def make_out(out: Path, ref: Path, jobs: list[dict]) -> Path:
    """An output folder as `easyref generate` writes it: the manifest keeps the full record (absolute
    paths), the PNG carries ``png_inputs`` (default: the same ``inputs``) — ``ABSENT`` leaves the key out."""
    with files.ManifestWriter(out / files.MANIFEST_NAME) as manifest:
        for k, job in enumerate(jobs):
            job_id, name = f"job{k:04d}", f"{job['group']}/p_{job['seed']}.png"
            record = {
                "job_id": job_id,
                "group": job["group"],
                "prompt_id": "p",
                "seed": job["seed"],
                "prompt": "a dancer in the pose of the control image",
                "output": name,
                "references": [_entry(ref)],
            }
            png_record = dict(record)
            if job.get("inputs", ABSENT) is not ABSENT:
                record["inputs"] = job["inputs"]
            if job.get("png_inputs", job.get("inputs", ABSENT)) is not ABSENT:
                png_record["inputs"] = job.get("png_inputs", job.get("inputs"))
            files.write_png_atomic(out / name, Image.new("RGB", (64, 64), (40, 90, 160)), record=png_record)
            entry = {
                "job_id": job_id,
                "status": "ok",
                "path": str(out / name),
                "group": job["group"],
                "seed": job["seed"],
            }
            manifest.write(
                {**entry, "prompt_id": "p", **({"record": record} if job.get("manifest_record", True) else {})}
            )
    return out


def sheet_of(out: Path, group: str = "g", thumb: int = 128, **kwargs) -> Image.Image:
    images = collect_images(out).groups()[group]
    return report.contact_sheet(group, images, thumb=thumb, **kwargs)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def has_colour(image: Image.Image, colour) -> bool:
    return bool(np.all(np.asarray(image.convert("RGB")) == np.array(colour, dtype=np.uint8), axis=-1).any())


@pytest.fixture
def drawn(monkeypatch) -> list[str]:
    """Every text the contact sheet draws."""
    texts: list[str] = []
    original = report._text

    def spy(draw, xy, text, font, fill=report._TEXT):
        texts.append(text)
        original(draw, xy, text, font, fill)

    monkeypatch.setattr(report, "_text", spy)
    return texts


# ----------------------------------------------------------------------------------------------
# collect_images
# ----------------------------------------------------------------------------------------------


def test_collect_images_reads_the_inputs_in_order(tmp_path, sources):
    two = {"control": [_entry(sources["control"]), _entry(sources["init"])]}
    out = make_out(
        tmp_path / "out",
        sources["ref"],
        [{"group": "g", "seed": 0, "inputs": all_inputs(sources)}, {"group": "g", "seed": 1, "inputs": two}],
    )
    first, second = collect_images(out).images
    assert first.inputs == (
        ("control", sources["control"].resolve()),
        ("init", sources["init"].resolve()),
        ("mask", sources["mask"].resolve()),
    )
    assert [label for label, _ in second.inputs] == ["control 1", "control 2"]


def test_plain_records_carry_no_inputs(tmp_path, sources):
    out = make_out(
        tmp_path / "out", sources["ref"], [{"group": "g", "seed": 0}, {"group": "g", "seed": 1, "inputs": {}}]
    )
    assert [im.inputs for im in collect_images(out).images] == [(), ()]


def test_relative_png_paths_resolve_from_the_current_folder_then_the_output_folders_parent(
    tmp_path, sources, monkeypatch
):
    relative = {"control": [{**_entry(sources["control"]), "path": "in/pose01.png"}]}
    out = make_out(
        tmp_path / "out",
        sources["ref"],
        [{"group": "g", "seed": 0, "inputs": relative, "manifest_record": False}],  # the PNG's record is read
    )
    monkeypatch.chdir(tmp_path)
    assert collect_images(out).images[0].inputs == (("control", Path("in/pose01.png")),)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert collect_images(out).images[0].inputs == (("control", tmp_path / "in/pose01.png"),)
    sources["control"].unlink()  # nowhere: kept as recorded
    assert collect_images(out).images[0].inputs == (("control", Path("in/pose01.png")),)


@pytest.mark.parametrize(
    "inputs",
    ["oops", ["a"], {"control": "pose.png"}, {"control": [{"sha256": "x"}, 3]}, {"init": {"path": ""}, "mask": 7}],
)
def test_malformed_inputs_are_ignored(tmp_path, sources, inputs, caplog):
    out = make_out(tmp_path / "out", sources["ref"], [{"group": "g", "seed": 0, "inputs": inputs}])
    with caplog.at_level(logging.DEBUG, logger="easyref_cli.eval"):
        (image,) = collect_images(out).images
    assert image.inputs == ()
    assert "ignored" in caplog.text
    report.contact_sheet("g", [image], thumb=64)  # and the sheet is the plain one


# ----------------------------------------------------------------------------------------------
# Contact sheets
# ----------------------------------------------------------------------------------------------


def test_sheet_shows_each_result_after_its_inputs(tmp_path, sources, drawn):
    jobs = [{"group": "g", "seed": s, "inputs": all_inputs(sources)} for s in range(2)]
    with_inputs = sheet_of(make_out(tmp_path / "a", sources["ref"], jobs))
    texts = list(drawn)
    plain = sheet_of(make_out(tmp_path / "b", sources["ref"], [{"group": "g", "seed": s} for s in range(2)]))
    assert with_inputs.width > plain.width and with_inputs.height > plain.height
    assert has_colour(with_inputs, MAGENTA) and has_colour(with_inputs, ORANGE)
    assert not has_colour(plain, MAGENTA) and not has_colour(plain, ORANGE)
    for label in ("control: pose01.png", "init: photo01.png", "mask: mask01.png", "result"):
        assert texts.count(label) == 2, label
    assert any("2 from input images (control, init, mask)" in t for t in texts)


def test_plain_sheets_are_unchanged(tmp_path, sources):
    """No inputs (the key absent, an empty ``inputs``, or inputs stripped from the images): one layout."""
    jobs = [{"group": "g", "seed": s, "inputs": ABSENT} for s in range(3)]
    absent = make_out(tmp_path / "a", sources["ref"], jobs)
    empty = make_out(tmp_path / "b", sources["ref"], [{**j, "inputs": {}} for j in jobs])
    made = make_out(tmp_path / "c", sources["ref"], [{**j, "inputs": all_inputs(sources)} for j in jobs])
    for kwargs in ({}, {"columns": 2, "max_images": 2}):
        expected = png_bytes(sheet_of(absent, **kwargs))
        assert png_bytes(sheet_of(empty, **kwargs)) == expected
        stripped = [dataclasses.replace(im, inputs=()) for im in collect_images(made).groups()["g"]]
        assert png_bytes(report.contact_sheet("g", stripped, thumb=128, **kwargs)) == expected


def test_columns_count_thumbnails_and_results_line_up(tmp_path, sources):
    control_only = {"control": [_entry(sources["control"])]}
    jobs = [{"group": "g", "seed": s, "inputs": all_inputs(sources) if s == 0 else control_only} for s in range(4)]
    images = collect_images(make_out(tmp_path / "out", sources["ref"], jobs)).groups()["g"]
    grid, cells, _ = report._generated_layout(images, report._Grid(64, 6, 14, report._font(12)), 8)
    assert isinstance(grid, report._InputGrid) and grid.slots == 4 and grid.columns == 2
    assert [len(c) for c in cells] == [4, 2, 2, 2] and all(c[-1][0] == "result" for c in cells)
    narrow, _, _ = report._generated_layout(images, report._Grid(64, 6, 14, report._font(12)), 1)
    assert narrow.columns == 1  # at least one composite a row


def test_a_missing_input_is_a_labelled_placeholder(tmp_path, sources, drawn, caplog):
    out = make_out(tmp_path / "out", sources["ref"], [{"group": "g", "seed": 0, "inputs": all_inputs(sources)}])
    sources["mask"].unlink()
    sources["control"].unlink()
    sheet = sheet_of(out)
    assert "mask (missing)" in drawn and "control (missing)" in drawn and "init: photo01.png" in drawn
    assert drawn.count("missing / unreadable") == 2
    assert not has_colour(sheet, MAGENTA) and has_colour(sheet, report._CELL_BACKGROUND)
    assert "cannot read mask" in caplog.text and "cannot read control image" in caplog.text
    drawn.clear()
    sheet_of(out, thumb=64)  # too narrow for "control (missing)"
    assert drawn.count("(missing)") == 2


def test_report_index_counts_images_with_inputs(tmp_path, sources):
    jobs = [
        {"group": "made", "seed": 0, "inputs": all_inputs(sources)},
        {"group": "made", "seed": 1},
        {"group": "plain", "seed": 0},
    ]
    out = make_out(tmp_path / "out", sources["ref"], jobs)
    result = report.build_report(out, thumb=64)
    page = result.index.read_text(encoding="utf-8")
    assert page.count("from input images") == 1
    assert "2 image(s), 1 from input images (control, init, mask)." in page
    with Image.open(result.sheets["made"]) as made, Image.open(result.sheets["plain"]) as plain:
        assert has_colour(made, MAGENTA) and not has_colour(plain, MAGENTA)


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------


def test_inspect_checks_each_input_against_its_sha256(tmp_path, sources, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = {
        "name": "pose01",
        "control": [{**_entry(sources["control"]), "path": "in/pose01.png"}, {"path": "in/gone.png", "sha256": "0"}],
        "init": {**_entry(sources["init"]), "path": "in/photo01.png"},
        "mask": {**_entry(sources["mask"]), "path": "in/mask01.png"},
    }
    out = make_out(tmp_path / "out", sources["ref"], [{"group": "g", "seed": 0, "inputs": relative}])
    _solid(sources["init"], (0, 0, 0))  # edited since the run
    lines = inspect.summary(out / "g/p_0.png", files.read_png_metadata(out / "g/p_0.png"))
    assert lines[:5] == [
        "easyref record: yes (absolute paths)",
        "control image 1: in/pose01.png (sha256 ok)",
        "control image 2: in/gone.png (not found)",
        "init image: in/photo01.png (changed since)",
        "mask: in/mask01.png (sha256 ok)",
    ]


def test_inspect_single_control_and_plain_records(tmp_path, sources, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = {"control": [{"path": "in/pose01.png", "sha256": files.sha256_file(sources["control"])}]}
    assert inspect.input_lines({"inputs": one}) == ["control image: in/pose01.png (sha256 ok)"]
    assert inspect.input_lines({"inputs": {"mask": {"path": "in/mask01.png"}}}) == [
        "mask: in/mask01.png (found, no sha256 recorded)"
    ]
    out = make_out(tmp_path / "out", sources["ref"], [{"group": "g", "seed": 0}])
    lines = inspect.summary(out / "g/p_0.png", files.read_png_metadata(out / "g/p_0.png"))
    assert lines[0] == "easyref record: yes (absolute paths)" and lines[1].startswith("A1111 parameters:")
    assert inspect.input_lines({"inputs": "garbled"}) == []
