"""Provenance that is safe to share: relative paths, metadata levels, the XMP AI label, C2PA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from easyref_cli import files
from easyref_cli.cli import app
from easyref_cli.labels import TRAINED_ALGORITHMIC_MEDIA, XMP_CHUNK, parse_xmp
from easyref_cli.testing import make_reference_images

runner = CliRunner()


def _models(tiny) -> list[str]:
    return ["--base-model", str(tiny.base_model), "--mllm", str(tiny.mllm), "--adapter", str(tiny.adapter_lora)]


def _generate(tiny, groups: Path, out: Path, *extra) -> Path:
    args = ["generate", str(groups), "--prompt", "a cat", "-o", str(out), *_models(tiny), "--device", "cpu",
            "--width", "64", "--height", "64", "--steps", "1", "-q", "--no-cache", *extra]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    [png] = sorted(out.rglob("*.png"))
    return png


@pytest.fixture
def groups(tmp_path) -> Path:
    make_reference_images(tmp_path / "refs" / "cats", n=2, size=(32, 32))
    return tmp_path / "refs"


def _absolute_strings(*paths: Path) -> list[bytes]:
    """Every absolute location a record could leak (as given and resolved), and the user's home."""
    found = {str(Path.home()).encode()}
    for path in paths:
        found |= {str(path).encode(), str(Path(path).resolve()).encode()}
    return sorted(found)


def test_no_absolute_path_in_a_default_png(tiny, groups, tmp_path):
    png = _generate(tiny, groups, tmp_path / "out")
    data = png.read_bytes()
    for leak in _absolute_strings(groups, tiny.root, tiny.base_model, tiny.adapter_lora, tmp_path):
        assert leak not in data, leak
    record = files.read_png_record(png)
    assert [r["path"] for r in record["references"]] == ["cats/ref_00.png", "cats/ref_01.png"]
    assert record["base_model"] == "sdxl" and all(len(r["sha256"]) == 64 for r in record["references"])
    # the manifest (local) keeps the full record, absolute paths included
    [line] = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert line["record"]["references"][0]["path"] == str((groups / "cats" / "ref_00.png").resolve())
    absolute = _generate(tiny, groups, tmp_path / "abs", "--record-paths", "absolute")
    assert str((groups / "cats" / "ref_00.png").resolve()).encode() in absolute.read_bytes()


def test_replay_from_relative_paths_on_a_moved_folder(tiny, groups, tmp_path):
    png = _generate(tiny, groups, tmp_path / "out")
    moved = tmp_path / "elsewhere" / "refs"
    shutil.move(str(groups), str(moved))
    replay = ["generate", "--from-image", str(png), "-o", str(tmp_path / "again"), *_models(tiny), "-q", "--no-cache"]
    res = runner.invoke(app, [*replay, "--groups-root", str(moved)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "cats" / png.name).read_bytes() == png.read_bytes()
    res = runner.invoke(app, [*replay, "--groups-root", str(tmp_path), "--overwrite"])
    assert res.exit_code == 2 and "cats/ref_00.png under" in res.output and "--groups-root" in res.output
    # a model the record names without its path must be given
    res = runner.invoke(app, ["generate", "--from-image", str(png), "-o", str(tmp_path / "x"), "--groups-root",
                              str(moved), "--dry-run"])  # fmt: skip
    assert res.exit_code == 2 and "pass --base-model PATH" in res.output
    (moved / "cats" / "ref_01.png").write_bytes((moved / "cats" / "ref_00.png").read_bytes())
    res = runner.invoke(app, [*replay, "--groups-root", str(moved), "--overwrite"])
    assert res.exit_code == 2 and "ref_01.png has changed" in res.output


def test_metadata_levels_strip_what_they_say(tiny, groups, tmp_path):
    full = _generate(tiny, groups, tmp_path / "full")
    minimal = _generate(tiny, groups, tmp_path / "minimal", "--metadata", "minimal")
    none = _generate(tiny, groups, tmp_path / "none", "--metadata", "none")
    with Image.open(full) as a, Image.open(minimal) as b, Image.open(none) as c:
        assert a.tobytes() == b.tobytes() == c.tobytes()  # the pixels do not depend on it
        assert set(a.text) == {"parameters", "easyref", XMP_CHUNK}
        assert set(b.text) == {"parameters", XMP_CHUNK} and set(c.text) == {XMP_CHUNK}
        assert "Model:" in a.text["parameters"] and "Steps: 1" in b.text["parameters"]
    data = minimal.read_bytes()
    assert b"easyref\x00" not in data and b"ref_00" not in data and b"sdxl" not in data and b"Model:" not in data
    assert b"parameters" not in none.read_bytes() and b"a cat" not in none.read_bytes()
    # resume still knows them: the manifest keeps the full record
    for out, level in ((tmp_path / "minimal", "minimal"), (tmp_path / "none", "none")):
        args = ["generate", str(groups), "--prompt", "a cat", "-o", str(out), *_models(tiny), "--device", "cpu",
                "--width", "64", "--height", "64", "--steps", "1", "--no-cache", "--metadata", level, "--json"]  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout.splitlines()[-1])["status"] == "skipped"


