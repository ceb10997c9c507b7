"""The condition cache is verified and never breaks a run.

(A) An entry counts only if it loads, holds ``tokens`` whose shape and dtype are the recorded ones and
the expected ones, its values are finite and the sha256 of its bytes is the recorded one; anything
else (a flipped bit, NaNs, a wrong shape, an older version's entry without a checksum) is a miss,
warned about once and overwritten by the next ``put``.

(B) A cache folder that is a file, read-only or not ours turns the cache off with one warning; the
run goes on. ``--model tiny`` with an unwritable ``EASYREF_HOME`` is a usage error naming the folder.

Read-only folders are made with ``chmod`` where that binds (not as root), else simulated by making
every write under the folder fail with ``EROFS``, as a read-only mount does.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from easyref_cli import files
from easyref_cli.cli import app
from easyref_cli.conditions import (
    CACHE_DTYPE_KEY,
    CACHE_FORMAT,
    CACHE_FORMAT_KEY,
    CACHE_SHA256_KEY,
    CACHE_SHAPE_KEY,
    ConditionCache,
)
from easyref_cli.errors import UsageError

cli = CliRunner()
KEY = "ab" + "0" * 62


def _chmod_binds() -> bool:
    """Whether ``chmod 0o555`` stops this process writing (not as root, unless without CAP_DAC_OVERRIDE)."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ro"
        folder.mkdir(mode=0o555)
        try:
            (folder / "probe").mkdir()
        except PermissionError:
            return True
        finally:
            folder.chmod(0o755)
        return False


READ_ONLY_MODES = [
    pytest.param("chmod", marks=pytest.mark.skipif(not _chmod_binds(), reason="root writes through chmod 0o555")),
    "erofs",
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def deny_writes_under(monkeypatch, root: Path) -> None:
    """Make creating, writing or renaming anything under ``root`` fail with EROFS (a read-only mount)."""
    top = os.path.abspath(root)

    def inside(p) -> bool:
        if isinstance(p, int):
            return False
        path = os.path.abspath(os.fsdecode(p))
        return path == top or path.startswith(top + os.sep)

    def refuse(p):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))

    real_mkdir, real_open, real_replace, real_bopen = os.mkdir, os.open, os.replace, builtins.open

    def mkdir(p, *args, **kwargs):
        if inside(p):
            raise refuse(p)
        return real_mkdir(p, *args, **kwargs)

    def os_open(p, flags, *args, **kwargs):
        if inside(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refuse(p)
        return real_open(p, flags, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if inside(src) or inside(dst):
            raise refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    def bopen(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wxa+"):
            raise refuse(file)
        return real_bopen(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(builtins, "open", bopen)


def make_read_only(mode: str, folder: Path, monkeypatch, request) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "chmod":
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))  # so that tmp_path can be cleaned
    else:
        deny_writes_under(monkeypatch, folder)


def entry_path(root: Path, key: str = KEY) -> Path:
    return root / key[:2] / f"{key}.safetensors"


def write_entry(root: Path, tokens: torch.Tensor, metadata: dict[str, str] | None, key: str = KEY) -> Path:
    """An entry written by hand: ``metadata`` as given (``None``: none at all, as format 1 wrote)."""
    from safetensors.torch import save_file

    path = entry_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens.contiguous()}, str(path), metadata=metadata)
    return path


def checksum_metadata(tokens: torch.Tensor) -> dict[str, str]:
    """The checksum metadata, computed independently of the module under test."""
    raw = tokens.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {
        CACHE_FORMAT_KEY: CACHE_FORMAT,
        CACHE_SHA256_KEY: hashlib.sha256(raw).hexdigest(),
        CACHE_SHAPE_KEY: json.dumps(list(tokens.shape)),
        CACHE_DTYPE_KEY: str(tokens.dtype).removeprefix("torch."),
    }


def data_region(path: Path) -> tuple[int, int]:
    """(start, end) of the tensor bytes in a safetensors file."""
    raw = path.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little"), len(raw)


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("easyref")]


