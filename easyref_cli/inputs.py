"""A job's control, init and mask images: found and checked at planning, loaded for the run. Torch-free.

Each of ``control_image`` (one per ControlNet), ``init_image`` and ``mask`` is a file or a folder.
A file is used by every job of its prompt. A folder makes one job per image in it; folders given
together are paired by file name (stem): the first folder — control images first, then the init
images, then the masks — lists the names, and every other folder must hold an image of each name
(it may hold more). Relative paths are relative to the current folder, wherever they are written.

At planning (:func:`expand_inputs`): every path exists, folders hold images and pair up, a mask is
single-channel (or a grey RGB) and the size of its init image, the settings fit the ControlNets
(:func:`check_control_settings`); each file's sha256 goes into the job id and the record, never its
path, so moving the files changes nothing. A file whose header cannot be read fails its jobs at
generation, naming it (as a broken reference does). At generation (:func:`load_inputs`) each file is
checked against its planned sha256, decoded as references are (EXIF, 16-bit, alpha), stretched to the
job's size (Lanczos, as diffusers' image processor does), and a control image then goes through its
preprocessor (so Canny's edges are as thin as the ControlNet reads them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from easyref_cli import files
from easyref_cli.errors import InputError, UsageError
from easyref_cli.identity import FileHashes
from easyref_cli.settings import PER_NET_KEYS, GenerationSettings, per_net

#: PIL modes a mask may have without looking at its pixels (single-channel).
_SINGLE_CHANNEL = frozenset({"1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass(frozen=True)
class JobInputs:
    """The input images of one job (files, never folders) and their sha256 (``None``: unreadable).

    ``name`` is the paired file name (stem) when a folder was given: the ``{input}`` of output names.
    """

    name: str | None = None
    control: tuple[Path, ...] = ()
    init: Path | None = None
    mask: Path | None = None
    control_sha256: tuple[str | None, ...] = ()
    init_sha256: str | None = None
    mask_sha256: str | None = None

    def mode(self) -> tuple[int, bool, bool]:
        """What the pipeline call is: (how many control images, an init image, a mask)."""
        return len(self.control), self.init is not None, self.mask is not None

    def identity(self) -> dict[str, Any]:
        """What the job id hashes: the content of each input (never a path) and the paired name (which
        names the output, as the group and prompt id do)."""
        out: dict[str, Any] = {} if self.name is None else {"name": self.name}
        if self.control:
            out["control"] = list(self.control_sha256)
        if self.init is not None:
            out["init"] = self.init_sha256
        if self.mask is not None:
            out["mask"] = self.mask_sha256
        return out

    def record(self) -> dict[str, Any]:
        """The record's ``inputs``: each file's absolute path and sha256, and the paired name."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.control:
            out["control"] = [_entry(p, d) for p, d in zip(self.control, self.control_sha256, strict=True)]
        if self.init is not None:
            out["init"] = _entry(self.init, self.init_sha256)
        if self.mask is not None:
            out["mask"] = _entry(self.mask, self.mask_sha256)
        return out

    def files(self) -> list[tuple[str, Path, str | None]]:
        """``(what, path, sha256)`` of every input file: ``control image 1``, ``init image``, ``mask``."""
        out = [(f"control image {i + 1}" if len(self.control) > 1 else "control image", p, d)
               for i, (p, d) in enumerate(zip(self.control, self.control_sha256, strict=True))]  # fmt: skip
        if self.init is not None:
            out.append(("init image", self.init, self.init_sha256))
        if self.mask is not None:
            out.append(("mask", self.mask, self.mask_sha256))
        return out


def _entry(path: Path, digest: str | None) -> dict[str, Any]:
    return {"path": str(Path(path).resolve()), "sha256": digest}


def uses_inputs(settings: GenerationSettings) -> bool:
    return bool(settings.control_image) or settings.init_image is not None or settings.mask is not None


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def check_control_settings(settings: GenerationSettings, controlnets: int, where: str) -> None:
    """The settings of a job with inputs fit the run: as many control images as ControlNets, one or that
    many scales/windows/preprocessors, each window start < end, a mask only with an init image, and
    the noise of ``seed_mode: cpu`` for image-to-image.

    Raises:
        UsageError: naming ``where`` (the prompt) and the key.
    """
    given = len(settings.control_image)
    if given and not controlnets:
        raise UsageError(f"{where}: control_image given but no ControlNet: pass --controlnet MODEL (or controlnets:)")
    if given and given != controlnets:
        raise UsageError(f"{where}: {controlnets} ControlNet(s) need {controlnets} control image(s), got {given}")
    if given:
        for key in PER_NET_KEYS:
            count = len(getattr(settings, key))
            if count not in (1, controlnets):
                raise UsageError(
                    f"{where}: {key} has {count} values for {controlnets} ControlNets: give one for all, or one each"
                )
        starts, ends = per_net(settings.control_start, given), per_net(settings.control_end, given)
        for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
            if start >= end:
                raise UsageError(
                    f"{where}: ControlNet {i + 1} starts at {start} but ends at {end}: start must be < end"
                )
    if settings.init_image is not None and int(settings.steps * settings.strength) < 1:
        raise UsageError(
            f"{where}: strength {settings.strength} of {settings.steps} steps denoises no step "
            "(image-to-image runs int(steps × strength) steps): raise steps or strength"
        )
    if given and settings.guidance_rescale and settings.mask is None:
        raise UsageError(
            f"{where}: guidance_rescale is not available with a ControlNet (diffusers' ControlNet text-to-image and "
            "image-to-image pipelines have none); leave it 0"
        )
    if settings.mask is not None and settings.init_image is None:
        raise UsageError(f"{where}: mask given without init_image: inpainting repaints the masked part of --init-image")
    if settings.init_image is not None and settings.seed_mode == "official":
        raise UsageError(
            f"{where}: seed_mode official replays text-to-image and ControlNet calls only; "
            "image-to-image and inpainting use seed_mode cpu"
        )