def test_every_image_carries_the_ai_label(tiny, groups, tmp_path):
    from easyref_cli import __version__

    for level in ("full", "none"):
        png = _generate(tiny, groups, tmp_path / level, "--metadata", level)
        label = files.read_png_metadata(png).label
        assert label == {"digital_source_type": TRAINED_ALGORITHMIC_MEDIA, "creator_tool": f"easyref-cli {__version__}"}
    with Image.open(png) as im:
        packet = im.info["xmp"]
    assert parse_xmp(packet)["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
    assert packet.startswith(b"<?xpacket begin=") and b'<?xpacket end="r"?>' in packet
    res = runner.invoke(app, ["inspect", str(png)])
    assert res.exit_code == 0 and "easyref record: no" in res.stderr and "trainedAlgorithmicMedia" in res.stderr


def test_c2pa_credentials_signed_into_each_png_and_verified_by_inspect(tiny, groups, tmp_path):
    pytest.importorskip("c2pa", reason="the c2pa extra (c2pa-python) is not installed")
    from easyref_cli import credentials
    from tests.c2pa_certs import make_test_certificate

    cert, key = make_test_certificate(tmp_path / "certs")
    png = _generate(tiny, groups, tmp_path / "out", "--c2pa-cert", str(cert), "--c2pa-key", str(key))
    found = credentials.read_credentials(png)
    assert found["valid"] and not found["trusted"]  # a test CA is on no trust list
    assert [r["name"] for r in found["references"]] == ["cats/ref_00.png", "cats/ref_01.png"]
    assert files.read_png_record(png)["prompt"] == "a cat"  # the other chunks survive signing
    res = runner.invoke(app, ["inspect", str(png)])
    assert res.exit_code == 0 and "C2PA content credentials: valid, signer not on the C2PA trust list" in res.stderr
    for leak in _absolute_strings(groups, tmp_path):
        assert leak not in png.read_bytes()
    res = runner.invoke(app, ["generate", str(groups), "--prompt", "a", "-o", str(tmp_path / "x"), "--dry-run",
                              "--c2pa-cert", str(cert)])  # fmt: skip
    assert res.exit_code == 2 and "needs both --c2pa-cert and --c2pa-key" in res.output


def test_report_names_the_output_folder_without_its_location(tiny, groups, tmp_path):
    out = tmp_path / "out"
    _generate(tiny, groups, out)
    res = runner.invoke(app, ["report", str(out), "-q"])
    assert res.exit_code == 0, res.output
    html = (out / "report" / "index.html").read_text()
    assert str(tmp_path) not in html and "<code>out</code>" in html
    runner.invoke(app, ["report", str(out), "-q", "--show-paths"])
    assert str(out.resolve()) in (out / "report" / "index.html").read_text()
