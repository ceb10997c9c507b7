"""Files in and out: reference groups, image loading, hashing, PNG metadata, the manifest.

Torch-free (DESIGN §4): ``easyref generate --dry-run`` and every validation step import this
module without paying for torch. Everything here raises typed errors from
:mod:`easyref_cli.errors` and never prints.

The generation *record* is the dict stored in every PNG (``easyref`` chunk, JSON) and rendered as
the A1111 ``parameters`` chunk. Its keys (see :func:`easyref_cli.records.job_record`, which builds
the planning part; the run adds the rest):

=================  =====================================================================
``schema``         record layout version (int)
``job_id``         stable job hash; ``group``, ``prompt_id``, ``index``, ``output``
``prompt``         the generation prompt; ``negative_prompt`` (may be ``""``)
``caption``        text given to the MLLM after the instruction (``""`` for ``ref_text: none``)
``instruction``    the MLLM instruction
``seed``, ``steps``, ``guidance``, ``scale``, ``width``, ``height``, ``scheduler``
``base_model``, ``mllm``, ``adapter``   model ids or local paths; ``adapter_sha256`` (runner)
``references``     list of ``{"path": str, "sha256": str}`` in encoding order
``preset``         preset name or path given, or ``None``
``version``        easyref-cli version; runner adds ``versions``, ``attention``, ``timings``...
=================  =====================================================================
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from easyref_cli import __version__
from easyref_cli.errors import EasyRefError, InputError, JobError, StorageError, UsageError
from easyref_cli.settings import SCHEDULERS

#: File extensions (lower case) that count as reference images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".avif"})
#: The job log inside the output directory (DESIGN §6).
MANIFEST_NAME = "manifest.jsonl"
#: PNG text chunk names.
PARAMETERS_CHUNK = "parameters"
RECORD_CHUNK = "easyref"

_HASH_BLOCK = 1 << 20


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One set of reference images, encoded together.

    ``images`` are in natural order (the order the MLLM sees them); ``ignored`` lists the entries of
    the directory that are not used (hidden files, non-images, sub-directories) for ``-v``.
    """

    name: str
    path: Path
    images: tuple[Path, ...]
    ignored: tuple[Path, ...] = ()


def natural_key(s: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``img2`` < ``img10``.

    Text parts compare case-insensitively; the original string breaks ties (``img01`` vs ``img1``)
    so the order is total and deterministic.
    """
    parts = re.split(r"(\d+)", str(s))
    key = tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts))
    return (key, str(s))


def is_image_file(path: Path) -> bool:
    """True for a non-hidden regular file with an image extension (case-insensitive)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _list_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir(), key=lambda p: natural_key(p.name))
    except OSError as e:
        raise UsageError(f"cannot read directory {path}: {e.strerror or e}") from None


def _scan_group(path: Path, name: str) -> Group | None:
    """The group held directly in ``path``, or None when it holds no images."""
    images: list[Path] = []
    ignored: list[Path] = []
    for entry in _list_dir(path):
        (images if is_image_file(entry) else ignored).append(entry)
    if not images:
        return None
    return Group(name=name, path=path, images=tuple(images), ignored=tuple(ignored))


def _dir_name(path: Path) -> str:
    name = path.name
    if name in ("", ".", ".."):
        name = path.resolve().name
    return name


def _holds_images(path: Path) -> bool:
    """True if the folder ``path`` directly holds an image (an unreadable folder holds none)."""
    try:
        with os.scandir(path) as entries:
            return any(is_image_file(Path(entry.path)) for entry in entries)
    except OSError:
        return False


