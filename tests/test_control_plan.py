"""Planning ControlNet, img2img and inpainting jobs: inputs found, paired, checked, identified by content."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from easyref_cli import plan as P
from easyref_cli import records
from easyref_cli.errors import UsageError
from easyref_cli.settings import GenerationSettings, identity_values


def _image(path: Path, colour=(200, 30, 30), size=(16, 16), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Reference groups, a folder of control images, init images and masks, a ControlNet config."""
    monkeypatch.chdir(tmp_path)
    for i in range(2):
        _image(tmp_path / "refs" / "cats" / f"{i}.png", (i, i, i))
    for n, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
        _image(tmp_path / "poses" / f"{n}.png", colour)
        _image(tmp_path / "photos" / f"{n}.jpg", colour, size=(24, 16))
        _image(tmp_path / "masks" / f"{n}.png", 255, size=(24, 16), mode="L")
    cn = tmp_path / "cn"
    cn.mkdir()
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "cross_attention_dim": 2048}))
    return tmp_path


def _plan(world: Path, cli=None, **kw):
    kw.setdefault("out_dir", world / "out")
    kw.setdefault("groups", [world / "refs"])
    if "prompts_file" not in kw:
        kw.setdefault("prompt", "a cat")
    return P.build_plan(cli=cli or {}, **kw)


def test_plain_jobs_keep_their_ids_and_records():
    settings = GenerationSettings()
    assert not any(k.startswith("control") or k == "strength" for k in identity_values(settings))


def test_a_control_folder_makes_one_job_per_image_named_by_it(world):
    plan = _plan(world, {"controlnets": ("cn",), "control_image": ("poses",)})
    assert [j.output.as_posix() for j in plan.jobs] == ["cats/a-cat_a_0.png", "cats/a-cat_b_0.png"]
    assert len({j.job_id for j in plan.jobs}) == 2
    assert [j.settings.control_image for j in plan.jobs] == [("poses/a.png",), ("poses/b.png",)]
    assert all(j.legacy_id == "" for j in plan.jobs)
    record = records.job_record(plan.jobs[0], plan.models.as_dict(), references=[])
    assert record["schema"] == 3 and record["control_scale"] == (1.0,)
    assert record["inputs"]["control"][0]["sha256"] == plan.jobs[0].inputs.control_sha256[0]


def test_inputs_enter_the_id_by_content_not_path(world):
    ids = [j.job_id for j in _plan(world, {"controlnets": ("cn",), "control_image": ("poses",)}).jobs]
    shutil.copytree(world / "poses", world / "moved")
    moved = [j.job_id for j in _plan(world, {"controlnets": ("cn",), "control_image": ("moved",)}).jobs]
    assert moved == ids
    _image(world / "moved" / "b.png", (1, 2, 3))
    changed = [j.job_id for j in _plan(world, {"controlnets": ("cn",), "control_image": ("moved",)}).jobs]
    assert changed[0] == ids[0] and changed[1] != ids[1]
    scaled = [j.job_id for j in _plan(world, {"controlnets": ("cn",), "control_image": ("poses",),
                                              "control_scale": (0.5,)}).jobs]  # fmt: skip
    assert set(scaled).isdisjoint(ids)


def test_init_and_mask_folders_pair_by_name(world):
    plan = _plan(world, {"init_image": "photos", "mask": "masks", "strength": 0.6})
    pairs = [(j.inputs.init.name, j.inputs.mask.name) for j in plan.jobs]
    assert pairs == [("a.jpg", "a.png"), ("b.jpg", "b.png")]
    assert identity_values(plan.jobs[0].settings)["strength"] == 0.6
    (world / "masks" / "b.png").unlink()
    with pytest.raises(UsageError, match=r"mask folder masks has no image named 'b'"):
        _plan(world, {"init_image": "photos", "mask": "masks"})


