"""``easyref generate`` with ControlNet, img2img and inpainting on the tiny models, end to end:
folders of inputs, resume, batching, records, replay, broken and moved inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from easyref_cli import files
from easyref_cli.cli import app
from easyref_cli.testing import make_reference_images, tiny_cli_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")
cli = CliRunner()


@pytest.fixture(scope="module")
def controlnet(tiny, tmp_path_factory) -> Path:
    from easyref_cli.tiny import build_tiny_controlnet

    return build_tiny_controlnet(tiny.base_model, tmp_path_factory.mktemp("cn") / "controlnet")


@pytest.fixture
def world(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_reference_images(tmp_path / "refs" / "cats", n=2)
    for name, box in (("a", (8, 8, 30, 30)), ("b", (30, 20, 60, 56))):
        for folder, colour in (("poses", (255, 255, 255)), ("photos", (40, 120, 220))):
            image = Image.new("RGB", (64, 64), (0, 0, 0) if folder == "poses" else (230, 200, 90))
            ImageDraw.Draw(image).rectangle(box, fill=colour)
            (tmp_path / folder).mkdir(exist_ok=True)
            image.save(tmp_path / folder / f"{name}.png")
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        (tmp_path / "masks").mkdir(exist_ok=True)
        mask.save(tmp_path / "masks" / f"{name}.png")
    return tmp_path


def _generate(tiny, out: str, *args: str, batch_size: int = 1):
    argv = ["generate", "refs", "-p", "a cat", "-o", out, "-q", *tiny_cli_args(tiny, batch_size=batch_size), *args]
    return cli.invoke(app, argv)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_a_control_folder_runs_resumes_and_batches_alike(tiny, controlnet, world):
    args = ("--controlnet", str(controlnet), "--control-image", "poses", "--control-scale", "0.8")
    result = _generate(tiny, "out", *args)
    assert result.exit_code == 0, result.output
    made = _pngs(world / "out")
    assert sorted(made) == ["cats/a-cat_a_0.png", "cats/a-cat_b_0.png"]
    assert made["cats/a-cat_a_0.png"] != made["cats/a-cat_b_0.png"]  # the control image changes the picture
    record = files.read_png_record(world / "out" / "cats" / "a-cat_a_0.png")
    assert record["schema"] == 3 and record["control_scale"] == [0.8]
    assert record["inputs"]["control"][0] == {"path": "poses/a.png", "sha256": files.sha256_file(world / "poses/a.png")}
    assert record["controlnets"][0]["path"] == "controlnet"
    again = _generate(tiny, "out", *args, "--json")
    assert again.exit_code == 0 and [json.loads(x)["status"] for x in again.stdout.splitlines()] == ["skipped"] * 2
    assert _generate(tiny, "out2", *args, batch_size=2).exit_code == 0
    for name in made:  # batched kernels may round a pixel one level differently (as for text-to-image)
        a, b = (np.asarray(Image.open(world / d / name), dtype=int) for d in ("out", "out2"))
        assert np.abs(a - b).max() <= 1


def test_img2img_and_inpainting_follow_their_init_images(tiny, world):
    steps = ("--steps", "4")
    assert _generate(tiny, "i2i", *steps, "--init-image", "photos", "--strength", "1").exit_code == 0
    assert (
        _generate(tiny, "inpaint", *steps, "--init-image", "photos", "--mask", "masks", "--strength", "0.9").exit_code
        == 0
    )
    i2i, inpaint = _pngs(world / "i2i"), _pngs(world / "inpaint")
    assert sorted(i2i) == sorted(inpaint) == ["cats/a-cat_a_0.png", "cats/a-cat_b_0.png"]
    assert _generate(tiny, "low", *steps, "--init-image", "photos", "--strength", "0.25").exit_code == 0
    none = _generate(tiny, "none", "--init-image", "photos", "--strength", "0.2")  # int(2 × 0.2) = 0 steps
    assert none.exit_code == 2 and "denoises no step" in none.output
    low = _pngs(world / "low")
    assert low["cats/a-cat_a_0.png"] != low["cats/a-cat_b_0.png"]  # the init image makes the picture
    assert low["cats/a-cat_a_0.png"] != i2i["cats/a-cat_a_0.png"]  # and the strength how much of it
    record = files.read_png_record(world / "inpaint" / "cats" / "a-cat_b_0.png")
    assert record["strength"] == 0.9 and record["inputs"]["mask"]["path"] == "masks/b.png"
    assert record["inputs"]["name"] == "b"
    assert "Denoising strength: 0.9" in files.read_png_metadata(world / "inpaint" / "cats" / "a-cat_b_0.png").parameters


def test_from_image_replays_the_inputs_and_refuses_a_moved_one(tiny, controlnet, world):
    args = ("--controlnet", str(controlnet), "--control-image", "poses/b.png", "--init-image", "photos/b.png")
    assert _generate(tiny, "out", *args).exit_code == 0
    image = world / "out" / "cats" / "a-cat_0.png"
    models = ["--base-model", str(tiny.base_model), "--mllm", str(tiny.mllm), "--adapter", str(tiny.adapter_lora)]
    replay = cli.invoke(app, ["generate", "--from-image", str(image), "-o", "again", "-q", "--controlnet",
                              str(controlnet), *models, "--batch-size", "1", "--groups-root", "refs"])  # fmt: skip
    assert replay.exit_code == 0, replay.output
    assert (world / "again" / "cats" / "a-cat_0.png").read_bytes() == image.read_bytes()
    plain = world / "plain" / "cats" / "a-cat_0.png"
    assert _generate(tiny, "plain").exit_code == 0
    extra = cli.invoke(app, ["generate", "--from-image", str(plain), "-o", "x", "--controlnet", str(controlnet),
                             *models, "--groups-root", "refs"])  # fmt: skip
    assert extra.exit_code == 2 and "made without a ControlNet" in extra.output
    shutil.move(world / "poses" / "b.png", world / "b-moved.png")
    moved = cli.invoke(app, ["generate", "--from-image", str(image), "-o", "again2", "--controlnet", str(controlnet),
                             *models, "--groups-root", "refs"])  # fmt: skip
    assert moved.exit_code == 2
    assert "control image poses/b.png" in moved.output and "no longer exists" in moved.output


def test_a_broken_control_image_fails_its_own_job(tiny, controlnet, world):
    (world / "poses" / "b.png").write_bytes(b"not a png at all")
    result = _generate(tiny, "out", "--controlnet", str(controlnet), "--control-image", "poses")
    assert result.exit_code == 1
    assert "control image" in result.output and "b.png" in result.output
    assert sorted(_pngs(world / "out")) == ["cats/a-cat_a_0.png"]


def test_dry_run_lists_each_jobs_inputs(tiny, controlnet, world):
    result = _generate(tiny, "out", "--init-image", "photos", "--mask", "masks", "--dry-run")
    assert result.exit_code == 0
    assert "init=a.png mask=a.png" in result.output and "init=b.png mask=b.png" in result.output
    mismatch = _generate(tiny, "out", "--controlnet", str(controlnet), "--control-image", "poses",
                         "--control-scale", "1", "--control-scale", "2", "--dry-run")  # fmt: skip
    assert mismatch.exit_code == 2 and "control_scale has 2 values for 1 ControlNets" in mismatch.output


@pytest.mark.slow
def test_the_tiny_family_has_a_controlnet(world):
    result = cli.invoke(app, ["generate", "refs", "-p", "a cat", "-o", "out", "-q", "--model", "tiny", "--steps", "2",
                              "--controlnet", "tiny", "--control-image", "poses/a.png", "--batch-size", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = files.read_png_record(world / "out" / "cats" / "a-cat_0.png")
    assert record["model_identity"]["controlnets"][0].endswith("/controlnet")
    refused = cli.invoke(app, ["generate", "refs", "-p", "a cat", "-o", "x", "--controlnet", "tiny",
                               "--control-image", "poses/a.png", "--dry-run"])  # fmt: skip
    assert refused.exit_code == 2 and "use it with --model tiny" in refused.output