def digest(hashes: FileHashes, path: Path) -> str | None:
    """An input file's sha256 (each file read once per plan), ``None`` when it cannot be read: its jobs
    fail at generation, naming it."""
    try:
        return hashes.sha256(path)
    except InputError:
        return None


def _sources(settings: GenerationSettings) -> list[tuple[str, int | None, str]]:
    """``(key, ControlNet index or None, value)`` of every input image setting given, in pairing order."""
    out: list[tuple[str, int | None, str]] = [("control_image", i, v) for i, v in enumerate(settings.control_image)]
    out += [(k, None, getattr(settings, k)) for k in ("init_image", "mask") if getattr(settings, k) is not None]
    return out


def _listing(key: str, value: str, where: str) -> Path | dict[str, Path]:
    """A file, or a folder's images by stem."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"{where}: {key} {value}: no such file or folder")
    images = files.list_images(path)
    if not images:
        raise UsageError(f"{where}: {key} {value}: the folder holds no images")
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise UsageError(
                f"{where}: {key} {value}: {by_stem[image.stem].name} and {image.name} have the same name; "
                "folders are paired by file name, so each name may appear once"
            )
        by_stem[image.stem] = image
    return by_stem


def expand_inputs(
    settings: GenerationSettings, where: str, hashes: FileHashes
) -> list[tuple[JobInputs | None, GenerationSettings]]:
    """The jobs' inputs for one prompt's ``settings``: ``[(None, settings)]`` without input images,
    else one ``(JobInputs, settings naming its files)`` per paired name (one, without folders).

    Raises:
        UsageError: a missing path, an empty folder, a name missing from a folder, a bad mask.
    """
    sources = _sources(settings)
    if not sources:
        return [(None, settings)]
    listings = [(key, index, value, _listing(key, value, where)) for key, index, value in sources]
    folders = [(key, value, listing) for key, _, value, listing in listings if isinstance(listing, dict)]
    names: list[str | None] = list(folders[0][2]) if folders else [None]
    for key, value, listing in folders[1:]:
        missing = [n for n in names if n not in listing]
        if missing:
            first_key, first_value = folders[0][0], folders[0][1]
            raise UsageError(
                f"{where}: {key} folder {value} has no image named {missing[0]!r} (for {first_key} "
                f"{first_value}/{missing[0]}.*); folders given together are paired by file name"
                + (f" ({len(missing)} names missing)" if len(missing) > 1 else "")
            )
    out = []
    for name in names:
        chosen = {(k, i): (lst if isinstance(lst, Path) else lst[name]) for k, i, _, lst in listings}
        out.append(_job_inputs(settings, name, chosen, where, hashes))
    return out


def _job_inputs(
    settings: GenerationSettings, name: str | None, chosen: Mapping[tuple[str, int | None], Path], where: str,
    hashes: FileHashes,
) -> tuple[JobInputs, GenerationSettings]:  # fmt: skip
    control = tuple(chosen[("control_image", i)] for i in range(len(settings.control_image)))
    init, mask = chosen.get(("init_image", None)), chosen.get(("mask", None))
    if mask is not None:
        check_mask(mask, init, where, upright=settings.exif_orientation == "apply")
    inputs = JobInputs(
        name=name, control=control, init=init, mask=mask, control_sha256=tuple(digest(hashes, p) for p in control),
        init_sha256=None if init is None else digest(hashes, init), mask_sha256=None if mask is None else digest(hashes, mask),
    )  # fmt: skip
    named = replace(
        settings, control_image=tuple(str(p) for p in control), init_image=None if init is None else str(init),
        mask=None if mask is None else str(mask),
    )  # fmt: skip
    return inputs, named


def _upright_size(im, upright: bool) -> tuple[int, int]:
    """An open image's size as loaded: a quarter-turn EXIF orientation swaps it when ``upright``."""
    width, height = im.size
    if upright and im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
        return height, width
    return width, height


#: the EXIF tag of the orientation
_ORIENTATION = 0x0112