def test_a_single_file_serves_every_item_of_a_folder(world):
    plan = _plan(world, {"controlnets": ("cn",), "control_image": ("poses/a.png",), "init_image": "photos"})
    assert [(j.inputs.control[0].name, j.inputs.init.name) for j in plan.jobs] == [("a.png", "a.jpg"),
                                                                                    ("a.png", "b.jpg")]  # fmt: skip


@pytest.mark.parametrize(
    "cli, message",
    [
        ({"control_image": ("poses",)}, "control_image given but no ControlNet"),
        ({"controlnets": ("cn", "cn"), "control_image": ("poses",)}, "2 ControlNet.* need 2 control image"),
        ({"controlnets": ("cn", "cn"), "control_image": ("poses", "poses"), "control_scale": (1.0, 0.5, 0.2)},
         "control_scale has 3 values for 2 ControlNets"),
        ({"controlnets": ("cn",), "control_image": ("poses",), "control_start": (0.6,), "control_end": (0.5,)},
         "starts at 0.6 but ends at 0.5"),
        ({"mask": "masks"}, "mask given without init_image"),
        ({"init_image": "photos", "seed_mode": "official"}, "seed_mode official replays text-to-image"),
        ({"controlnets": ("cn",), "control_image": ("nowhere.png",)}, "control_image nowhere.png: no such file"),
        ({"init_image": "empty"}, "init_image empty: the folder holds no images"),
        ({"controlnets": ("cn",)}, "ControlNets given .* but no prompt has a control image"),
        ({"controlnets": ("missing-cn",), "control_image": ("poses",)}, "--controlnet missing-cn: no such file"),
    ],
)  # fmt: skip
def test_bad_control_settings_are_usage_errors(world, cli, message):
    (world / "empty").mkdir()
    with pytest.raises(UsageError, match=message):
        _plan(world, cli)


def test_masks_must_be_single_channel_and_the_init_image_size(world):
    _image(world / "grey.png", (128, 128, 128), size=(24, 16))
    assert _plan(world, {"init_image": "photos/a.jpg", "mask": "grey.png"}).jobs  # grey stored as RGB is fine
    _image(world / "colour.png", (255, 0, 0), size=(24, 16))
    with pytest.raises(UsageError, match=r"mask colour.png is not single-channel"):
        _plan(world, {"init_image": "photos/a.jpg", "mask": "colour.png"})
    _image(world / "small.png", 255, size=(8, 8), mode="L")
    with pytest.raises(UsageError, match=r"mask small.png is 8×8 but its init image photos/a.jpg is 24×16"):
        _plan(world, {"init_image": "photos/a.jpg", "mask": "small.png"})


def test_same_names_twice_in_a_folder_are_refused(world):
    _image(world / "poses" / "a.jpg")
    with pytest.raises(UsageError, match="a.jpg and a.png have the same name|a.png and a.jpg have the same name"):
        _plan(world, {"controlnets": ("cn",), "control_image": ("poses",)})


def test_a_controlnet_for_another_base_is_refused_at_planning(world, tiny):
    (world / "cn" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "cross_attention_dim": 7}))
    with pytest.raises(UsageError, match=r"cn"):
        _plan(world, {"controlnets": ("cn",), "control_image": ("poses",)}, base_model=str(tiny.base_model))


def test_a_prompt_file_pairs_prompts_with_control_images(world):
    path = world / "prompts.yaml"
    path.write_text(
        textwrap.dedent("""
        defaults:
          control: {image: poses/a.png, scale: 0.8}
        prompts:
          - a cat sitting
          - prompt: a cat jumping
            control: {image: poses/b.png, scale: 0.5, end: 0.7}
          - prompt: a cat restyled
            init_image: photos/b.jpg
            strength: 0.4
        """)
    )
    plan = _plan(world, {"controlnets": ("cn",)}, prompts_file=path)
    got = [(j.inputs.control[0].name, j.settings.control_scale, j.settings.control_end) for j in plan.jobs]
    assert got == [("a.png", (0.8,), (1.0,)), ("b.png", (0.5,), (0.7,)), ("a.png", (0.8,), (1.0,))]
    assert plan.jobs[2].inputs.init.name == "b.jpg" and plan.jobs[2].settings.strength == 0.4


