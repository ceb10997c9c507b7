"""Evaluation of a generated output folder: metrics (``easyref eval``) and contact sheets (``easyref report``).

This module is the torch-free part both commands share: it reads an output folder written by
``easyref generate`` through :mod:`easyref_cli.files` (the manifest and each PNG's ``easyref``
record; there is no second parser) and writes result files atomically.

Which images count (:func:`collect_images`):

* the **latest** manifest entry per ``job_id`` decides (:func:`easyref_cli.files.latest_status`);
* ``ok`` and ``skipped`` are finished images (``skipped`` is what a resumed run logs for an image
  that already exists, so a resumed folder still evaluates in full); ``error`` entries are counted
  as ``failed`` and left out;
* the manifest's ``path`` is used when it exists; otherwise the path is looked up inside ``OUT``
  (longest matching tail), so a folder that was moved or copied to another machine still works;
* an image whose record carries another ``job_id`` was overwritten by a later job (``--overwrite``
  with new settings) and is counted once, under that job; a listed image that is gone from disk
  is counted as ``missing`` (with a warning) — curating a folder by deleting images is fine.

Layout of the results::

    OUT/eval/per_image.jsonl     one JSON object per evaluated image
    OUT/eval/metrics.json        overall and per-group means and counts
    OUT/report/<group>.png       one contact sheet per group
    OUT/report/index.html        static page linking every sheet (+ the metrics table)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easyref_cli.errors import InputError, UsageError

# easyref_cli.files (Pillow) is imported inside the functions: cli.py imports eval.command, and
# importing a submodule runs this file, which must stay as cheap as `easyref --help` needs.

logger = logging.getLogger(__name__)

EVAL_DIRNAME = "eval"
REPORT_DIRNAME = "report"
PER_IMAGE_NAME = "per_image.jsonl"
METRICS_NAME = "metrics.json"
INDEX_NAME = "index.html"
#: Manifest statuses that mean "this image is finished and on disk".
FINISHED_STATUSES = ("ok", "skipped")


@dataclass(frozen=True)
class GeneratedImage:
    """One finished image of an output folder, with what its record says about it."""

    job_id: str
    group: str
    prompt_id: str
    seed: int | None
    #: Where the PNG is now.
    path: Path
    #: ``path`` relative to the output folder (POSIX), or the absolute path when outside it.
    name: str
    prompt: str
    #: Reference image paths from the record, in encoding order.
    references: tuple[Path, ...]
    record: dict = field(compare=False, repr=False)
    #: The input images of a ControlNet / img2img / inpainting job, in order, from the record's
    #: ``inputs``: ``("control", path)`` (``"control 1"``, ``"control 2"``… when several), ``("init", path)``,
    #: ``("mask", path)``; empty for text-to-image. A path is kept even when the file is gone.
    inputs: tuple[tuple[str, Path], ...] = ()


@dataclass
class OutputFolder:
    """The finished images of an output folder, plus what was left out and why."""

    root: Path
    images: list[GeneratedImage]
    #: Jobs whose latest manifest entry is ``error``.
    failed: int = 0
    #: Finished jobs whose PNG is no longer on disk (their manifest paths).
    missing: list[str] = field(default_factory=list)
    #: Jobs whose PNG now holds another job's image (overwritten by a later run).
    superseded: int = 0

    def groups(self) -> dict[str, list[GeneratedImage]]:
        """Images by group, groups and images in manifest (job) order."""
        out: dict[str, list[GeneratedImage]] = {}
        for image in self.images:
            out.setdefault(image.group, []).append(image)
        return out

    def counts(self) -> dict[str, int]:
        return {
            "images": len(self.images),
            "groups": len(self.groups()),
            "failed": self.failed,
            "missing": len(self.missing),
            "superseded": self.superseded,
        }


def manifest_path(out_dir: Path) -> Path:
    """``OUT/manifest.jsonl``, or a :class:`UsageError` naming what is missing."""
    from easyref_cli.files import MANIFEST_NAME

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"output folder not found: {out_dir} (give the folder `easyref generate -o` wrote)")
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise UsageError(
            f"no manifest at {path}: {out_dir} does not look like an `easyref generate` output "
            f"folder (it should hold {MANIFEST_NAME} and <group>/ folders of PNGs)"
        )
    return path


def _locate(out_dir: Path, raw: str) -> Path | None:
    """The file a manifest ``path`` names, looked for inside ``out_dir`` first.

    The runner writes ``str(OUT / relative name)`` — absolute, or relative to the directory
    ``generate`` ran in. Inside ``out_dir`` the longest tail of that path that exists wins (so a
    moved folder, or one evaluated from another working directory, resolves to its own files);
    then the path as written.
    """
    recorded = Path(raw)
    if recorded.is_absolute() and recorded.is_file() and out_dir.resolve() in recorded.resolve().parents:
        return recorded
    parts = [p for p in recorded.parts if p != recorded.anchor]
    for k in range(len(parts)):
        candidate = out_dir.joinpath(*parts[k:])
        if candidate.is_file():
            return candidate
    return recorded if recorded.is_file() else None


def _display_name(out_dir: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _references(record: dict, path: Path) -> tuple[Path, ...]:
    refs = record.get("references")
    if not isinstance(refs, list):
        raise InputError(f"{path}: its easyref record has no 'references' list")
    out = []
    for ref in refs:
        raw = ref.get("path") if isinstance(ref, dict) else ref
        if not isinstance(raw, str) or not raw:
            raise InputError(f"{path}: a reference in its easyref record has no path ({ref!r})")
        out.append(Path(raw))
    return tuple(out)


def _input_paths(record: dict, out_dir: Path) -> tuple[tuple[str, Path], ...]:
    """:attr:`GeneratedImage.inputs`: relative paths (a shareable PNG record) as given, from the current
    folder, else from the output folder's parent; a path that is nowhere is kept as recorded."""
    from easyref_cli.records import recorded_inputs  # not at import: the eval command imports no PIL

    out = []
    for label, raw, _ in recorded_inputs(record, log=logger):
        path = Path(raw)
        if not path.is_absolute() and not path.exists() and (out_dir.parent / path).exists():
            path = out_dir.parent / path
        out.append((label, path))
    return tuple(out)