def _read_mask(path: Path, upright: bool) -> tuple[str, tuple[int, int], bool, bool] | None:
    """``(mode, size as loaded, transparent, coloured)`` of a mask, the file opened once and its pixels
    decoded only when its mode cannot say (not single-channel, or a transparency key); ``None`` when it
    cannot be read (its jobs fail at generation, naming it)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, size = im.mode, _upright_size(im, upright)
            if mode in _SINGLE_CHANNEL and "transparency" not in im.info:
                return mode, size, False, False
            rgba = np.asarray(im.convert("RGBA"))
    except Exception:  # noqa: BLE001 - any unreadable file: its job fails later, naming it
        return None
    transparent = bool((rgba[..., 3] != 255).any())
    coloured = not bool((rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 1] == rgba[..., 2]).all())
    return mode, size, transparent, coloured


def _size(path: Path, upright: bool) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _upright_size(im, upright)
    except Exception:  # noqa: BLE001 - unreadable: its jobs fail at generation, naming it
        return None


def check_mask(mask: Path, init: Path | None, where: str, *, upright: bool = True) -> None:
    """A mask is single-channel — a greyscale mode, or RGB/RGBA/P whose colour channels are equal — opaque,
    and the size of its init image, both as loaded (EXIF orientation applied when ``upright``).

    Raises:
        UsageError: naming the mask (and the init image).
    """
    read = _read_mask(mask, upright)
    if read is None:
        return
    mode, size, transparent, coloured = read
    if transparent:
        raise UsageError(
            f"{where}: mask {mask} has transparency, which a mask cannot use (its alpha is dropped): save white "
            "where to repaint and black where to keep, without an alpha channel"
        )
    if coloured:
        raise UsageError(
            f"{where}: mask {mask} is not single-channel ({mode} with colour): save it as a greyscale "
            "image, white where to repaint and black where to keep"
        )
    init_size = _size(init, upright) if init is not None else None
    if init_size is not None and init_size != size:
        raise UsageError(
            f"{where}: mask {mask} is {size[0]}×{size[1]} but its init image {init} is "
            f"{init_size[0]}×{init_size[1]}: a mask must have its init image's size"
        )


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def load_inputs(inputs: JobInputs, settings: GenerationSettings) -> dict[str, Any]:
    """The pipeline request's images for a job, each stretched to ``width×height`` (Lanczos):
    ``control_images`` (then each through its preprocessor, so Canny sees the size the ControlNet
    reads), ``init_image`` (RGB) and ``mask_image`` (L; as loaded, it must have the init image's size).
    A prepared image is kept for the next jobs that use it (a control image serves every prompt and seed).

    Raises:
        InputError: naming the file: unreadable, not an image, changed since planning, a mask whose
            size (EXIF orientation applied) is not its init image's.
    """
    upright = settings.exif_orientation == "apply"
    size = (settings.width, settings.height)
    steps = per_net(settings.control_preprocess, len(inputs.control)) if inputs.control else ()
    out: dict[str, Any] = {"control_images": tuple(
        _prepared(what, path, digest, size, upright, step)[1]
        for (what, path, digest), step in zip(inputs.files(), steps, strict=False)
    )}  # fmt: skip
    if inputs.init is not None:
        init_size, out["init_image"] = _prepared("init image", inputs.init, inputs.init_sha256, size, upright, "RGB")
    if inputs.mask is not None:
        mask_size, out["mask_image"] = _prepared("mask", inputs.mask, inputs.mask_sha256, size, upright, "L")
        if mask_size != init_size:
            raise InputError(
                f"mask {inputs.mask} is {mask_size[0]}×{mask_size[1]} but its init image {inputs.init} is "
                f"{init_size[0]}×{init_size[1]} (EXIF orientation applied): a mask must have its init image's size"
            )
    return out


#: prepared input images, most recent last: ``(path, sha256, size, upright, step) → (size as loaded, image)``
_PREPARED: OrderedDict[tuple, tuple[tuple[int, int], Any]] = OrderedDict()
_PREPARED_MAX = 16


def _prepared(what: str, path: Path, digest: str | None, size: tuple[int, int], upright: bool, step: str):
    """``(size as loaded, image)``: the file checked against its planned sha256, decoded as references
    are, stretched to ``size``, then ``step`` (``RGB``, ``L``, or a control preprocessor)."""
    from PIL import Image

    from easyref_cli.preprocess import preprocess_control

    key = (str(path), digest, size, upright, step)
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    if digest is None or files.sha256_file(path) != digest:
        raise InputError(f"{what} {path} cannot be read or has changed since the run was planned")
    image = files.load_image(path, exif_orientation=upright, what=what)
    loaded = image.size
    if image.size != size:
        image = image.resize(size, resample=Image.Resampling.LANCZOS)  # diffusers' resize
    if step == "L":
        image = image.convert("L")
    elif step != "RGB":
        image = preprocess_control(image, step)
    _PREPARED[key] = (loaded, image)
    while len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)
    return _PREPARED[key]


def describe(inputs: JobInputs | None) -> str:
    """A short dry-run label: ``control=pose.png init=photo.jpg mask=photo.png``."""
    if inputs is None:
        return ""
    parts = [f"control={','.join(p.name for p in inputs.control)}"] if inputs.control else []
    parts += [f"{k}={p.name}" for k, p in (("init", inputs.init), ("mask", inputs.mask)) if p is not None]
    return " " + " ".join(parts)
