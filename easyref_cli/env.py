"""Library-level environment: where user state lives, package versions, the default device.

Torch-free at import (``default_device`` imports torch when called).
"""

from __future__ import annotations

import os
from pathlib import Path

from easyref_cli import __version__


def easyref_home() -> Path:
    """User state (tiny models, condition cache): ``$EASYREF_HOME`` or ``~/.cache/easyref``."""
    env = os.environ.get("EASYREF_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "easyref"


def package_versions() -> dict[str, str]:
    """easyref-cli and the installed versions of the libraries its results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"easyref-cli": __version__}
    for name in ("torch", "diffusers", "transformers", "accelerate", "xformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
