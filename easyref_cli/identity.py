"""What a job's id is made of besides its settings: the models and references *by content*.

A job id must change exactly when the pixels can: a changed reference image or retrained weights
under the same path give another image, and the same weights installed somewhere else (another
venv, another machine, another ``EASYREF_HOME``) give the same one. So ids hash

- each reference image's sha256, in encoding order;
- each model's content: a local file's sha256, or a local folder's sha256 over its files'
  ``(relative path, sha256)`` pairs; a hub id as given (a hub snapshot is named by its id);
- ``--model tiny``: the tiny build's version (the models are built from fixed seeds, and may not
  be built yet at planning).

Hashing multi-GB weights on every plan would cost more than it protects: each file's sha256 is
remembered in ``$EASYREF_HOME/file-hashes.json`` under its real path, size, modification time and
inode (a rewritten file changes its mtime, a replaced one its inode), so a model folder is read
once, not on every run; Hugging Face cache blobs are named by their sha256 and never read.

Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref_cli import files
from easyref_cli.errors import EasyRefError, InputError
from easyref_cli.files import Group

if TYPE_CHECKING:
    from easyref_cli.models import ModelIds

logger = logging.getLogger(__name__)

HASH_MEMO_NAME = "file-hashes.json"
_BLOB = re.compile(r"^[0-9a-f]{64}$")  # a Hugging Face cache blob of an LFS file: its sha256
_LARGE = 256 * 2**20


def hash_memo() -> Path:
    from easyref_cli.env import easyref_home

    return easyref_home() / HASH_MEMO_NAME


class FileHashes:
    """sha256s of files, remembered in a JSON memo (see the module docstring).

    A missing, damaged or unwritable memo only costs re-hashing; writes are atomic, so concurrent
    runs at worst drop each other's new entries.
    """

    def __init__(self, memo: Path | None):
        self.memo = memo
        self._entries: dict | None = None
        self._dirty = False

    def _load(self) -> dict:
        if self._entries is None:
            entries = {}
            if self.memo is not None:
                try:
                    entries = json.loads(self.memo.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    entries = {}
            self._entries = entries if isinstance(entries, dict) else {}
        return self._entries

    def sha256(self, path: Path) -> str:
        """The file's sha256 (from the memo when its real path, size, mtime and inode still match).

        Raises:
            InputError: the file cannot be read.
        """
        real = Path(path).resolve()
        if _BLOB.match(real.name) and real.parent.name == "blobs":
            return real.name
        try:
            st = real.stat()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entries = self._load()
        entry = entries.get(str(real))
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        if st.st_size >= _LARGE:
            logger.warning(
                "hashing %s (%.1f GB) once, to identify the model by content (remembered in %s)",
                real, st.st_size / 1e9, self.memo,
            )  # fmt: skip
        digest = files.sha256_file(real)
        entries[str(real)] = {"stamp": stamp, "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty or self.memo is None or self._entries is None:
            return
        data = json.dumps(self._entries, indent=1, sort_keys=True).encode("utf-8")
        with contextlib.suppress(EasyRefError):
            files.write_bytes_atomic(self.memo, data, error=InputError)
        self._dirty = False


def _folder_files(folder: Path) -> Iterable[Path]:
    """Every non-hidden file under ``folder`` (hidden files and folders are caches and markers)."""
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(root) / name


def content_id(spec: str, hashes: FileHashes) -> str:
    """``sha256:<hex>`` of a local model file or folder; a hub id (anything else) as given."""
    path = Path(spec).expanduser()
    if path.is_file():
        return "sha256:" + hashes.sha256(path)
    if path.is_dir():
        pairs = [[p.relative_to(path).as_posix(), hashes.sha256(p)] for p in _folder_files(path)]
        payload = json.dumps(pairs, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return "sha256:" + hashlib.sha256(payload).hexdigest()
    return spec  # a hub id, or a path that does not exist (the run says so when it resolves it)


def model_identity(models: ModelIds, family: str | None, memo: Path | None = None) -> dict[str, Any]:
    """The job-id identity of the run's models: the three EasyRef models, then any ``vae``,
    ``base_config``, ``loras`` (``[[content id, weight], ...]``) and ``controlnets`` given."""
    hashes = FileHashes(hash_memo() if memo is None else memo)
    try:
        if family == "tiny":
            from easyref_cli.tiny import _BUILD_VERSION

            out: dict[str, Any] = {key: f"{_BUILD_VERSION}/{key}" for key in models.as_dict()}
        else:
            out = {key: content_id(spec, hashes) for key, spec in models.as_dict().items()}
        for key in ("vae", "base_config"):
            if getattr(models, key) is not None:
                out[key] = content_id(getattr(models, key), hashes)
        if models.loras:
            out["loras"] = [[content_id(spec, hashes), weight] for spec, weight in models.loras]
        if models.controlnets:
            out["controlnets"] = [_controlnet_id(spec, hashes) for spec in models.controlnets]
        return out
    finally:
        hashes.save()


def _controlnet_id(spec: str, hashes: FileHashes) -> str:
    from easyref_cli.models import family_controlnet_path

    if spec == "tiny":  # built at run time from the tiny base: its builder version is its content
        from easyref_cli.tiny import _CONTROLNET_BUILD_VERSION

        return f"{_CONTROLNET_BUILD_VERSION}/controlnet"
    if spec == "demo":
        return content_id(str(family_controlnet_path("demo")), hashes)
    return content_id(spec, hashes)


def reference_digests(group: Group) -> tuple[str | None, ...]:
    """Each reference image's sha256 in encoding order; ``None`` for one that cannot be read (its
    jobs then fail in the encode phase, naming the file)."""
    out: list[str | None] = []
    for path in group.images:
        try:
            out.append(files.sha256_file(path))
        except InputError:
            out.append(None)
    return tuple(out)
