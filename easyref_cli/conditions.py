"""On-disk cache of reference conditions (``cond``/``uncond`` tokens) as safetensors files.

Keyed by what determines the tokens: group content hash, instruction, caption, the MLLM folder's
fingerprint, the adapter's sha256, the final-layer mode and the encoder dtype. A resumed or
repeated run whose conditions are all cached loads no MLLM at all. Entries are written atomically,
so a shared ``--cache-dir`` is safe across processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def condition_key(**fields: str) -> str:
    payload = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ConditionCache:
    """``root/<key[:2]>/<key>.safetensors`` holding one ``tokens`` tensor. ``root=None`` disables it."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if self.root is None:
            return None
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        from safetensors.torch import load_file

        try:
            tokens = load_file(str(path))["tokens"]
        except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss, not a failure
            logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return tokens

    def put(self, key: str, tokens: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
        if self.root is None:
            return
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # unique across hosts sharing the folder
        try:
            save_file({"tokens": tokens.detach().cpu().contiguous()}, str(tmp), metadata=metadata or {})
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not write cache entry %s (%s)", path, exc)
        finally:
            tmp.unlink(missing_ok=True)
