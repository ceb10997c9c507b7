"""Turn ``--base-model/--mllm/--adapter`` values (local paths or hub ids) into local paths.

Hub ids resolve through the normal Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``); with
``HF_HUB_OFFLINE=1`` or no network, only what is already cached is used, and a miss is a
:class:`ModelError` that says how to point at local folders instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from easyref_cli.errors import ModelError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


def is_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not Path(spec).exists()


def hub_file(spec: str) -> tuple[str, str] | None:
    """``(repo, filename)`` when ``spec`` is ``owner/name/file…`` (and no local path), else None."""
    parts = spec.split("/")
    if len(parts) < 3 or not is_repo_id("/".join(parts[:2])) or Path(spec).exists():
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def is_hub_spec(spec: str) -> bool:
    """A hub repo id (``owner/name``) or a file in one (``owner/name/file``), not a local path."""
    return is_repo_id(spec) or hub_file(spec) is not None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


#: What to run offline instead of a model that is not cached: the trained demo for generation;
#: eval's scorers have no demo, only its tiny random ones.
_OFFLINE_HINT = "`easyref generate --model demo` for an offline run (the tiny EasyRef shipped with the package)"
_OFFLINE_HINTS = dict.fromkeys(("--clip-model", "--dino-model"), "`easyref eval --model tiny` for an offline smoke run")


def _snapshot(repo_id: str, option: str, allow_patterns=None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and friends)
        pass
    if not _offline():
        try:
            return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
        except Exception as exc:  # noqa: BLE001 - network errors vary
            reason = f"download failed: {type(exc).__name__}"
    else:
        reason = "HF_HUB_OFFLINE is set"
    raise ModelError(
        f"{repo_id} is not in the Hugging Face cache and cannot be fetched ({reason}). "
        f"Download it on a connected machine (`hf download {repo_id} --local-dir DIR`), copy DIR here "
        f"and pass {option} DIR — or try {_OFFLINE_HINTS.get(option, _OFFLINE_HINT)}."
    )


def resolve_folder(spec: str, option: str, allow_patterns=None) -> Path:
    """A model folder: an existing local path, or a hub repo id resolved through the cache
    (``allow_patterns``: only those files, e.g. the configs of ``--base-config``)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if is_repo_id(spec):
        return _snapshot(spec, option, allow_patterns=allow_patterns)
    raise ModelError(f"{option} {spec}: no such folder (and not a hub id like owner/name)")


def resolve_model(spec: str, option: str) -> Path:
    """A model given as a folder, a single file or a hub id (a folder, or ``owner/name/file``)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if hub_file(spec) is not None:
        return _hub_file(spec, option, with_config=True)  # the file and the config.json beside it
    return resolve_folder(spec, option)


def _hub_file(spec: str, option: str, *, with_config: bool = False) -> Path:
    repo, filename = hub_file(spec)
    patterns = [filename]
    if with_config:
        patterns.append(str(Path(filename).parent / "config.json") if "/" in filename else "config.json")
    folder = _snapshot(repo, option, allow_patterns=patterns)
    if not (folder / filename).is_file():
        raise ModelError(f"{repo} has no file {filename}")
    return folder / filename


def resolve_checkpoint(spec: str, option: str = "--adapter") -> Path:
    """An adapter file: a local file, ``owner/name`` (its single checkpoint file) or ``owner/name/file``."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _single_checkpoint(path, spec, option)
    if hub_file(spec) is not None:
        return _hub_file(spec, option)
    if is_repo_id(spec):
        return _single_checkpoint(_snapshot(spec, option), spec, option)
    raise ModelError(f"{option} {spec}: no such file (and not a hub id like owner/name[/file])")


def _single_checkpoint(folder: Path, spec: str, option: str) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(files) == 1:
        return files[0]
    if not files:
        raise ModelError(f"{spec} holds no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
    names = ", ".join(str(p.relative_to(folder)) for p in files)
    raise ModelError(f"{spec} holds several checkpoints ({names}); pass {option} {spec}/<file>")


def folder_fingerprint(path: Path) -> str:
    """A cheap identity for a model folder: its configs and each weight file's name, size,
    modification time and inode (hub snapshots are content-addressed symlinks, resolved here).

    Hashing multi-GB weights on every run would cost more than the encode it protects; retraining
    a local folder rewrites its files, which changes mtime. Used in condition-cache keys.
    """
    import hashlib

    h = hashlib.sha256()
    path = Path(path)
    for cfg in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        f = path / cfg
        if f.is_file():
            h.update(cfg.encode() + b"\0" + f.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        real = f.resolve()
        st = real.stat()
        h.update(f"{f.name}:{real.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    return h.hexdigest()
