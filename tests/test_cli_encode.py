"""`easyref encode`: output contract and bad-input handling through the real CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from easyref_cli.cli import app

runner = CliRunner()


def _encode(tiny, group, out, *extra, adapter=None, mllm=None):
    args = [
        "encode",
        str(group),
        "--prompt",
        "a cat",
        "--mllm",
        str(mllm or tiny.mllm),
        "--adapter",
        str(adapter or tiny.adapter),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    return runner.invoke(app, args)


def test_encode_writes_cond_and_uncond(tiny, ref_group, tmp_path):
    out = tmp_path / "c.safetensors"
    res = _encode(tiny, ref_group, out, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("cond").shape == (64, 64)
        assert f.get_tensor("uncond").shape == (64, 64)
        meta = f.metadata()
    assert meta["caption"] == "a cat" and meta["instruction"].startswith("Visualize a scene")
    assert meta["mllm"] == str(tiny.mllm) and len(meta["adapter_sha256"]) == 64
    assert len(json.loads(meta["references"])) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_encode_deepspeed_checkpoint(tiny, ref_group, tmp_path):
    res = _encode(tiny, ref_group, tmp_path / "d.safetensors", adapter=tiny.adapter_deepspeed)
    assert res.exit_code == 0, res.output


def _group_with(tmp_path, name, content: bytes):
    g = tmp_path / "g"
    g.mkdir(exist_ok=True)
    (g / name).write_bytes(content)
    return g


def test_truncated_image_is_named(tiny, ref_group, tmp_path):
    good = next(ref_group.iterdir()).read_bytes()
    g = _group_with(tmp_path, "broken.png", good[: len(good) // 2])
    res = _encode(tiny, g, tmp_path / "o.safetensors")
    assert res.exit_code == 2
    assert "broken.png" in res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_unreadable_image_is_named(tiny, tmp_path):
    g = _group_with(tmp_path, "fake.jpg", b"this is not a jpeg")
    res = _encode(tiny, g, tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "fake.jpg" in res.output


def test_empty_group(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    res = _encode(tiny, tmp_path / "empty", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "empty" in res.output


@pytest.mark.parametrize("kind", ["missing", "corrupt", "wrong_shape"])
def test_bad_checkpoint(tiny, ref_group, tmp_path, kind):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt.safetensors"
    if kind == "corrupt":
        ckpt.write_bytes(b"\x01\x02garbage")
    elif kind == "wrong_shape":
        sd = load_file(str(tiny.adapter))
        sd["image_proj_model.proj.0.weight"] = torch.zeros(3, 3)
        save_file(sd, str(ckpt))
    res = _encode(tiny, ref_group, tmp_path / "o.safetensors", adapter=ckpt)
    assert res.exit_code == 2, res.output
    assert "ckpt.safetensors" in res.output
    if kind == "wrong_shape":
        assert "image_proj_model.proj.0.weight" in res.output


def test_mllm_dir_without_tokenizer(tiny, ref_group, tmp_path):
    broken = tmp_path / "mllm"
    shutil.copytree(tiny.mllm, broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    res = _encode(tiny, ref_group, tmp_path / "o.safetensors", mllm=broken)
    assert res.exit_code == 2 and "tokenizer" in res.output


def test_wrong_output_suffix(tiny, ref_group, tmp_path):
    res = _encode(tiny, ref_group, tmp_path / "o.pt")
    assert res.exit_code == 2 and ".safetensors" in res.output


def test_exif_orientation_apply_or_ignore(tiny, tmp_path):
    """``ignore`` feeds the stored pixel order, as the official code does: the same tokens as the
    same pixels without an EXIF tag; ``apply`` (the default) turns the photo upright first."""
    import torch
    from PIL import Image

    from easyref_cli.testing import make_reference_images

    [src] = make_reference_images(tmp_path / "src", n=1, size=(64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to display
    tagged, plain = tmp_path / "tagged", tmp_path / "plain"
    tagged.mkdir(), plain.mkdir()
    Image.open(src).save(tagged / "a.png", exif=exif)
    Image.open(src).save(plain / "a.png")

    def cond(group, *extra):
        out = tmp_path / f"{group.name}{len(extra)}.safetensors"
        res = _encode(tiny, group, out, "--dtype", "float32", *extra)
        assert res.exit_code == 0, res.output
        with safe_open(str(out), "pt") as f:
            return f.get_tensor("cond"), f.metadata()

    upright, meta = cond(tagged)
    raw, raw_meta = cond(tagged, "--exif-orientation", "IGNORE")  # normalised like every choice
    assert torch.equal(raw, cond(plain)[0]) and not torch.equal(raw, upright)
    assert (meta["exif_orientation"], raw_meta["exif_orientation"]) == ("apply", "ignore")
    res = _encode(tiny, tagged, tmp_path / "x.safetensors", "--exif-orientation", "sideways")
    assert res.exit_code == 2 and "--exif-orientation must be one of apply, ignore" in res.output
