"""Names: prompt-id slugs, job ids, output-name templates, safe path components. Torch-free."""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from easyref_cli.errors import UsageError

DEFAULT_NAME_TEMPLATE = "{group}/{prompt_id}_{seed}.png"
NAME_FIELDS = ("group", "prompt_id", "seed", "index", "preset")
SLUG_MAX_LEN = 40


def slugify(text: str, max_len: int = SLUG_MAX_LEN) -> str:
    """Lowercase ``[a-z0-9-]`` slug, ≤ ``max_len`` chars; accents folded; ``prompt`` if empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "prompt"


def assign_prompt_ids(specs: Sequence[Any]) -> list[str]:
    """Prompt ids in spec order: explicit ``id`` as given, else a slug of the prompt.

    Explicit ids are reserved first; slugs are deduplicated against everything used so far with
    ``-2``, ``-3``... (kept within :data:`SLUG_MAX_LEN`).

    Raises:
        UsageError: two explicit ids are equal.
    """
    used: set[str] = set()
    for spec in specs:
        if spec.id is not None:
            if spec.id in used:
                raise UsageError(f"duplicate prompt id {spec.id!r} (prompts[{spec.index}])")
            used.add(spec.id)
    ids: list[str] = []
    for spec in specs:
        if spec.id is not None:
            ids.append(spec.id)
            continue
        base = slugify(spec.prompt)
        candidate, n = base, 1
        while candidate in used:
            n += 1
            suffix = f"-{n}"
            candidate = base[: SLUG_MAX_LEN - len(suffix)].rstrip("-") + suffix
        used.add(candidate)
        ids.append(candidate)
    return ids


_UNSAFE_CHARS = re.compile(r'[/\\<>:"|?*]')
_COMPONENT_MAX_BYTES = 150


def sanitize_component(value: str) -> str:
    """Make one path component safe: no separators, ``..``, control chars or leading dots.

    Unicode letters are kept (NFC-normalised); ``/ \\ < > : " | ? *`` and control/format
    characters become ``_``; runs of dots collapse to one; leading dots/spaces and trailing
    dots/spaces are stripped; the result is cut to 150 UTF-8 bytes and is never empty (``_``).
    """
    text = unicodedata.normalize("NFC", str(value))
    text = "".join("_" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c for c in text)
    text = _UNSAFE_CHARS.sub("_", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = text.lstrip(". ").rstrip(". ")
    encoded = text.encode("utf-8")
    if len(encoded) > _COMPONENT_MAX_BYTES:
        text = encoded[:_COMPONENT_MAX_BYTES].decode("utf-8", "ignore").rstrip(". ")
    return text or "_"


def _preset_label(preset: str | None) -> str:
    if not preset:
        return "default"
    return PurePosixPath(preset.replace("\\", "/")).stem or preset


def _check_literal(template: str, literal: str) -> None:
    if "\\" in literal or ":" in literal or any(unicodedata.category(c) == "Cc" for c in literal):
        raise UsageError(
            f"invalid name template {template!r}: use '/' between directories and no '\\', ':' or control characters"
        )


def _render_field(template: str, values: dict[str, Any], field_name: str, spec: str, conversion: str | None) -> str:
    if field_name not in NAME_FIELDS or conversion:
        raise UsageError(
            f"unknown field {{{field_name}{'!' + conversion if conversion else ''}}} in name "
            f"template {template!r} (allowed: {', '.join('{' + f + '}' for f in NAME_FIELDS)})"
        )
    try:
        formatted = format(values[field_name], spec or "")
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid format {{{field_name}:{spec}}} in name template {template!r}: {e}") from None
    return sanitize_component(formatted)


def render_name(
    template: str,
    *,
    group: str,
    prompt_id: str,
    seed: int,
    index: int,
    preset: str | None,
) -> Path:
    """Render an output name template into a safe path relative to the output directory.

    Fields: ``{group} {prompt_id} {seed} {index} {preset}`` (format specs like ``{seed:05d}``
    allowed). Each rendered field is passed through :func:`sanitize_component`, so values cannot
    add directories or escape; the template's literal text may use ``/`` for sub-directories but
    not ``\\``, ``:``, absolute paths, empty, ``.``/``..`` or hidden components. ``.png`` is
    appended when missing.

    Raises:
        UsageError: unknown field, bad format spec, or a template whose literal text escapes.
    """
    values = {"group": group, "prompt_id": prompt_id, "seed": seed, "index": index, "preset": _preset_label(preset)}
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"invalid name template {template!r}: {e}") from None
    pieces: list[str] = []
    for literal, field_name, spec, conversion in parsed:
        _check_literal(template, literal)
        pieces.append(literal)
        if field_name is not None:
            pieces.append(_render_field(template, values, field_name, spec, conversion))
    name = "".join(pieces)
    if not name.lower().endswith(".png"):
        name += ".png"
    parts = name.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise UsageError(
            f"invalid name template {template!r}: it must give a relative path inside the output "
            "directory, with no empty, '.', '..' or hidden (leading '.') components"
        )
    return Path(*parts)


def check_name_template(template: str) -> None:
    """Raise UsageError now if ``template`` cannot render (done before any work)."""
    render_name(template, group="g", prompt_id="p", seed=0, index=0, preset=None)


def make_job_id(**fields: Any) -> str:
    """16 hex chars of sha256 over the JSON of ``fields`` (sorted keys): stable across runs."""
    payload = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