def test_control_and_its_flat_keys_together_are_refused(world):
    path = world / "prompts.yaml"
    path.write_text("prompts:\n  - prompt: x\n    control: poses/a.png\n    control_scale: 0.3\n")
    with pytest.raises(UsageError, match=r"prompts.yaml:3: prompts\[0\].control: give either 'control' or"):
        _plan(world, {"controlnets": ("cn",)}, prompts_file=path)


def test_records_round_trip_and_share_relative_paths(world):
    plan = _plan(world, {"controlnets": ("cn",), "control_image": ("poses",), "init_image": "photos/a.jpg",
                         "control_preprocess": ("canny",)})  # fmt: skip
    record = records.job_record(plan.jobs[1], plan.models.as_dict())
    record.update(records.extras_record(plan.models, plan.model_identity))
    shared = records.shareable(record)
    assert shared["inputs"]["control"][0]["path"] == "poses/b.png"
    assert shared["inputs"]["init"]["path"] == "photos/a.jpg"
    assert shared["controlnets"][0]["path"] == "cn"
    replay = records.parse_record(json.loads(json.dumps(shared)))
    assert replay.settings.control_preprocess == ("canny",)
    assert replay.inputs["control"][0] == (Path("poses/b.png"), plan.jobs[1].inputs.control_sha256[0])
    assert replay.inputs["name"] == "b"


def test_a_controlnet_leaves_the_plain_prompts_ids_and_records_alone(world):
    path = world / "prompts.yaml"
    path.write_text("prompts:\n  - a cat sitting\n  - prompt: a cat jumping\n    control: poses/a.png\n")
    plain = _plan(world, prompt="a cat sitting").jobs[0]
    mixed = _plan(world, {"controlnets": ("cn",)}, prompts_file=path)
    assert (mixed.jobs[0].job_id, mixed.jobs[0].legacy_id) == (plain.job_id, plain.legacy_id)
    from easyref_cli.jobs import job_models

    extras = [records.extras_record(mixed.models, job_models(mixed.model_identity, j.inputs)) for j in mixed.jobs]
    assert "controlnets" not in extras[0] and extras[1]["controlnets"][0]["path"] == "cn"


def test_mask_sizes_are_compared_upright(world):
    init = Image.new("RGB", (24, 16), (9, 9, 9))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (16×24)
    init.save(world / "turned.jpg", exif=exif)
    _image(world / "portrait.png", 255, size=(16, 24), mode="L")
    assert _plan(world, {"init_image": "turned.jpg", "mask": "portrait.png"}).jobs
    with pytest.raises(UsageError, match="is 24×16 but its init image turned.jpg is 16×24"):
        _plan(world, {"init_image": "turned.jpg", "mask": "masks/a.png"})
    assert _plan(world, {"init_image": "turned.jpg", "mask": "masks/a.png", "exif_orientation": "ignore"}).jobs


def test_a_transparent_mask_and_half_given_control_fields_are_refused(world):
    mask = Image.new("LA", (24, 16), (255, 255))
    mask.putpixel((0, 0), (255, 0))
    mask.save(world / "alpha.png")
    with pytest.raises(UsageError, match="has transparency"):
        _plan(world, {"init_image": "photos/a.jpg", "mask": "alpha.png"})
    path = world / "prompts.yaml"
    path.write_text("prompts:\n  - prompt: x\n    control: [{image: poses/a.png, scale: 0.9}, {image: poses/b.png}]\n")
    with pytest.raises(UsageError, match="give 'scale' for every ControlNet of the list, or for none"):
        _plan(world, {"controlnets": ("cn", "cn")}, prompts_file=path)
