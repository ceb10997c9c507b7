"""easyref_cli.files: groups, image loading, hashing, PNG metadata, manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easyref_cli import files
from easyref_cli.errors import InputError, JobError, StorageError, UsageError


def _img(path: Path, size=(8, 8), color=(10, 20, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def _noise(path: Path, size=(64, 64), **save) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, **save)
    return path


def _touch(path: Path, text="x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# natural sort and groups
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, expected",
    [
        (["img10", "img2", "img1"], ["img1", "img2", "img10"]),
        (["b", "A", "a"], ["A", "a", "b"]),
        (["x1y10", "x1y9", "x0y99"], ["x0y99", "x1y9", "x1y10"]),
        (["img01", "img1", "img001"], ["img001", "img01", "img1"]),
        (["10", "9", "a"], ["9", "10", "a"]),
    ],
)
def test_natural_key(names, expected):
    assert sorted(names, key=files.natural_key) == expected


def test_single_group_dir(tmp_path):
    d = tmp_path / "cats"
    for n in ("img10.png", "img2.JPG", "img1.webp", ".hidden.png", "notes.txt", "x.gif"):
        if n.endswith((".png", ".JPG", ".webp")):
            _img(d / n, format="PNG" if n.endswith("png") else None)
        else:
            _touch(d / n)
    (d / "sub").mkdir()
    [g] = files.find_groups([d])
    assert g.name == "cats" and g.path == d
    assert [p.name for p in g.images] == ["img1.webp", "img2.JPG", "img10.png"]
    assert {p.name for p in g.ignored} == {".hidden.png", "notes.txt", "x.gif", "sub"}


def test_parent_of_many_groups(tmp_path):
    for name in ("g10", "g2", "g1"):
        _img(tmp_path / "refs" / name / "a.png")
    _img(tmp_path / "refs" / ".hidden" / "a.png")
    (tmp_path / "refs" / "empty").mkdir()
    _touch(tmp_path / "refs" / "readme.txt")
    groups = files.find_groups([tmp_path / "refs"])
    assert [g.name for g in groups] == ["g1", "g2", "g10"]
    assert all(len(g.images) == 1 for g in groups)


def test_groups_keep_argument_order_and_reject_duplicates(tmp_path):
    _img(tmp_path / "b" / "1.png")
    _img(tmp_path / "a" / "1.png")
    assert [g.name for g in files.find_groups([tmp_path / "b", tmp_path / "a"])] == ["b", "a"]
    _img(tmp_path / "other" / "a" / "1.png")
    with pytest.raises(UsageError, match="two reference groups are named 'a'"):
        files.find_groups([tmp_path / "a", tmp_path / "other"])


def test_dot_group_takes_directory_name(tmp_path, monkeypatch):
    _img(tmp_path / "mine" / "1.png")
    monkeypatch.chdir(tmp_path / "mine")
    assert files.find_groups([Path(".")])[0].name == "mine"


@pytest.mark.parametrize(
    "setup, arg, message",
    [
        (lambda t: None, "missing", "group directory not found: .*missing"),
        (lambda t: _touch(t / "file.png"), "file.png", "not a directory: .*file.png"),
        (lambda t: (t / "empty").mkdir(), "empty", "no images found in .*empty"),
        (lambda t: _touch(t / "txt" / "a.txt"), "txt", "no images found in .*txt"),
        (
            lambda t: ((t / "p" / "s1").mkdir(parents=True), _touch(t / "p" / "s2" / "a.txt")),
            "p",
            r"no images found in .*p or its sub-directories \(s1, s2\)",
        ),
        (lambda t: _img(t / "h" / ".a.png"), "h", "no images found"),
    ],
)
def test_find_groups_errors(tmp_path, setup, arg, message):
    setup(tmp_path)
    with pytest.raises(UsageError, match=message):
        files.find_groups([tmp_path / arg])


def test_find_groups_needs_paths():
    with pytest.raises(UsageError):
        files.find_groups([])


# ----------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------


def _rgba(p):
    return _img(p / "a.png", color=(200, 100, 50, 0), mode="RGBA")


def _la(p):
    return _img(p / "la.png", color=(100, 50), mode="LA")


def _palette_transparent(p):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.info["transparency"] = 0
    im.save(p / "p.png")
    return p / "p.png"


def _cmyk_jpeg(p):
    return _img(p / "c.jpg", color=(0, 255, 0, 0), mode="CMYK")


def _png16(p):
    arr = np.array([[0, 32768, 65535, 65535]] * 4, dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    im.save(p / "h.png")
    return p / "h.png"


def _int32_tiff(p):
    Image.fromarray(np.array([[0, 32896, 65535, 65535]] * 4, dtype=np.int32)).save(p / "i.tif")
    return p / "i.tif"


def _float_tiff(p):
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 1.0]] * 4, dtype=np.float32)).save(p / "f.tif")
    return p / "f.tif"


def _gray(p):
    return _img(p / "g.bmp", color=128, mode="L")


def _unicode(p):
    return _img(p / "références" / "猫 café.png", color=(1, 2, 3))


@pytest.mark.parametrize(
    "make, size, pixel",
    [
        (_rgba, (8, 8), (200, 100, 50)),  # alpha dropped like the official convert("RGB")
        (_la, (8, 8), (100, 100, 100)),
        (_palette_transparent, (4, 4), (255, 0, 0)),
        (_cmyk_jpeg, (8, 8), (255, 0, 255)),
        (_png16, (4, 4), (128, 128, 128)),  # 16-bit scaled, not clipped to white
        (_int32_tiff, (4, 4), (129, 129, 129)),
        (_float_tiff, (4, 4), (128, 128, 128)),
        (_gray, (8, 8), (128, 128, 128)),
        (_unicode, (8, 8), (1, 2, 3)),
    ],
)
def test_load_image_modes(tmp_path, make, size, pixel):
    im = files.load_image(make(tmp_path))
    assert im.mode == "RGB"
    assert im.size == size
    got = im.getpixel((1, 0))
    assert all(abs(a - b) <= 3 for a, b in zip(got, pixel, strict=False)), got


def test_load_image_16bit_keeps_range(tmp_path):
    im = files.load_image(_png16(tmp_path))
    assert im.getpixel((0, 0)) == (0, 0, 0)
    assert im.getpixel((2, 0)) == (255, 255, 255)


def test_load_image_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to display
    path = _img(tmp_path / "r.jpg", size=(40, 20), exif=exif)
    assert Image.open(path).size == (40, 20)
    assert files.load_image(path).size == (20, 40)
    raw = files.load_image(path, exif_orientation=False)  # the official code's pixel order
    assert raw.size == (40, 20) and raw.tobytes() == Image.open(path).convert("RGB").tobytes()


def test_avif_references_are_found_and_loaded(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    path = _noise(tmp_path / "g" / "a.avif")
    [group] = files.find_groups([tmp_path / "g"])
    assert group.images == (path,)
    assert files.load_image(path).size == (64, 64)


def test_load_image_large(tmp_path):
    path = _img(tmp_path / "big.jpg", size=(6000, 6000), quality=50)
    assert files.load_image(path).size == (6000, 6000)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: _truncate(_noise(p / "t.png")), "truncated"),
        (lambda p: _truncate(_noise(p / "t.jpg", quality=95)), "truncated"),
        (lambda p: _touch(p / "text.png", "hello, not a png"), "not an image"),
        (lambda p: p / "missing.png", "cannot read"),
        (lambda p: (p / "dir.png").mkdir() or p / "dir.png", "cannot read"),
    ],
)
def test_load_image_errors_name_the_file(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(InputError, match=reason) as info:
        files.load_image(path)
    assert str(path) in str(info.value)


def test_load_image_truncated_even_if_globally_allowed(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InputError, match="truncated"):
        files.load_image(_truncate(_noise(tmp_path / "t.png")))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    path = _img(tmp_path / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="decompression bomb") as info:
        files.load_image(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------
# hashing
# ----------------------------------------------------------------------------------------------


def test_sha256_file(tmp_path):
    import hashlib

    data = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "f").write_bytes(data)
    assert files.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    with pytest.raises(InputError, match="missing"):
        files.sha256_file(tmp_path / "missing")


def test_sha256_file_memo_hashes_once_and_again_after_a_rewrite(tmp_path, monkeypatch):
    import hashlib

    f, memo = tmp_path / "adapter.safetensors", tmp_path / "cache" / "file-hashes.json"
    f.write_bytes(b"weights v1")
    assert files.sha256_file_memo(f, memo) == hashlib.sha256(b"weights v1").hexdigest()
    assert str(f.resolve()) in json.loads(memo.read_text())
    real_hash = files.sha256_file
    calls = []
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real_hash(p))
    assert files.sha256_file_memo(f, memo) == hashlib.sha256(b"weights v1").hexdigest() and calls == []
    link = tmp_path / "link.safetensors"
    link.symlink_to(f)  # the real path is the key: a link to the same file is a hit
    assert files.sha256_file_memo(link, memo) == hashlib.sha256(b"weights v1").hexdigest() and calls == []
    # same size, rewritten in place: the mtime changes, so it is hashed again
    f.write_bytes(b"weights v2")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert files.sha256_file_memo(f, memo) == hashlib.sha256(b"weights v2").hexdigest() and len(calls) == 1
    assert files.sha256_file_memo(f, None) == hashlib.sha256(b"weights v2").hexdigest() and len(calls) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1}'])
def test_sha256_file_memo_shrugs_off_a_damaged_or_unwritable_memo(tmp_path, content):
    import hashlib

    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    memo = tmp_path / "memo.json"
    memo.write_text(content)
    assert files.sha256_file_memo(f, memo) == hashlib.sha256(b"abc").hexdigest()
    assert json.loads(memo.read_text())[str(f.resolve())]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    assert files.sha256_file_memo(f, blocked / "memo.json") == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(InputError, match="missing"):
        files.sha256_file_memo(tmp_path / "missing", memo)


def test_group_content_hash_depends_on_content_and_names_only(tmp_path):
    _img(tmp_path / "a" / "1.png", color=(1, 1, 1))
    _img(tmp_path / "a" / "2.png", color=(2, 2, 2))
    _img(tmp_path / "elsewhere" / "b" / "1.png", color=(1, 1, 1))
    _img(tmp_path / "elsewhere" / "b" / "2.png", color=(2, 2, 2))
    [a] = files.find_groups([tmp_path / "a"])
    [b] = files.find_groups([tmp_path / "elsewhere" / "b"])
    h = files.group_content_hash(a)
    assert h == files.group_content_hash(b)
    os.utime(a.images[0], (0, 0))
    assert files.group_content_hash(a) == h
    (a.images[1]).rename(tmp_path / "a" / "3.png")
    [a2] = files.find_groups([tmp_path / "a"])
    assert files.group_content_hash(a2) != h
    _img(tmp_path / "b2" / "1.png", color=(1, 1, 1))
    _img(tmp_path / "b2" / "2.png", color=(9, 9, 9))
    assert files.group_content_hash(files.find_groups([tmp_path / "b2"])[0]) != h


# ----------------------------------------------------------------------------------------------
# PNG metadata
# ----------------------------------------------------------------------------------------------

RECORD = {
    "prompt": "a cat on a sofa",
    "negative_prompt": "blurry",
    "steps": 30,
    "scheduler": "euler",
    "guidance": 5.0,
    "seed": 42,
    "width": 1024,
    "height": 1024,
    "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
    "scale": 1.0,
    "adapter": "zongzhuofan/EasyRef",
    "references": [{"path": "/r/1.png", "sha256": "ab"}, {"path": "/r/2.png", "sha256": "cd"}],
    "version": "0.1.0",
}


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {},
            "a cat on a sofa\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, CFG scale: 5.0, "
            "Seed: 42, Size: 1024x1024, Model: stabilityai/stable-diffusion-xl-base-1.0, "
            "EasyRef scale: 1.0, EasyRef adapter: zongzhuofan/EasyRef, EasyRef references: 2, "
            "Version: easyref-cli 0.1.0",
        ),
        (
            {"negative_prompt": "", "scheduler": "dpmpp_2m", "adapter": "/w/a, b.safetensors"},
            "a cat on a sofa\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 5.0, Seed: 42, "
            "Size: 1024x1024, Model: stabilityai/stable-diffusion-xl-base-1.0, EasyRef scale: 1.0, "
            'EasyRef adapter: "/w/a, b.safetensors", EasyRef references: 2, '
            "Version: easyref-cli 0.1.0",
        ),
        (
            {"scheduler": "euler_a", "adapter_sha256": "0123456789abcdef"},
            "a cat on a sofa\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, CFG scale: 5.0, "
            "Seed: 42, Size: 1024x1024, Model: stabilityai/stable-diffusion-xl-base-1.0, "
            "EasyRef scale: 1.0, EasyRef adapter: zongzhuofan/EasyRef, EasyRef adapter hash: "
            "0123456789, EasyRef references: 2, Version: easyref-cli 0.1.0",
        ),
    ],
)
def test_format_parameters(changes, expected):
    assert files.format_parameters({**RECORD, **changes}) == expected


def test_write_png_atomic_round_trip(tmp_path):
    record = {**RECORD, "prompt": 'un chat 猫 — "quoted"', "nested": {"x": [1, 2]}}
    out = tmp_path / "deep" / "dir" / "img.png"
    files.write_png_atomic(out, Image.new("RGB", (16, 8), (1, 2, 3)), record=record)
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.png"]
    assert files.read_png_record(out) == record
    with Image.open(out) as im:
        assert im.size == (16, 8)
        assert im.text["parameters"] == files.format_parameters(record)
    # overwrite in place: still one file, new content
    files.write_png_atomic(out, Image.new("RGB", (4, 4)), record={**record, "seed": 7})
    assert files.read_png_record(out)["seed"] == 7
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.png"]


def test_write_png_atomic_leaves_nothing_on_error(tmp_path, monkeypatch):
    out = tmp_path / "img.png"
    files.write_png_atomic(out, Image.new("RGB", (4, 4)), record={"seed": 1})
    before = out.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        files.write_png_atomic(out, Image.new("RGB", (4, 4)), record={"seed": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
    assert out.read_bytes() == before

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="No space left"):  # the storage, not this job: the run stops
        files.write_png_atomic(tmp_path / "new.png", Image.new("RGB", (4, 4)), record={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]

    def denied(*a, **k):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "fsync", denied)
    with pytest.raises(JobError, match="Permission denied") as err:  # this file only: the job fails
        files.write_png_atomic(tmp_path / "new.png", Image.new("RGB", (4, 4)), record={})
    assert not isinstance(err.value, StorageError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_write_png_atomic_temp_name(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    files.write_png_atomic(tmp_path / "a.png", Image.new("RGB", (2, 2)), record={})
    [name] = seen
    assert name.startswith(".") and name.endswith(".tmp")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _img(p / "plain.png"), "no 'easyref' metadata"),
        (lambda p: _img(p / "x.jpg"), "not a PNG"),
        (lambda p: _touch(p / "t.png", "text"), "not an image"),
        (lambda p: p / "missing.png", "cannot read"),
    ],
)
def test_read_png_record_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        files.read_png_record(path)
    assert str(path) in str(info.value)


def test_read_png_record_bad_json(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("easyref", "{not json")
    Image.new("RGB", (2, 2)).save(tmp_path / "b.png", pnginfo=info)
    with pytest.raises(InputError, match="not valid JSON"):
        files.read_png_record(tmp_path / "b.png")


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------


def test_manifest_round_trip_and_latest_status(tmp_path):
    path = tmp_path / "out" / files.MANIFEST_NAME
    with files.ManifestWriter(path) as m:
        m.write({"job_id": "a", "status": "error", "error": "OOM"})
        m.write({"job_id": "b", "status": "ok"})
    with files.ManifestWriter(path) as m:  # append, not truncate
        m.write({"job_id": "a", "status": "ok", "path": "ü/1.png"})
    entries = files.read_manifest(path)
    assert [e["job_id"] for e in entries] == ["a", "b", "a"]
    latest = files.latest_status(entries)
    assert latest["a"]["status"] == "ok" and latest["b"]["status"] == "ok"
    assert files.read_manifest(tmp_path / "none.jsonl") == []


@pytest.mark.parametrize(
    "tail",
    [
        b'{"job_id": "c", "sta',  # torn write
        b"\x00\x00\x00\x00",  # zero-filled after power loss
        b'{"job_id": "c"\n',  # garbled but newline-terminated
        b"[1, 2]\n",  # valid JSON, not an object
        b'{"job_id": "c"\n\n  \n',  # garbled, then blank lines
        b'{"job_id": "c", "x": "' + b"y" * 200_000,  # torn line longer than the read window
    ],
)
def test_manifest_tolerates_broken_last_line(tmp_path, tail):
    path = tmp_path / files.MANIFEST_NAME
    path.write_bytes(b'{"job_id": "a", "status": "ok"}\n\n{"job_id": "b", "status": "ok"}\n' + tail)
    assert [e["job_id"] for e in files.read_manifest(path)] == ["a", "b"]
    with files.ManifestWriter(path) as m:
        m.write({"job_id": "d", "status": "ok"})
    assert [e["job_id"] for e in files.read_manifest(path)] == ["a", "b", "d"]


def test_manifest_keeps_complete_last_line_without_newline(tmp_path):
    path = tmp_path / files.MANIFEST_NAME
    path.write_text('{"job_id": "a"}')
    with files.ManifestWriter(path) as m:
        m.write({"job_id": "b"})
    assert [e["job_id"] for e in files.read_manifest(path)] == ["a", "b"]


def test_manifest_garbled_middle_line_is_an_error(tmp_path):
    path = tmp_path / files.MANIFEST_NAME
    path.write_text('{"job_id": "a"}\nnot json\n{"job_id": "b"}\n')
    with pytest.raises(UsageError, match=r"manifest.jsonl:2: garbled"):
        files.read_manifest(path)


def test_manifest_lines_are_durable_json(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / files.MANIFEST_NAME
    with files.ManifestWriter(path) as m:
        m.write({"job_id": "a", "path": Path("x/y.png")})
        assert len(synced) == 1
        assert json.loads(path.read_text())["path"] == "x/y.png"


# ----------------------------------------------------------------------------------------------
# torch-free
# ----------------------------------------------------------------------------------------------


def test_planning_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import easyref_cli.plan, easyref_cli.files, easyref_cli.presets, easyref_cli.settings, easyref_cli.prompts\n"
        "import easyref_cli.naming, easyref_cli.records, easyref_cli.yamlio, easyref_cli.models, easyref_cli.runlog\n"
        "import easyref_cli.env, easyref_cli.commands.generate, easyref_cli.distributed, easyref_cli.options\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
