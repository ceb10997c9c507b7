"""Names: prompt-id slugs, job ids, output-name templates, safe path components. Torch-free."""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from easyref_cli.errors import UsageError

DEFAULT_NAME_TEMPLATE = "{group}/{prompt_id}_{seed}.png"
#: The default template of a job whose control/init image comes from a folder: one image per file.
INPUT_NAME_TEMPLATE = "{group}/{prompt_id}_{input}_{seed}.png"
NAME_FIELDS = ("group", "prompt_id", "seed", "index", "preset", "input")
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
    input: str | None = None,
) -> Path:
    """Render an output name template into a safe path relative to the output directory.

    Fields: ``{group} {prompt_id} {seed} {index} {preset} {input}`` (format specs like ``{seed:05d}``
    allowed; ``{input}`` is the name of the control/init image a folder gave the job, else empty). Each rendered field is passed through :func:`sanitize_component`, so values cannot
    add directories or escape; the template's literal text may use ``/`` for sub-directories but
    not ``\\``, ``:``, absolute paths, empty, ``.``/``..`` or hidden components. ``.png`` is
    appended when missing.

    Raises:
        UsageError: unknown field, bad format spec, or a template whose literal text escapes.
    """
    values = {"group": group, "prompt_id": prompt_id, "seed": seed, "index": index, "preset": _preset_label(preset),
              "input": input or ""}  # fmt: skip
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


#: A file or folder name may have at most 255 bytes (ext4, XFS, btrfs, ZFS, APFS: ``NAME_MAX``).
NAME_MAX_BYTES = 255
#: A path given to the kernel may have at most 4096 bytes with its terminating NUL (Linux ``PATH_MAX``).
PATH_MAX_BYTES = 4096
#: :func:`easyref_cli.files.write_bytes_atomic` first writes ``.NAME.<12 hex>.tmp`` next to ``NAME``.
ATOMIC_TEMP_EXTRA_BYTES = len("." + "." + "0" * 12 + ".tmp")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _long_name_problem(path: Path, temp_extra: int) -> tuple[str, int, int, bool] | None:
    """(component, its bytes, its limit, whether it is the last) of the first component of ``path`` that is
    too long, or None."""
    parts = path.parts
    for i, part in enumerate(parts):
        if i == 0 and path.anchor and part == path.anchor:
            continue
        limit = NAME_MAX_BYTES - (temp_extra if i == len(parts) - 1 else 0)
        size = _utf8_len(part)
        if size > limit:
            return part, size, limit, i == len(parts) - 1
    return None


def _limit_text(limit: int, temp_extra: int) -> str:
    if limit == NAME_MAX_BYTES:
        return f"at most {NAME_MAX_BYTES}"
    return f"at most {limit} ({NAME_MAX_BYTES}, less {temp_extra} for the temporary '.NAME.<random>.tmp' written first)"


def check_path_length(path: Path, what: str, *, temp_extra: int = ATOMIC_TEMP_EXTRA_BYTES) -> None:
    """Raise UsageError if the file ``path`` cannot be written for its length: a name over 255 bytes (the
    file's own over ``255 - temp_extra``, its temporary name being longer) or a whole path over 4095.

    ``what`` names the path's source in the message (``"--out"``).
    """
    path = Path(path)
    problem = _long_name_problem(path, temp_extra)
    if problem is not None:
        part, size, limit, _ = problem
        raise UsageError(
            f"{what} {path}: the name {part!r} is {size} bytes in UTF-8, {_limit_text(limit, temp_extra)} "
            "are allowed; choose a shorter name"
        )
    full = _utf8_len(os.path.abspath(path)) + temp_extra
    if full >= PATH_MAX_BYTES:
        raise UsageError(
            f"{what} {path}: the path is {full - temp_extra} bytes in UTF-8 as an absolute path; at most "
            f"{PATH_MAX_BYTES - 1 - temp_extra} are allowed; choose a shorter path"
        )


def check_output_names(out_dir: Path, jobs: Iterable[Any], template: str) -> None:
    """Raise UsageError now if an output could not be written later for its length.

    Every folder name of ``out_dir`` and of each job's ``output`` may have 255 bytes in UTF-8 and each
    file name 255 less :data:`ATOMIC_TEMP_EXTRA_BYTES` (its temporary name is that much longer); the whole
    temporary path, absolute, stays under :data:`PATH_MAX_BYTES`. The message names the offending name and
    the template. ``jobs`` need ``output``, ``group.name``, ``prompt_id`` and ``seed``.
    """
    out_dir = Path(out_dir)
    problem = _long_name_problem(out_dir, 0)
    if problem is not None:
        part, size, limit, _ = problem
        raise UsageError(
            f"-o {out_dir}: the folder name {part!r} is {size} bytes in UTF-8, at most {limit} are allowed; "
            "choose a shorter output folder"
        )
    base = _utf8_len(os.path.abspath(out_dir)) + 1
    for job in jobs:
        what = (
            f"(group {job.group.name!r}, prompt {job.prompt_id!r}, seed {job.seed}) from --name-template {template!r}"
        )
        problem = _long_name_problem(job.output, ATOMIC_TEMP_EXTRA_BYTES)
        if problem is not None:
            part, size, limit, last = problem
            kind = "file" if last else "folder"
            raise UsageError(
                f"output {kind} name {part!r} {what} is {size} bytes in UTF-8; "
                f"{_limit_text(limit, ATOMIC_TEMP_EXTRA_BYTES)} are allowed: shorten the template's text "
                "(rendered fields are cut to 150 bytes each; put long parts in separate folders with '/')"
            )
        full = base + _utf8_len(job.output.as_posix()) + ATOMIC_TEMP_EXTRA_BYTES
        if full >= PATH_MAX_BYTES:
            raise UsageError(
                f"output path {out_dir / job.output} {what} is {full - ATOMIC_TEMP_EXTRA_BYTES} bytes in UTF-8 "
                f"as an absolute path; at most {PATH_MAX_BYTES - 1 - ATOMIC_TEMP_EXTRA_BYTES} are allowed "
                "(4095, less the temporary name's extra bytes): choose a shorter -o or --name-template"
            )