def tokens(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape or (4, 8), generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------
# (A) Verified entries
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_returns_the_same_tokens_and_records_their_checksum(tmp_path, caplog, dtype):
    from safetensors import safe_open

    cache = ConditionCache(tmp_path / "cache")
    t = tokens(4, 8, dtype=dtype)
    cache.put(KEY, t, {"kind": "cond", "caption": "a cat"})
    got = cache.get(KEY)
    assert got is not None and got.dtype == dtype and torch.equal(got, t)
    assert cache.get(KEY, expect_shape=(4, 8)) is not None and cache.get(KEY, expect_shape=(None, 8)) is not None
    assert (cache.hits, cache.misses) == (3, 0)
    with safe_open(str(entry_path(tmp_path / "cache")), "pt") as f:
        meta = f.metadata()
    assert meta == {"kind": "cond", "caption": "a cat", **checksum_metadata(t)}
    assert warnings_of(caplog) == []
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [entry_path(tmp_path / "cache")]


def test_a_flipped_byte_anywhere_in_the_tensor_data_is_a_miss_warned_once(tmp_path, caplog):
    root = tmp_path / "cache"
    cache = ConditionCache(root)
    t = tokens(4, 8)
    cache.put(KEY, t)
    path = entry_path(root)
    original = path.read_bytes()
    start, end = data_region(path)
    for offset in (start, start + 1, (start + end) // 2, end - 1):
        path.write_bytes(original)
        flip_byte(path, offset)
        fresh = ConditionCache(root)
        caplog.clear()
        assert fresh.get(KEY) is None and fresh.get(KEY) is None, offset
        assert (fresh.hits, fresh.misses) == (0, 2)
        [message] = warnings_of(caplog)  # once per entry, however often it is asked for
        assert str(path) in message and "checksum" in message
        fresh.put(KEY, t)  # the caller's normal re-encode overwrites it
        assert torch.equal(fresh.get(KEY), t) and torch.equal(ConditionCache(root).get(KEY), t)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_entry_with_non_finite_values_is_a_miss(tmp_path, caplog, bad):
    t = tokens(4, 8)
    t[1, 2] = bad
    path = write_entry(tmp_path, t, checksum_metadata(t))  # a correct checksum of the bad values
    cache = ConditionCache(tmp_path)
    assert cache.get(KEY) is None
    [message] = warnings_of(caplog)
    assert str(path) in message and "non-finite" in message


def test_put_does_not_store_non_finite_tokens(tmp_path):
    cache = ConditionCache(tmp_path)
    t = tokens(4, 8)
    t[0, 0] = float("nan")
    cache.put(KEY, t)
    assert not entry_path(tmp_path).exists()


@pytest.mark.parametrize(
    ("shape", "expect"),
    [
        ((1, 4, 8), None),  # 3-D: condition tokens are (num_tokens, dim)
        ((32,), None),
        ((4, 8), (5, 8)),  # another model's number of tokens
        ((4, 8), (4, 16)),  # another cross-attention width
        ((4, 8), (4, 8, 1)),
    ],
)
def test_an_entry_of_the_wrong_shape_is_a_miss(tmp_path, caplog, shape, expect):
    t = tokens(*shape)
    path = write_entry(tmp_path, t, checksum_metadata(t))
    cache = ConditionCache(tmp_path)
    assert cache.get(KEY, expect_shape=expect) is None
    [message] = warnings_of(caplog)
    assert str(path) in message and "shape" in message


@pytest.mark.parametrize(
    "lie",
    [
        {CACHE_SHAPE_KEY: "[8, 4]"},
        {CACHE_SHAPE_KEY: "not json"},
        {CACHE_DTYPE_KEY: "float16"},
        {CACHE_SHA256_KEY: "0" * 64},
        {CACHE_FORMAT_KEY: "99"},
    ],
)
def test_an_entry_whose_metadata_does_not_match_its_tensor_is_a_miss(tmp_path, caplog, lie):
    t = tokens(4, 8)
    path = write_entry(tmp_path, t, {**checksum_metadata(t), **lie})
    cache = ConditionCache(tmp_path)
    assert cache.get(KEY) is None and cache.misses == 1
    [message] = warnings_of(caplog)
    assert str(path) in message


def test_an_entry_without_the_tokens_tensor_or_not_safetensors_is_a_miss(tmp_path, caplog):
    from safetensors.torch import save_file

    t = tokens(4, 8)
    path = entry_path(tmp_path)
    path.parent.mkdir(parents=True)
    save_file({"other": t}, str(path), metadata=checksum_metadata(t))
    assert ConditionCache(tmp_path).get(KEY) is None
    for junk in (b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"):
        path.write_bytes(junk)
        assert ConditionCache(tmp_path).get(KEY) is None
    assert len(warnings_of(caplog)) == 5


def test_entries_of_the_previous_version_are_misses_re_encoded_once(tmp_path, caplog):
    """Format 1 wrote no checksum: each such entry is a miss (one warning for all of them), and the
    put that follows overwrites it in place with a verified one."""
    t = tokens(4, 8)
    keys = [f"{i:02x}" + "1" * 62 for i in range(3)]
    for key in keys:
        write_entry(tmp_path, t, {"kind": "cond"}, key=key)
    cache = ConditionCache(tmp_path)
    assert all(cache.get(key) is None for key in keys)
    [message] = warnings_of(caplog)
    assert str(entry_path(tmp_path, keys[0])) in message and "checksum" in message
    for key in keys:
        cache.put(key, t, {"kind": "cond"})
    again = ConditionCache(tmp_path)
    assert all(torch.equal(again.get(key), t) for key in keys) and again.hits == 3
    assert sorted(p.stem for p in tmp_path.rglob("*.safetensors")) == sorted(keys)  # overwritten, not added


def test_put_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    cache = ConditionCache(root)
    first, second = tokens(4, 8, seed=1), tokens(4, 8, seed=2)
    cache.put(KEY, first)

    def crash(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    cache.put(KEY, second)  # fails before the rename: the old entry stays whole
    monkeypatch.undo()
    assert torch.equal(ConditionCache(root).get(KEY), first)
    assert [p for p in root.rglob("*") if p.is_file()] == [entry_path(root)]


# ----------------------------------------------------------------------------------------------
# (B) An unusable cache turns itself off
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["root", "below"])
def test_a_cache_root_that_is_a_file_is_disabled_with_one_warning(tmp_path, caplog, where):
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"not a folder")
    root = blocker if where == "root" else blocker / "conditions"
    cache = ConditionCache(root)
    assert not cache.usable and not cache.writable
    for _ in range(3):
        cache.put(KEY, tokens(4, 8))
        assert cache.get(KEY) is None
    [message] = warnings_of(caplog)
    assert str(root) in message and "unusable" in message and "running without it" in message
    assert blocker.read_bytes() == b"not a folder"


@pytest.mark.parametrize("mode", READ_ONLY_MODES)
def test_a_read_only_cache_warns_once_and_still_serves_its_entries(tmp_path, caplog, monkeypatch, request, mode):
    root = tmp_path / "cache"
    t = tokens(4, 8)
    ConditionCache(root).put(KEY, t)  # written while it was writable
    make_read_only(mode, root, monkeypatch, request)
    make_read_only(mode, entry_path(root).parent, monkeypatch, request)
    cache = ConditionCache(root)
    assert cache.usable
    for i in range(3):
        cache.put(f"{i:02x}" + "2" * 62, tokens(4, 8, seed=i))  # never raises
        cache.put(KEY, tokens(4, 8, seed=9))
    assert not cache.writable and torch.equal(cache.get(KEY), t)
    [message] = warnings_of(caplog)
    assert str(root) in message and "unusable" in message
    assert sorted(p for p in root.rglob("*") if p.is_file()) == [entry_path(root)]


def test_an_unreadable_entry_turns_the_cache_off_with_one_warning(tmp_path, caplog, monkeypatch):
    cache = ConditionCache(tmp_path)
    cache.put(KEY, tokens(4, 8))

    def eio(self):
        raise OSError(errno.EIO, "Input/output error", str(self))

    monkeypatch.setattr(Path, "read_bytes", eio)
    assert cache.get(KEY) is None and cache.get(KEY) is None
    assert not cache.usable
    [message] = warnings_of(caplog)
    assert "Input/output error" in message and str(tmp_path) in message


@pytest.mark.parametrize("mode", ["file", *READ_ONLY_MODES])
def test_the_checkpoint_hash_memo_in_an_unusable_cache_folder_is_skipped(tmp_path, monkeypatch, request, mode):
    checkpoint = tmp_path / "adapter.bin"
    checkpoint.write_bytes(b"weights" * 1000)
    folder = tmp_path / "cache"
    if mode == "file":
        folder.write_bytes(b"")
    else:
        make_read_only(mode, folder, monkeypatch, request)
    digest = files.sha256_file_memo(checkpoint, folder / "file-hashes.json")
    assert digest == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_tiny_models_in_an_unwritable_home_are_a_usage_error(tmp_path, monkeypatch):
    from easyref_cli.models import ensure_built

    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    monkeypatch.setenv("EASYREF_HOME", str(blocker / "home"))
    with pytest.raises(UsageError) as info:
        ensure_built("tiny")
    message = str(info.value)
    assert str(blocker / "home" / "tiny-models") in message and "EASYREF_HOME" in message


# ----------------------------------------------------------------------------------------------
# End to end: `easyref generate`
# ----------------------------------------------------------------------------------------------


def generate(tiny, group: Path, out: Path, *extra) -> object:
    """One prompt, one 64² image in 2 steps, warnings shown (no ``-q``)."""
    args = [
        "generate", group, "--prompt", "a cat", "-o", out,
        "--base-model", tiny.base_model, "--mllm", tiny.mllm, "--adapter", tiny.adapter_lora,
        "--device", "cpu", "--width", "64", "--height", "64", "--steps", "2", "--batch-size", "1", *extra,
    ]  # fmt: skip
    return cli.invoke(app, [str(a) for a in args], catch_exceptions=False)


def pngs(out: Path) -> list[Path]:
    return sorted(out.rglob("*.png"))


@pytest.mark.usefixtures("one_torch_thread")
def test_generate_with_a_cache_dir_that_is_a_file_warns_once_and_writes_the_image(tiny, ref_group, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"a file")
    res = generate(tiny, ref_group, tmp_path / "out", "--cache-dir", blocker)
    assert res.exit_code == 0, res.output
    assert len(pngs(tmp_path / "out")) == 1
    assert res.stderr.count("unusable") == 1 and f"condition cache {blocker} unusable" in res.stderr
    assert "Traceback" not in res.output and blocker.read_bytes() == b"a file"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("mode", READ_ONLY_MODES)
def test_generate_with_a_read_only_cache_dir_runs_without_it(tiny, ref_group, tmp_path, monkeypatch, request, mode):
    cache = tmp_path / "cache"
    make_read_only(mode, cache, monkeypatch, request)
    res = generate(tiny, ref_group, tmp_path / "out", "--cache-dir", cache)
    assert res.exit_code == 0, res.output
    assert len(pngs(tmp_path / "out")) == 1
    assert res.stderr.count("unusable") == 1 and str(cache) in res.stderr
    assert list(cache.iterdir()) == []


@pytest.mark.usefixtures("one_torch_thread")
def test_a_corrupted_cache_entry_is_re_encoded_and_gives_the_same_image(tiny, ref_group, tmp_path):
    from safetensors import safe_open

    cache, out = tmp_path / "cache", tmp_path / "out"
    res = generate(tiny, ref_group, out, "--cache-dir", cache)
    assert res.exit_code == 0, res.output
    [png] = pngs(out)
    first = png.read_bytes()

    def read(path: Path) -> tuple[dict[str, str], torch.Tensor]:
        with safe_open(str(path), "pt") as f:
            return f.metadata(), f.get_tensor("tokens").clone()  # not a view of the mapped file

    [entry] = [p for p in cache.rglob("*.safetensors") if read(p)[0].get("kind") == "cond"]
    meta, stored = read(entry)
    flip_byte(entry, entry.stat().st_size - 1)  # the last float's exponent: the tokens change, still finite
    assert read(entry)[0] == meta and not torch.equal(read(entry)[1], stored)

    res = generate(tiny, ref_group, out, "--cache-dir", cache, "--overwrite")
    assert res.exit_code == 0, res.output
    assert png.read_bytes() == first
    assert res.stderr.count(str(entry)) == 1 and "checksum" in res.stderr
    assert read(entry)[0] == meta and torch.equal(read(entry)[1], stored)  # re-encoded, overwritten in place
    assert ConditionCache(cache).get(entry.stem) is not None


@pytest.mark.parametrize("mode", ["file", *READ_ONLY_MODES])
def test_model_tiny_with_an_unwritable_home_is_a_usage_error(ref_group, tmp_path, monkeypatch, request, mode):
    home = tmp_path / "home"
    if mode == "file":
        home.write_bytes(b"")
    else:
        make_read_only(mode, home, monkeypatch, request)
    folder = home / "tiny-models"
    monkeypatch.setenv("EASYREF_HOME", str(home))
    args = ["generate", ref_group, "--prompt", "a cat", "-o", tmp_path / "out", "--model", "tiny", "--device", "cpu"]
    res = cli.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert str(folder) in res.stderr and "EASYREF_HOME" in res.stderr and "writable" in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() or pngs(tmp_path / "out") == []
    if mode != "file":
        assert list(home.iterdir()) == []
