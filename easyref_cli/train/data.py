"""Training data: the official JSON format, up-front validation, and per-sample preparation.

The data file is a JSON list of items, as read by the official ``finetune_sdxl.py``::

    [{"image_file": ["a/1.png", "a/2.png"], "text": ["caption", "another"], "target": "a/3.png"},
     {"image_file": "b/1.png", "text": "a caption"},                       # its own reference
     {"target": "c/1.jpg", "text": ["a face"], "face": [[x1, y1, x2, y2]]}]  # face variant

* ``image_file``: the reference images (one path or a list); ``target``: the image to denoise. An
  item without ``target`` and with exactly one ``image_file`` uses that image as both.
* ``text``: one caption or a list (one is sampled per use; an empty list means no caption).
* ``face``: boxes on the target; the reference is a square crop around the first box, randomly
  expanded by up to 50% and flipped horizontally with probability ½ (the official face variant).
* ``mask`` (optional, not in the official format): a greyscale image the size of the target; with
  ``easyref train --mask-weight W`` the loss at each latent pixel is weighted ``1 + W·m``, ``m`` the
  mask's mean (0–1) over that pixel. The mask is resized and cropped as the target is.

Paths are relative to ``--data-root``. :func:`validate_data` checks every file before training and
lists *all* problems (missing, not an image, truncated with ``decode=True``).

Per sample (:class:`TrainDataset`), as the official dataset does: caption sampled; references
shuffled, capped at ``max_references`` and, with probability ``truncate_rate``, cut to a random
count in ``[2, n-1]``; condition dropping (5% image → one black 512² reference, 5% text → empty
caption, 5% both); target resized (short side) and centre-cropped to ``resolution`` (a single
reference gets the same resize and crop, so an image that is its own reference stays aligned), or
with ``resize="aspect"`` resized keeping its aspect ratio to about ``resolution²`` pixels with sides
rounded up to multiples of 64. The MLLM prompt is DESIGN §2 rule 1 with the sampled caption.

Every random choice comes from a generator seeded by ``(seed, epoch, index)``, so a sample is the
same whether the run was resumed or not, and whatever the number of data-loader workers.

Torch-free at import (``easyref train --check-data`` stays light); torch is imported where tensors are made.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from easyref_cli.constants import INSTRUCTION, UNCOND_IMAGE_SIZE
from easyref_cli.errors import UsageError

#: Stride of the aspect-preserving resize (SDXL latents need sides divisible by 64 px here).
ASPECT_STRIDE = 64
#: Maximum random expansion of a face box, in percent (the official ``max_expanding_percent``).
FACE_MAX_EXPAND_PERCENT = 50


# --------------------------------------------------------------------------------------------
# Reading the JSON
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainItem:
    """One entry of the data file, normalised."""

    index: int
    target: str
    references: tuple[str, ...]  # empty for face items: their reference is cut from the target
    texts: tuple[str, ...]
    face: tuple[float, float, float, float] | None = None
    mask: str | None = None  # the target's loss mask (--mask-weight)

    @property
    def files(self) -> tuple[str, ...]:
        return (self.target, *self.references, *((self.mask,) if self.mask else ()))


def read_items(path: Path) -> list[TrainItem]:
    """Parse the data file; raise :class:`UsageError` listing every malformed item."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--data {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --data {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--data {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise UsageError(f"--data {path} must hold a JSON list of items, not a {type(raw).__name__}")
    if not raw:
        raise UsageError(f"--data {path} holds no items")
    items: list[TrainItem] = []
    problems: list[str] = []
    for index, entry in enumerate(raw):
        try:
            items.append(_parse_item(index, entry))
        except ValueError as exc:
            problems.append(f"item {index}: {exc}")
    if problems:
        raise UsageError(f"{path}: {len(problems)} malformed item(s):\n  " + "\n  ".join(problems))
    return items


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"'{key}' must be a string or a list of strings")