def _as_seed(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def collect_images(out_dir: Path) -> OutputFolder:
    """Read ``OUT/manifest.jsonl`` and the records of the finished images it lists.

    Raises:
        UsageError: ``out_dir`` or its manifest is missing, or the manifest is garbled.
        InputError: a listed PNG exists but carries no readable ``easyref`` record.
    """
    from easyref_cli import files

    out_dir = Path(out_dir)
    latest = files.latest_status(files.read_manifest(manifest_path(out_dir)))
    folder = OutputFolder(root=out_dir, images=[])
    seen: set[Path] = set()
    for job_id, entry in latest.items():
        status = entry.get("status")
        if status == "error":
            folder.failed += 1
            continue
        if status not in FINISHED_STATUSES:
            logger.debug("job %s: status %r, not evaluated", job_id, status)
            continue
        raw = str(entry.get("path") or "")
        path = _locate(out_dir, raw) if raw else None
        if path is None:
            folder.missing.append(raw or job_id)
            continue
        # the manifest keeps the full record (absolute paths) whatever the PNG carries
        record = entry["record"] if isinstance(entry.get("record"), dict) else files.read_png_record(path)
        recorded_id = record.get("job_id")
        key = path.resolve()
        if (recorded_id is not None and str(recorded_id) != job_id) or key in seen:
            folder.superseded += 1
            logger.debug("job %s: %s now holds job %s", job_id, path, recorded_id)
            continue
        seen.add(key)
        folder.images.append(
            GeneratedImage(
                job_id=job_id,
                group=str(entry.get("group") or record.get("group") or "(none)"),
                prompt_id=str(entry.get("prompt_id") or record.get("prompt_id") or ""),
                seed=_as_seed(entry.get("seed", record.get("seed"))),
                path=path,
                name=_display_name(out_dir, path),
                prompt=str(record.get("prompt") or ""),
                references=_references(record, path),
                record=record,
                inputs=_input_paths(record, out_dir),
            )
        )
    if folder.missing:
        shown = ", ".join(folder.missing[:3]) + (" …" if len(folder.missing) > 3 else "")
        logger.warning(
            "%d finished image(s) listed in the manifest are no longer on disk and are left out: %s",
            len(folder.missing),
            shown,
        )
    return folder


def require_images(folder: OutputFolder) -> None:
    """UsageError when the folder holds no finished image at all."""
    from easyref_cli.files import MANIFEST_NAME

    if folder.images:
        return
    c = folder.counts()
    raise UsageError(
        f"{folder.root / MANIFEST_NAME} lists no finished image to use "
        f"({c['failed']} failed, {c['missing']} missing from disk); run `easyref generate` first"
    )


def distinct(paths: Iterable[Path]) -> list[Path]:
    """Paths without duplicates (by resolved location), first occurrence kept, order kept."""
    out: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        key = Path(path).resolve()
        if key not in seen:
            seen.add(key)
            out.append(Path(path))
    return out


# ----------------------------------------------------------------------------------------------
# Atomic writes (files.write_bytes_atomic)
# ----------------------------------------------------------------------------------------------


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """:func:`easyref_cli.files.write_bytes_atomic`; a write failure is a :class:`UsageError` here."""
    from easyref_cli import files

    files.write_bytes_atomic(path, data, error=UsageError)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))
