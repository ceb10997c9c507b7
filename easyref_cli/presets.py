"""Presets: named bundles of generation options (``--preset style`` or ``--preset my.yaml``).

Built-in presets are the ``presets/*.yaml`` files shipped inside the wheel as
``easyref_cli/presets/`` (source checkouts read the top-level ``presets/`` directory). A preset
may hold any setting (:data:`easyref_cli.settings.SETTING_KEYS`) plus ``description``; anything
else is an error, reported as ``file:line: key: message`` like prompt-file errors. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref_cli.errors import UsageError
from easyref_cli.settings import SETTING_KEYS, validate_settings
from easyref_cli.yamlio import format_problems, line_of, load_yaml_with_lines

#: Keys a preset file may hold.
PRESET_KEYS: tuple[str, ...] = (*SETTING_KEYS, "description")
PRESET_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class PresetInfo:
    """A preset's name, file and one-line description (for ``easyref presets list``)."""

    name: str
    path: Path
    description: str


def builtin_dir() -> Path:
    """The directory of built-in presets: inside the package (wheel), else the source tree's."""
    here = Path(__file__).resolve().parent
    installed = here / "presets"
    if installed.is_dir():
        return installed
    return here.parent / "presets"


def _builtin_files() -> dict[str, Path]:
    directory = builtin_dir()
    if not directory.is_dir():
        return {}
    return {
        p.stem: p
        for p in sorted(directory.iterdir())
        if p.suffix in PRESET_SUFFIXES and p.is_file() and not p.name.startswith(".")
    }


def is_preset_path(name_or_path: str) -> bool:
    """True when the argument names a file (has a path separator or a .yaml/.yml suffix)."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in name_or_path for s in seps) or name_or_path.lower().endswith(PRESET_SUFFIXES)


def find_preset(name_or_path: str) -> Path:
    """The file for a built-in preset name or a user preset path.

    Raises:
        UsageError: unknown name (listing the built-in names) or missing file.
    """
    if is_preset_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UsageError(f"preset file not found: {path}")
        return path
    files = _builtin_files()
    if name_or_path not in files:
        available = ", ".join(files) or "(none installed)"
        raise UsageError(
            f"unknown preset {name_or_path!r}; available: {available} (or give the path of a .yaml preset file)"
        )
    return files[name_or_path]


def _read(path: Path) -> dict[str, Any]:
    """Load and validate a preset file; returns the normalised settings and ``description``."""
    data, lines = load_yaml_with_lines(path, what="preset")
    if data is None:
        return {"description": ""}
    if not isinstance(data, dict):
        raise UsageError(f"{path}:{line_of(lines, ())}: invalid preset: the file must hold a mapping of options")
    options = {k: v for k, v in data.items() if k != "description"}
    normalised, problems = validate_settings(options, allowed=SETTING_KEYS)
    messages = [
        (line_of(lines, (key,)), key, msg.replace("unknown key", "unknown key for a preset")) for key, msg in problems
    ]
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        messages.append((line_of(lines, ("description",)), "description", "must be a string"))
    if messages:
        raise UsageError(format_problems(path, "invalid preset", messages))
    normalised["description"] = description or ""
    return normalised


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The validated, normalised generation options of a preset (``description`` left out).

    A name picks a built-in preset; anything with a path separator or a ``.yaml``/``.yml``
    suffix is a user file.

    Raises:
        UsageError: unknown preset (listing the available ones), missing file, YAML syntax error
            (``file:line``), unknown keys or wrong types (one ``field: message`` line each).
    """
    options = _read(find_preset(name_or_path))
    options.pop("description", None)
    return options


def preset_info(name_or_path: str) -> PresetInfo:
    """Name, file and description of one preset (validating it)."""
    path = find_preset(name_or_path)
    name = path.stem if not is_preset_path(name_or_path) else str(name_or_path)
    return PresetInfo(name=name, path=path, description=_read(path)["description"])


def list_presets() -> list[PresetInfo]:
    """The built-in presets, sorted by name."""
    return [
        PresetInfo(name=name, path=path, description=_read(path)["description"])
        for name, path in sorted(_builtin_files().items())
    ]