def _parse_item(index: int, entry: Any) -> TrainItem:
    if not isinstance(entry, dict):
        raise ValueError(f"must be an object, not {type(entry).__name__}")
    if "text" not in entry:
        raise ValueError("has no 'text' (use \"\" or [] for no caption)")
    texts = _str_list(entry["text"], "text")
    refs = _str_list(entry["image_file"], "image_file") if "image_file" in entry else ()
    if any(not r for r in refs):
        raise ValueError("'image_file' has an empty path")
    target = entry.get("target")
    if target is not None and (not isinstance(target, str) or not target):
        raise ValueError("'target' must be a non-empty string")
    mask = entry.get("mask")
    if mask is not None and (not isinstance(mask, str) or not mask):
        raise ValueError("'mask' must be a non-empty string (a greyscale image the size of the target)")
    face = None
    if "face" in entry:
        face = _parse_face(entry["face"])
        if target is None:
            raise ValueError("a 'face' item needs a 'target' (the crop is cut from it)")
        refs = ()  # the official face variant never reads image_file
    elif target is None:
        if len(refs) != 1:
            raise ValueError("has no 'target'; that is only allowed with exactly one 'image_file' (its own reference)")
        target = refs[0]
    elif not refs:
        raise ValueError("has no 'image_file' references")
    return TrainItem(index=index, target=target, references=refs, texts=texts, face=face, mask=mask)


def _parse_face(value: Any) -> tuple[float, float, float, float]:
    """The first box: ``[x1, y1, x2, y2, ...]``. Extra numbers (a detector's score, as in the official
    README's example) are ignored; coordinates may be negative or past the image (a face at the edge:
    the expansion shifts the crop back inside)."""
    boxes = value if isinstance(value, list) else None
    box = boxes[0] if boxes else None
    if (
        not isinstance(box, list)
        or len(box) < 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError("'face' must be a list of [x1, y1, x2, y2] boxes (extra numbers such as a score are ignored)")
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise ValueError(f"'face' box {box} is empty (need x1 + 2 ≤ x2 and y1 + 2 ≤ y2)")
    return x1, y1, x2, y2


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataReport:
    """What :func:`validate_data` found (``problems`` is empty when the data is usable)."""

    items: list[TrainItem]
    files: int
    problems: list[str]
    multi_reference_items: int
    face_items: int


def _check_file(path: Path, decode: bool) -> str | None:
    """``None`` when ``path`` is a usable image, else the reason it is not."""
    from easyref_cli import files
    from easyref_cli.errors import InputError

    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a file"
    if decode:
        try:
            files.load_image(path)
        except InputError as exc:
            return str(exc).partition(f"{path}: ")[2] or str(exc)
        return None
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        return f"not a readable image: {exc}" if str(exc) else f"not a readable image ({type(exc).__name__})"
    return None


def validate_data(data: Path, data_root: Path, *, decode: bool = False, workers: int = 8) -> DataReport:
    """Read the data file and check every file it names, listing all problems.

    ``decode=False`` opens each image and verifies its structure (fast); ``decode=True`` decodes
    every pixel as training will (catches truncated files; slower). Raises :class:`UsageError` for a
    malformed file or root; returns a report whose ``problems`` the caller turns into an error.
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UsageError(f"--data-root {data_root} is not a directory")
    items = read_items(data)
    users: dict[str, list[int]] = {}
    for item in items:
        for name in dict.fromkeys(item.files):
            users.setdefault(name, []).append(item.index)
    names = list(users)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(lambda n: _check_file(data_root / n, decode), names))
    problems = []
    for name, reason in zip(names, reasons, strict=True):
        if reason is not None:
            where = users[name]
            shown = ", ".join(map(str, where[:5])) + (f" … {len(where) - 5} more" if len(where) > 5 else "")
            problems.append(f"{data_root / name}: {reason} (item{'s' if len(where) > 1 else ''} {shown})")
    if not problems:
        problems = [p for item in items if item.mask and (p := _mask_size_problem(item, data_root))]
    return DataReport(
        items=items,
        files=len(names),
        problems=problems,
        multi_reference_items=sum(1 for i in items if len(i.references) > 1),
        face_items=sum(1 for i in items if i.face is not None),
    )


def _oriented_size(path: Path) -> tuple[int, int]:
    """An image's size after its EXIF orientation (as :func:`easyref_cli.files.load_image` returns it)."""
    with Image.open(path) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def _mask_size_problem(item: TrainItem, data_root: Path) -> str | None:
    """Why ``item``'s loss mask cannot be laid on its target (``None``: it can)."""
    mask, target = _oriented_size(data_root / item.mask), _oriented_size(data_root / item.target)
    if mask == target:
        return None
    return (
        f"{data_root / item.mask}: loss mask is {mask[0]}×{mask[1]}, its target {item.target} is "
        f"{target[0]}×{target[1]} (item {item.index})"
    )


def require_masks(items: Sequence[TrainItem], data: Path) -> None:
    """:class:`UsageError` (exit 2) listing the items without a ``mask`` (``--mask-weight`` needs one each)."""
    missing = [item.index for item in items if not item.mask]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f" … {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UsageError(
            f"{data}: --mask-weight weights the loss by each item's 'mask', but {len(missing)} of {len(items)} "
            f"items have none (items {shown})"
        )


