"""``easyref inspect``: what an image carries (record, A1111 text, AI label, C2PA) and its record."""

from __future__ import annotations

import json
from pathlib import Path

from easyref_cli import files
from easyref_cli.errors import InputError
from easyref_cli.records import recorded_inputs


def _credentials_line(path: Path) -> str:
    if b"caBX" not in path.read_bytes():  # the PNG chunk C2PA manifests live in
        return "C2PA content credentials: none"
    from easyref_cli import credentials

    if not credentials.available():
        return "C2PA content credentials: present, not checked (install easyref-cli[c2pa])"
    found = credentials.read_credentials(path)
    if found is None:
        return "C2PA content credentials: none"
    state = "valid" if found.get("valid") else "INVALID (" + "; ".join(map(str, found.get("issues") or [])) + ")"
    trust = "" if found.get("trusted") else ", signer not on the C2PA trust list"
    return f"C2PA content credentials: {state}{trust}; generator {found.get('generator')}, {len(found.get('references') or [])} reference(s)"


def _input_state(raw: str, digest: str | None) -> str:
    """Whether an input image is still what the record says: relative paths from the current folder."""
    path = Path(raw)
    if not path.is_file():
        return "not found"
    if digest is None:
        return "found, no sha256 recorded"
    try:
        same = files.sha256_file(path) == digest
    except InputError:
        return "unreadable"
    return "sha256 ok" if same else "changed since"


def input_lines(record: dict) -> list[str]:
    """``control image: pose01.png (sha256 ok)`` / ``(changed since)`` / ``(not found)``, then the init
    image and the mask: one line per input image of a ControlNet / img2img / inpainting record."""
    names = {"control": "control image", "init": "init image", "mask": "mask"}
    lines = []
    for label, raw, digest in recorded_inputs(record):
        kind, _, number = label.partition(" ")
        what = f"{names[kind]} {number}".rstrip()
        lines.append(f"{what}: {raw} ({_input_state(raw, digest)})")
    return lines


def summary(path: Path, meta: files.PngMetadata) -> list[str]:
    """One line per kind of metadata the image carries (and per input image the record names)."""
    lines = []
    if meta.record is not None:
        paths = [str(r.get("path", "")) for r in meta.record.get("references", []) if isinstance(r, dict)]
        where = "absolute paths" if any(Path(p).is_absolute() for p in paths) else "relative paths"
        lines.append(f"easyref record: yes ({where})")
        lines += input_lines(meta.record)
    else:
        lines.append("easyref record: no")
    lines.append(f"A1111 parameters: {'yes' if meta.parameters is not None else 'no'}")
    if meta.label:
        source = str(meta.label.get("digital_source_type", "")).rsplit("/", 1)[-1] or "?"
        lines.append(f"AI label (XMP DigitalSourceType): {source}, by {meta.label.get('creator_tool', '?')}")
    else:
        lines.append("AI label (XMP DigitalSourceType): no")
    lines.append(_credentials_line(path))
    return lines


def inspect_image(path: Path, *, parameters: bool = False) -> tuple[str, list[str]]:
    """``(what to print, summary lines)``: the JSON record (or the A1111 text with ``parameters``, or
    when the image carries no record).

    Raises:
        InputError: the file is not a PNG, or carries nothing easyref writes.
    """
    path = Path(path)
    meta = files.read_png_metadata(path)
    if meta.record is None and meta.parameters is None and not meta.label:
        raise InputError(f"{path} carries no easyref metadata (no 'easyref' record, parameters or AI label)")
    if parameters or meta.record is None:
        text = meta.parameters if meta.parameters is not None else files.format_parameters(meta.record or {})
    else:
        text = json.dumps(meta.record, indent=2, ensure_ascii=False, sort_keys=True)
    return text, summary(path, meta)