def _refuse_mixed_folder(group: Group) -> None:
    """A group folder whose non-hidden sub-folders hold images too is ambiguous: refuse it."""
    subdirs = [p for p in group.ignored if not p.name.startswith(".") and p.is_dir() and _holds_images(p)]
    if not subdirs:
        return
    path = group.path
    shown = ", ".join(p.name for p in subdirs[:5]) + (f" and {len(subdirs) - 5} more" if len(subdirs) > 5 else "")
    loose = ", ".join(p.name for p in group.images[:3]) + (", ..." if len(group.images) > 3 else "")
    raise UsageError(
        f"{path} holds both images ({len(group.images)}: {loose}) and sub-folders with images ({shown}), so it "
        "is unclear whether it is one group or a folder of groups. Either pass the sub-folders themselves as "
        f"GROUPS (e.g. {subdirs[0]}), or move the loose images into a sub-folder of their own so that {path} is "
        f"a folder of groups; to keep {path} as one group instead, move its sub-folders out or hide them "
        "(a leading '.' in the name)"
    )


def find_groups(paths: Sequence[Path]) -> list[Group]:
    """Turn GROUPS arguments into reference groups.

    A directory holding images is one group named after the directory; its sub-directories must
    then hold no images (hidden ones and those without images are ignored). A directory holding
    no images is a parent: each non-hidden sub-directory that holds images is a group named after
    the sub-directory; sub-directories without images are skipped (and named in the error when no
    group at all is found). Groups keep the argument order and are naturally sorted within a
    parent; images are naturally sorted; hidden entries skipped.

    Raises:
        UsageError: missing path, not a directory, no images found, a directory holding both
            images and sub-directories with images, or two groups with one name.
    """
    groups: list[Group] = []
    if not paths:
        raise UsageError("no reference group directories given")
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UsageError(f"group directory not found: {path}")
        if not path.is_dir():
            raise UsageError(
                f"not a directory: {path} (each GROUP is a directory of reference images, "
                "or a directory of such directories)"
            )
        group = _scan_group(path, _dir_name(path))
        if group is not None:
            _refuse_mixed_folder(group)
            groups.append(group)
            continue
        subdirs = [p for p in _list_dir(path) if p.is_dir() and not p.name.startswith(".")]
        found = [g for g in (_scan_group(d, d.name) for d in subdirs) if g is not None]
        if not found:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            detail = f" or its sub-directories ({', '.join(d.name for d in subdirs)})" if subdirs else ""
            raise UsageError(f"no images found in {path}{detail} (looked for {exts})")
        groups.extend(found)
    seen: dict[str, Path] = {}
    for g in groups:
        if g.name in seen:
            raise UsageError(
                f"two reference groups are named {g.name!r}: {seen[g.name]} and {g.path} "
                "(group names must be unique; rename one directory)"
            )
        seen[g.name] = g.path
    return groups


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make truncated files raise even if some other library flipped the global switch."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha is dropped as the official code's ``convert("RGB")`` does (DESIGN §2 rule 2: the
    checkpoint was trained that way). High bit-depth modes are *scaled* to 8 bits, never clipped:
    ``I;16*`` from 0..65535; ``I`` from 0..65535 when any value exceeds 255 (else used as is);
    ``F`` from 0..1 when all values lie there, else clipped to 0..255.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        import numpy as np

        arr = np.asarray(image)
        if mode == "F":
            arr = arr.astype(np.float64)
            arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
            if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
                arr = arr * 255.0
            out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            if mode.startswith("I;16") or (arr.size and arr.max() > 255):
                arr = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535
            out = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(out, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (hidden ones skipped), in natural name order."""
    return [p for p in _list_dir(Path(folder)) if is_image_file(p)]


def load_image(path: Path, *, exif_orientation: bool = True, what: str = "reference image") -> Image.Image:
    """Open, fully decode, apply EXIF orientation (unless ``exif_orientation=False``: the stored pixel
    order, as the official code reads it) and return an RGB image.

    Truncated files raise (``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced False while loading).
    Images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` × 2) are refused;
    large ordinary photos (6000×6000) load.

    Raises:
        InputError: naming the file (as ``what``: a reference image, a control image…) and the reason
            (unreadable, not an image, truncated or corrupt, decompression bomb, unsupported mode).
    """
    path = Path(path)
    try:
        with _strict_truncation(), Image.open(path) as im:
            im.load()
            # exif_transpose returns a detached copy, so the result outlives the open file.
            image = _to_rgb(ImageOps.exif_transpose(im) if exif_orientation else im.copy())
            image.info["path"] = str(path)  # so a later error about this image (its aspect ratio) can name it
            return image
    except Image.DecompressionBombError as e:
        raise InputError(
            f"cannot use {what} {path}: too many pixels ({e}); refusing a possible decompression bomb"
        ) from None
    except UnidentifiedImageError:
        hint = " (this Pillow cannot read AVIF: install a Pillow with AVIF support)" if _avif_unsupported(path) else ""
        raise InputError(
            f"cannot use {what} {path}: not an image Pillow can read (wrong extension or corrupt file){hint}"
        ) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            reason = f"the file is truncated or incomplete ({reason})"
        raise InputError(f"cannot use {what} {path}: {reason}") from None


def _avif_unsupported(path: Path) -> bool:
    from PIL import features

    return path.suffix.lower() == ".avif" and not features.check("avif")


def load_group_images(group: Group, *, exif_orientation: bool = True) -> list[Image.Image]:
    """Load every image of a group with :func:`load_image` (in group order)."""
    return [load_image(p, exif_orientation=exif_orientation) for p in group.images]


# ----------------------------------------------------------------------------------------------
# Hashing
# ----------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks. Raises InputError when unreadable."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def sha256_file_memo(path: Path, memo: Path | None) -> str:
    """:func:`sha256_file`, remembered in the JSON file ``memo`` under the file's real path with its
    size, modification time and inode, so a multi-GB checkpoint is hashed once instead of on every
    run (the trade-off :func:`easyref_cli.model.hub.folder_fingerprint` makes for model folders:
    rewriting a file changes its mtime or, when replaced, its inode).

    ``memo=None`` always hashes. A missing, unreadable or damaged memo is a miss, and failing to
    write it loses nothing (the next run hashes again); writes are atomic, so concurrent runs at
    worst drop each other's new entries.
    """
    if memo is None:
        return sha256_file(path)
    real = Path(path).resolve()
    try:
        st = real.stat()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    try:
        entries = json.loads(Path(memo).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    entry = entries.get(str(real))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(real)
    entries[str(real)] = {"stamp": stamp, "sha256": digest}
    with contextlib.suppress(EasyRefError, OSError):  # a read-only or misplaced cache folder included
        write_bytes_atomic(Path(memo), json.dumps(entries, indent=1, sort_keys=True).encode("utf-8"), error=InputError)
    return digest


def group_content_hash(group: Group, digests: Sequence[str] | None = None) -> str:
    """Hex sha256 over the sorted ``(file name, file sha256)`` pairs of a group.

    Depends on contents and names only (not mtimes or the directory's location), so it is a
    stable cache key for the group's encoding. ``digests`` (one per image, in group order) skips
    re-hashing files the caller has already hashed.
    """
    if digests is None:
        digests = [sha256_file(p) for p in group.images]
    pairs = sorted((p.name, d) for p, d in zip(group.images, digests, strict=True))
    payload = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# PNG metadata
# ----------------------------------------------------------------------------------------------


def _a1111_quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _a1111_sampler(name: Any) -> Any:
    sampler = SCHEDULERS.get(name) if isinstance(name, str) else None
    return sampler.a1111 if sampler is not None else name


def format_parameters(record: Mapping[str, Any], *, names: bool = True) -> str:
    """The A1111-style ``parameters`` text for a record.

    Line 1 the prompt, line 2 ``Negative prompt: ...`` (omitted when empty), line 3 the
    comma-separated ``Key: value`` settings. Keys missing from the record are left out; values
    with ``,``, ``:`` or newlines are JSON-quoted as A1111 does. ``names=False`` leaves out the
    model and adapter names (``--metadata minimal``: settings only).
    """
    lines = [str(record.get("prompt", ""))]
    negative = record.get("negative_prompt")
    if negative and record.get("zero_negative") != "always":  # "always" zeroes it: nothing of it was used
        lines.append(f"Negative prompt: {negative}")
    fields: list[tuple[str, Any]] = [
        ("Steps", record.get("steps")),
        ("Sampler", _a1111_sampler(record.get("scheduler"))),
        ("CFG scale", record.get("guidance")),
        ("Seed", record.get("seed")),
    ]
    if record.get("width") is not None and record.get("height") is not None:
        fields.append(("Size", f"{record['width']}x{record['height']}"))
    fields += [
        ("Model", record.get("base_model") if names else None),
        ("EasyRef scale", record.get("scale")),
        ("EasyRef adapter", record.get("adapter") if names else None),
    ]
    if record.get("adapter_sha256"):
        fields.append(("EasyRef adapter hash", str(record["adapter_sha256"])[:10]))
    if record.get("references") is not None:
        fields.append(("EasyRef references", len(record["references"])))
    inputs = record.get("inputs") if isinstance(record.get("inputs"), dict) else {}
    if inputs.get("init") and record.get("strength") is not None:
        fields.append(("Denoising strength", record["strength"]))  # A1111's img2img/inpainting key
    if inputs.get("control"):
        fields.append(("ControlNets", len(inputs["control"])))
    fields.append(("Version", f"easyref-cli {record.get('version') or __version__}"))
    lines.append(", ".join(f"{k}: {_a1111_quote(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def _open_exclusive_temp(directory: Path, final_name: str) -> tuple[int, Path]:
    for _ in range(100):
        tmp = directory / f".{final_name}.{secrets.token_hex(6)}.tmp"
        try:
            # 0o666 & ~umask, unlike mkstemp's 0o600: the final file gets normal permissions.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise JobError(f"cannot create a temporary file in {directory}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # Windows, or a filesystem that does not allow it: best effort.
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, error: type[EasyRefError] = JobError) -> None:
    """Write ``data`` to ``path`` so that the final name only ever holds a complete file.

    The bytes go to ``.NAME.<random>.tmp`` in the target directory, are fsynced, then
    ``os.replace``d onto ``path``. Parent directories are created; the temp file is removed on any
    error (including KeyboardInterrupt).

    Raises:
        error: naming the file when it cannot be written (disk full, permissions...).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, f"cannot create output directory {path.parent}", error) from None
    try:
        fd, tmp = _open_exclusive_temp(path.parent, path.name)
    except OSError as e:
        raise storage_error(e, f"cannot write {path}", error) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise storage_error(e, f"cannot write {path}", error) from None
        raise
    _fsync_dir(path.parent)


#: Errors that no other file in the same place would escape: the run stops instead of failing job after job.
STORAGE_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EIO) if code is not None
)


def storage_error(exc: OSError, what: str, error: type[EasyRefError] = JobError) -> EasyRefError:
    """``what`` failed with ``exc``: a :class:`StorageError` when the storage itself is full, over
    quota, read-only or failing (the run stops), else ``error`` (this file only)."""
    reason = exc.strerror or str(exc)
    if exc.errno in STORAGE_ERRNOS:
        return StorageError(
            f"{what}: {reason}. The run stopped; the images it finished and the manifest are intact — "
            "free space (or fix the storage) and run the same command again to resume"
        )
    return error(f"{what}: {reason}")


#: ``--metadata``: ``full`` the ``easyref`` record + A1111 ``parameters``; ``minimal`` the settings
#: only (``parameters`` without model or file names); ``none`` neither. The AI label is always written.
METADATA_CHOICES = ("full", "minimal", "none")


def png_bytes(image: Image.Image, *, record: Mapping[str, Any], metadata: str = "full") -> bytes:
    """``image`` encoded as PNG with the chunks ``metadata`` asks for, plus the XMP AI label."""
    import io

    from easyref_cli.labels import XMP_CHUNK, xmp_packet

    info = PngInfo()
    if metadata in ("full", "minimal"):
        # add_text falls back to iTXt (UTF-8) when the text is not latin-1.
        info.add_text(PARAMETERS_CHUNK, format_parameters(record, names=metadata == "full"))
    if metadata == "full":
        info.add_itxt(RECORD_CHUNK, json.dumps(dict(record), sort_keys=True, ensure_ascii=False, default=str))
    info.add_itxt(XMP_CHUNK, xmp_packet(f"easyref-cli {record.get('version') or __version__}"), zip=False)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png_atomic(
    path: Path,
    image: Image.Image,
    *,
    record: Mapping[str, Any],
    metadata: str = "full",
    sign: Callable[[bytes], bytes] | None = None,
) -> None:
    """Write ``image`` as a PNG (:func:`png_bytes`), signed by ``sign`` if given, atomically
    (:func:`write_bytes_atomic`).

    Raises:
        JobError: the file cannot be written (disk full, permissions...) or signed.
    """
    data = png_bytes(image, record=record, metadata=metadata)
    write_bytes_atomic(path, sign(data) if sign is not None else data)


@dataclass(frozen=True)
class PngMetadata:
    """What an image carries: the ``easyref`` record, the A1111 text, the XMP AI label (parsed)."""

    record: dict | None
    parameters: str | None
    label: dict | None


def read_png_metadata(path: Path) -> PngMetadata:
    """Every kind of metadata easyref writes, each ``None`` when absent.

    Raises:
        InputError: naming the file when it is unreadable or not a PNG, or its record is not JSON.
    """
    from easyref_cli.labels import XMP_CHUNK, parse_xmp

    path = Path(path)
    text = _png_text(path)
    record = _parse_record(text[RECORD_CHUNK], path) if RECORD_CHUNK in text else None
    label = None
    if XMP_CHUNK in text:
        try:
            label = parse_xmp(text[XMP_CHUNK])
        except ValueError:
            label = {}
    return PngMetadata(record=record, parameters=text.get(PARAMETERS_CHUNK), label=label)


def read_png_record(path: Path) -> dict:
    """The ``easyref`` record stored in a PNG written by :func:`write_png_atomic`.

    Raises:
        InputError: naming the file when it is unreadable, not a PNG, has no ``easyref`` chunk,
            or the chunk is not a JSON object.
    """
    path = Path(path)
    raw = _png_text(path).get(RECORD_CHUNK)
    if raw is None:
        raise InputError(f"{path} has no {RECORD_CHUNK!r} metadata chunk (was it made by easyref generate?)")
    return _parse_record(raw, path)


def _png_text(path: Path) -> dict[str, str]:
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise InputError(f"{path} is not a PNG image (it is {im.format or 'unknown'})")
            return dict(getattr(im, "text", {}) or {})
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _parse_record(raw: str, path: Path) -> dict:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: the {RECORD_CHUNK!r} chunk is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: the {RECORD_CHUNK!r} chunk is not a JSON object")
    return record


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def _parse_line(line: bytes) -> dict | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _repair_tail(path: Path) -> None:
    """Drop an incomplete or garbled last line left by a crash, so appends start clean.

    Only the last non-blank line is looked at (as :func:`read_manifest` tolerates only that one);
    if it parses but lacks its newline, the newline is added instead.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        window = 65536
        while True:
            start = max(0, size - window)
            f.seek(start)
            tail = f.read(size - start)
            content = tail.rstrip()  # ASCII whitespace only: NUL padding stays visible
            newline = content.rfind(b"\n")
            if start > 0 and (not content or newline < 0):
                window *= 4  # the last line is longer than the window: look further back
                continue
            break
        if not content:
            return
        last = content[newline + 1 :]
        if _parse_line(last.strip()) is None:
            f.truncate(start + newline + 1)
        elif not tail.endswith(b"\n"):
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            return
        f.flush()
        os.fsync(f.fileno())


class ManifestWriter:
    """Append-only writer for ``manifest.jsonl``: one JSON object per line, durable per line.

    Use as a context manager. Opening repairs a torn last line left by a crash (see
    :func:`read_manifest`), then appends; each :meth:`write` appends its whole line with one
    ``write`` under an exclusive ``flock`` and fsyncs, so several runs sharing an output folder
    append to one manifest without interleaving. ``exclusive=True`` holds the lock from open to
    close instead (a manifest shard, written by one process, which a merge takes only once it is unlocked).

    Raises:
        StorageError: the storage is full, over quota or read-only (the run stops).
        UsageError: the manifest cannot be opened or written for another reason.
    """

    def __init__(self, path: Path, *, exclusive: bool = False) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        self._fd: int | None = None

    def open(self) -> ManifestWriter:
        """Open for appending (creating parent directories)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open_locked() if self.exclusive else self._open()
            with self._lock():
                _repair_tail(self.path)
        except OSError as e:
            self.close()
            raise storage_error(e, f"cannot open manifest {self.path}", UsageError) from None
        return self

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)

    def _open_locked(self) -> int:
        """Open and lock a shard that is still the one at ``self.path`` (a merge may have taken and
        unlinked the file between the open and the lock: then open a new one)."""
        while True:
            fd = self._open()
            _flock(fd, True)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
            os.close(fd)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self.exclusive or self._fd is None:
            yield
            return
        _flock(self._fd, True)
        try:
            yield
        finally:
            _flock(self._fd, False)

    def write(self, entry: Mapping[str, Any]) -> None:
        """Append one entry as a JSON line, then fsync."""
        if self._fd is None:
            raise RuntimeError("ManifestWriter is not open")
        line = (json.dumps(dict(entry), ensure_ascii=False, sort_keys=True, default=str) + "\n").encode("utf-8")
        try:
            with self._lock():
                size = os.fstat(self._fd).st_size
                try:
                    view = memoryview(line)
                    while view:  # a short write (disk full) goes on with the rest, or fails
                        view = view[os.write(self._fd, view) :]
                    os.fsync(self._fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.truncate(self.path, size)  # no torn line for the next writer to append after
                    raise
        except OSError as e:
            raise storage_error(e, f"cannot write manifest {self.path}", UsageError) from None

    def close(self) -> None:
        """Close the file (idempotent); closing releases any lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ManifestWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flock(fd: int, lock: bool, *, blocking: bool = True) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: appends of one line are not interleaved in practice
        return True
    flags = (fcntl.LOCK_EX if lock else fcntl.LOCK_UN) | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        return False
    return True


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting: False when another holder has it, or when
    this filesystem cannot lock (then nothing can tell a live file from a finished one: leave it)."""
    try:
        return _flock(fd, True, blocking=False)
    except OSError:
        return False


#: Manifest shards: ``.manifest.rankN.HOST-PID.jsonl`` of a distributed run's processes,
#: ``.manifest.shard-K-of-N.HOST-PID.jsonl`` of ``--shard K/N`` runs; folded into ``manifest.jsonl`` by the
#: next run that finds them unlocked (their writers hold them locked while they run).
SHARD_GLOB = ".manifest.*.jsonl"


def read_manifest(path: Path) -> list[dict]:
    """All entries of a manifest, in file order; ``[]`` when the file does not exist.

    A garbled *last* line (a write torn by a crash) is ignored; a garbled earlier line raises.

    Raises:
        UsageError: naming the file and the line number of a garbled line, or when unreadable.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UsageError(f"cannot read manifest {path}: {e.strerror or e}") from None
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(data.split(b"\n"))]
    numbered = [(n, ln) for n, ln in numbered if ln]
    entries: list[dict] = []
    for k, (lineno, line) in enumerate(numbered):
        entry = _parse_line(line)
        if entry is None:
            if k == len(numbered) - 1:
                break
            raise UsageError(
                f"{path}:{lineno}: garbled manifest line (not a JSON object); fix or delete that "
                "line, or delete the manifest to rebuild it from the images"
            )
        entries.append(entry)
    return entries


def latest_status(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """The last entry per ``job_id`` (later lines win); entries without a job id are skipped."""
    latest: dict[str, dict] = {}
    for entry in entries:
        job_id = entry.get("job_id")
        if job_id is not None:
            latest[str(job_id)] = dict(entry)
    return latest