def require_valid(report: DataReport, data: Path) -> list[TrainItem]:
    """The items of a clean report; :class:`UsageError` (exit 2) listing every problem otherwise."""
    if report.problems:
        raise UsageError(
            f"{data}: {len(report.problems)} of {report.files} files cannot be used:\n  "
            + "\n  ".join(report.problems)
            + "\nfix or remove these items (easyref train --check-data re-checks without training)"
        )
    return report.items


# --------------------------------------------------------------------------------------------
# Per-sample random choices (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplePlan:
    """The random choices for one use of an item."""

    caption: str
    references: tuple[str, ...]  # in the order the MLLM sees them
    drop_image: bool
    drop_text: bool
    face_expand_percent: int = 0
    face_flip: bool = False


def plan_sample(
    item: TrainItem,
    rng: random.Random,
    *,
    truncate_rate: float = 0.0,
    max_references: int = 28,
    image_drop_rate: float = 0.05,
    text_drop_rate: float = 0.05,
    both_drop_rate: float = 0.05,
) -> SamplePlan:
    """Caption choice, face augmentation, shuffle/cap/truncation and condition dropping, in the official order."""
    caption = item.texts[rng.randrange(len(item.texts))] if item.texts else ""
    expand, flip = 0, False
    if item.face is not None:
        expand = rng.randrange(0, FACE_MAX_EXPAND_PERCENT)
        flip = rng.random() < 0.5
    refs = list(item.references)
    rng.shuffle(refs)
    refs = refs[:max_references]
    if rng.random() < truncate_rate and len(refs) > 2:
        refs = refs[: rng.randrange(2, len(refs))]  # keeps 2 … n-1, as the official randint(2, n)
    drop_image = drop_text = False
    r = rng.random()
    if r < image_drop_rate:
        drop_image = True
    elif r < image_drop_rate + text_drop_rate:
        drop_text = True
    elif r < image_drop_rate + text_drop_rate + both_drop_rate:
        drop_image = drop_text = True
    return SamplePlan(
        caption="" if drop_text else caption,
        references=tuple(refs),
        drop_image=drop_image,
        drop_text=drop_text,
        face_expand_percent=expand,
        face_flip=flip,
    )


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample: depends only on the run seed, the epoch and the item index."""
    return random.Random(f"easyref-train:{seed}:{epoch}:{index}")


# --------------------------------------------------------------------------------------------
# Image operations (PIL, as the official code)
# --------------------------------------------------------------------------------------------


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """``torchvision.transforms.Resize(size)`` on a PIL image: short side → ``size`` (bilinear)."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)


def center_crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of a centred ``size``² crop."""
    return (height - size) // 2, (width - size) // 2


def crop(image: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    """Crop like ``torchvision.transforms.functional.crop``: areas outside the image are black."""
    return image.crop((left, top, left + width, top + height))


def adaptive_resize(image: Image.Image, size: int, stride: int = ASPECT_STRIDE) -> Image.Image:
    """The official ``adaptive_resize``: about ``size²`` pixels, aspect kept, sides rounded up to ``stride``."""
    w, h = image.size
    times = math.sqrt(h * w / (size**2))
    if w == h:
        w, h = size, size
    elif times > 1.1 or times < 0.8:
        w, h = math.ceil(w / times), math.ceil(h / times)
    new_w, new_h = stride * math.ceil(w / stride), stride * math.ceil(h / stride)
    if (new_w, new_h) == image.size:
        return image
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def square_box(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    """The official ``make_square_region``: a square on the box centre with the longer side."""
    cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
    w, h = int(x2 - x1 + 1) // 2 * 2, int(y2 - y1 + 1) // 2 * 2
    d = max(w, h)
    return cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2


def expand_box(
    box: tuple[float, float, float, float], width: int, height: int, percent: int
) -> tuple[float, float, float, float]:
    """The official ``random_expand`` with a given expansion: grow each side, then shift back inside the image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    ratio = min(percent / 100, (width / w - 1) / 2, (height / h - 1) / 2)
    x1, y1, x2, y2 = x1 - int(ratio * w), y1 - int(ratio * h), x2 + int(ratio * w), y2 + int(ratio * h)
    shift_x = -x1 if x1 < 0 else (width - x2 - 1 if x2 > width else 0)
    shift_y = -y1 if y1 < 0 else (height - y2 - 1 if y2 > height else 0)
    return x1 + shift_x, y1 + shift_y, x2 + shift_x, y2 + shift_y


def face_reference(
    image: Image.Image, face: tuple[float, float, float, float], percent: int, flip: bool
) -> Image.Image:
    """The face variant's reference: square crop around the box, expanded by ``percent``, maybe mirrored."""
    x1, y1, x2, y2 = expand_box(square_box(*face), image.width, image.height, percent)
    out = image.crop(tuple(round(v) for v in (x1, y1, x2, y2)))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def black_reference() -> Image.Image:
    """The dropped-image reference: one black 512² image (DESIGN §2 rule 6)."""
    return Image.new("RGB", (UNCOND_IMAGE_SIZE, UNCOND_IMAGE_SIZE))


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class MllmPreprocessor:
    """Tokenizer + Qwen2-VL image processor: the MLLM inputs for one sample, exactly as the encoder builds them.

    Delegates to :meth:`ReferenceEncoder.prepare_images` and :meth:`ReferenceEncoder.tokenize`
    (which only use these two objects), so training sees DESIGN §2 rules 1–2 exactly as inference
    does. Picklable, so data-loader workers can run it.
    """

    def __init__(self, tokenizer, image_processor, instruction: str = INSTRUCTION):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.instruction = instruction

    @classmethod
    def from_encoder(cls, encoder, instruction: str = INSTRUCTION) -> MllmPreprocessor:
        return cls(encoder.tokenizer, encoder.image_processor, instruction)

    def __call__(self, images: Sequence[Image.Image], caption: str):
        from easyref_cli.model.encoder import ReferenceEncoder

        batch = ReferenceEncoder.prepare_images(self, images)
        input_ids = ReferenceEncoder.tokenize(self, batch.token_counts, caption, self.instruction)
        return input_ids, batch


class TrainDataset:
    """Map-style dataset of prepared samples (see the module docstring); call :meth:`set_epoch` per epoch."""

    def __init__(
        self,
        items: Sequence[TrainItem],
        data_root: Path,
        *,
        mllm: Callable,
        clip_tokenizers: Sequence,
        resolution: int = 1024,
        resize: str = "crop",
        seed: int = 0,
        truncate_rate: float = 0.0,
        max_references: int = 28,
        image_drop_rate: float = 0.05,
        text_drop_rate: float = 0.05,
        both_drop_rate: float = 0.05,
        masks: bool = False,
    ):
        self.items = list(items)
        self.masks = masks  # load each item's loss mask (``loss_mask`` in the sample)
        self.data_root = Path(data_root)
        self.mllm = mllm
        self.clip_tokenizers = list(clip_tokenizers)
        self.resolution = resolution
        self.resize = resize
        self.seed = seed
        self.epoch = 0
        self.plan_kwargs = {
            "truncate_rate": truncate_rate,
            "max_references": max_references,
            "image_drop_rate": image_drop_rate,
            "text_drop_rate": text_drop_rate,
            "both_drop_rate": both_drop_rate,
        }

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def plan(self, index: int) -> SamplePlan:
        return plan_sample(self.items[index], sample_rng(self.seed, self.epoch, index), **self.plan_kwargs)

    def _load(self, name: str) -> Image.Image:
        from easyref_cli import files

        return files.load_image(self.data_root / name)  # InputError names the file

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch

        item = self.items[index]
        plan = self.plan(index)
        raw = self._load(item.target)

        # references (before the target is resized: the face crop is cut from the original image)
        if plan.drop_image:
            refs = [black_reference()]
        elif item.face is not None:
            refs = [face_reference(raw, item.face, plan.face_expand_percent, plan.face_flip)]
        else:
            refs = [self._load(name) for name in plan.references]

        # target: resize + centre crop (official --random_crop), or aspect-preserving resize
        target, top, left = self._fit(raw)
        original_size = (raw.height, raw.width) if self.resize == "crop" else (target.height, target.width)
        target_size = (target.height, target.width)  # the official code reads it after adaptive_resize
        if self.resize == "crop" and len(refs) == 1 and not plan.drop_image and item.face is None:
            # a single reference gets the target's resize and crop (official), so an image that is its
            # own reference shows the model exactly the region it must reproduce
            refs[0] = crop(resize_short_side(refs[0], self.resolution), top, left, *target_size)
        pixels = np.asarray(target, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        extra = {"loss_mask": self._loss_mask(item, raw.size)} if self.masks else {}

        input_ids, image_batch = self.mllm(refs, plan.caption)
        clip_ids = [
            tok(
                plan.caption,
                max_length=tok.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tok in self.clip_tokenizers
        ]
        return {
            "index": index,
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)),
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor((top, left)),
            "target_size": torch.tensor(target_size),
            "clip_ids": clip_ids,
            "mllm_input_ids": input_ids,
            "ref_pixel_values": image_batch.pixel_values,
            "ref_grid_thw": image_batch.grid_thw,
            "ref_tokens": sum(image_batch.token_counts),
            "caption": plan.caption,
            "drop_image": plan.drop_image,
            "num_references": len(refs),
            **extra,
        }

    def _fit(self, image: Image.Image) -> tuple[Image.Image, int, int]:
        """The target's geometry: short side resized and centre-cropped to ``resolution`` (``crop``), or
        the aspect-preserving resize; returns the image and the crop's ``(top, left)``."""
        size = self.resolution
        if self.resize != "crop":
            return adaptive_resize(image, size), 0, 0
        resized = resize_short_side(image, size)
        top, left = center_crop_offsets(resized.width, resized.height, size)
        return crop(resized, top, left, size, size), top, left

    def _loss_mask(self, item: TrainItem, size: tuple[int, int]):
        """The item's loss mask (0–1, shape ``1×H×W``) with the target's resize and crop."""
        import numpy as np
        import torch

        from easyref_cli import files
        from easyref_cli.errors import InputError

        if item.mask is None:
            raise InputError(f"item {item.index} has no 'mask' (--mask-weight needs one per item)")
        path = self.data_root / item.mask
        mask = files.load_image(path, what="loss mask").convert("L")
        if mask.size != size:
            raise InputError(
                f"loss mask {path} is {mask.width}×{mask.height}, its target {self.data_root / item.target} "
                f"{size[0]}×{size[1]}"
            )
        values = np.asarray(self._fit(mask)[0], dtype=np.float32)[None] / 255.0
        return torch.from_numpy(np.ascontiguousarray(values))


def collate(samples: Sequence[dict]) -> dict:
    """Stack a batch. MLLM prompts keep their own lengths (no padding: each runs as it would at inference)."""
    import torch

    return {
        "index": torch.tensor([s["index"] for s in samples]),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "time_ids": torch.cat(
            [
                torch.stack([s["original_size"] for s in samples]),
                torch.stack([s["crop_top_left"] for s in samples]),
                torch.stack([s["target_size"] for s in samples]),
            ],
            dim=1,
        ),
        "clip_ids": [torch.cat([s["clip_ids"][i] for s in samples]) for i in range(len(samples[0]["clip_ids"]))],
        "mllm": {
            "input_ids": [s["mllm_input_ids"] for s in samples],
            "pixel_values": torch.cat([s["ref_pixel_values"] for s in samples]),
            "grid_thw": torch.cat([s["ref_grid_thw"] for s in samples]),
            "image_tokens": [int(s["ref_tokens"]) for s in samples],
        },
        "captions": [s["caption"] for s in samples],
        "drop_image": torch.tensor([bool(s["drop_image"]) for s in samples]),
        "num_references": [s["num_references"] for s in samples],
        **({"loss_mask": torch.stack([s["loss_mask"] for s in samples])} if "loss_mask" in samples[0] else {}),
    }
