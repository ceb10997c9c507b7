"""The demo model's synthetic domain: groups of coloured shapes on faintly tinted grey backgrounds.

Every image of a *group* shows the same colour (one of six hues) and the same shape, drawn at a
different position and size on a different grey background (tinted by position: :func:`background`).
A group is what a user hands ``easyref generate``: the model has to pick up the shared colour and
shape from the references, while the prompt says where and how large to draw it ("a small shape at the top left").

Torch-free (PIL + ``random``); every image is a pure function of its seed.
"""

from __future__ import annotations

import colorsys
import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Drawing",
    "IMAGE_SIZE",
    "TINT",
    "background",
    "EXAMPLE_GROUPS",
    "classify_placement",
    "classify_shape",
    "dominant_colour",
    "hue_agreement",
    "iter_drawings",
    "make_group",
    "random_drawing",
    "saturated",
    "shape_mask",
    "write_controls",
    "write_examples",
]

IMAGE_SIZE = 64

#: Colour name → hue in degrees (HSV). The six are 60° apart, so a hue is always within 30° of one.
COLOURS: dict[str, float] = {
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (16, 22), "large": (28, 36)}  # side of the bounding box, in pixels
#: Caption words for the 3×3 grid cell of the shape's centre (row, column).
POSITIONS = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}


@dataclass(frozen=True)
class Drawing:
    """One image of the domain: what is drawn where, and how it is described."""

    colour: str
    shape: str
    size: str
    cell: tuple[int, int]
    rgb: tuple[int, int, int]
    background: int
    centre: tuple[int, int]
    side: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def caption(self, *, colour: bool = True, shape: bool = True) -> str:
        """``"a large red circle at the top left"``; without colour/shape the noun is "shape"."""
        words = ["a", self.size]
        if colour:
            words.append(self.colour)
        words.append(self.shape if shape else "shape")
        return " ".join(words) + " " + self.position

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The shape's bounding box (x0, y0, x1, y1)."""
        cx, cy = self.centre
        h = self.side / 2
        return cx - h, cy - h, cx + h, cy + h

    def render(self) -> Image.Image:
        """The picture: the shape in its colour on the tinted grey :func:`background`."""
        image = background(self.background)
        _draw_shape(ImageDraw.Draw(image), self.shape, self.box, self.rgb)
        return image

    def mask(self) -> Image.Image:
        """The shape's pixels (255) on black, as :meth:`render` draws them; an ``"L"`` image."""
        image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_shape(ImageDraw.Draw(image), self.shape, self.box, 255)
        return image


#: How far the background's red rises from left to right, and its blue from top to bottom (± levels).
TINT = 16


def background(grey: int) -> Image.Image:
    """A ``grey`` background with a faint tint that says where each pixel is: red + TINT·x and
    blue + TINT·y, for x and y from −1 (left, top) to 1 (right, bottom).

    The tint is what lets the demo UNet learn where it is drawing (with a flat grey it ignored the
    prompt's position words; docs/DEMO.md). Saturation stays below every classifier's threshold."""
    return _tinted(grey).copy()


@functools.cache
def _tinted(grey: int) -> Image.Image:
    """:func:`background`, drawn once per grey level (the data sets render thousands of pictures)."""
    ramp = [round(TINT * (2 * i / (IMAGE_SIZE - 1) - 1)) for i in range(IMAGE_SIZE)]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    image.putdata([(grey + dx, grey, grey + dy) for dy in ramp for dx in ramp])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw ``shape`` filling ``box`` (x0, y0, x1, y1); a cross's arms are a third of the box wide."""
    x0, y0, x1, y1 = box
    cx, cy, t = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 6
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def _rgb(hue: float, rng: random.Random) -> tuple[int, int, int]:
    """A saturated, bright shade of ``hue`` (±6° of hue jitter)."""
    h = ((hue + rng.uniform(-6, 6)) % 360) / 360
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def random_drawing(rng: random.Random, colour: str | None = None, shape: str | None = None) -> Drawing:
    """A random image of the domain (of ``colour``/``shape`` when given)."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    size = rng.choice(list(SIZES))
    side = rng.randint(*SIZES[size])
    cell = (rng.randrange(3), rng.randrange(3))
    # the centre lies in the cell's third of the canvas and keeps the shape inside the canvas
    lo, hi = side // 2 + 1, IMAGE_SIZE - side // 2 - 1

    def coordinate(index: int) -> int:
        a, b = max(lo, index * IMAGE_SIZE // 3 + 2), min(hi, (index + 1) * IMAGE_SIZE // 3 - 2)
        return rng.randint(min(a, b), max(a, b))

    centre = (coordinate(cell[1]), coordinate(cell[0]))
    background = rng.randint(90, 190)
    return Drawing(colour, shape, size, cell, _rgb(COLOURS[colour], rng), background, centre, side)


def make_group(seed: int, count: int, colour: str | None = None, shape: str | None = None) -> list[Drawing]:
    """``count`` drawings sharing one colour and one shape (random unless given), from ``seed``."""
    rng = random.Random(f"easyref-demo-group-{seed}")
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    return [random_drawing(rng, colour, shape) for _ in range(count)]


def iter_drawings(seed: int) -> Iterator[Drawing]:
    """An endless seeded stream of random drawings."""
    rng = random.Random(f"easyref-demo-stream-{seed}")
    while True:
        yield random_drawing(rng)


def dominant_colour(image: Image.Image, *, min_saturation: float = 0.35, min_value: float = 0.3) -> str | None:
    """The colour name whose hue holds most of the image's saturated pixels, or ``None`` when
    fewer than 1% of the pixels are saturated (a grey picture has no dominant colour).

    Each saturated pixel votes for the nearest of the six hues; greys (saturation below
    ``min_saturation``) and near-blacks (value below ``min_value``) do not vote.
    """
    hsv = image.convert("RGB").convert("HSV")
    votes = dict.fromkeys(COLOURS, 0)
    names = list(COLOURS)
    s_min, v_min = round(min_saturation * 255), round(min_value * 255)
    for h, s, v in hsv.getdata():
        if s >= s_min and v >= v_min:
            votes[names[round(h * 360 / 255 / 60) % 6]] += 1
    best = max(votes, key=votes.__getitem__)
    total = image.width * image.height
    return best if votes[best] >= 0.01 * total else None


def hue_agreement(images: Sequence[Image.Image], colours: Sequence[str]) -> float:
    """The share of ``images`` whose dominant colour is the matching entry of ``colours``."""
    if len(images) != len(colours) or not images:
        raise ValueError("hue_agreement needs one expected colour per image, and at least one image")
    return sum(dominant_colour(im) == c for im, c in zip(images, colours, strict=True)) / len(images)


def shape_mask(image: Image.Image, colour: str | None = None, *, min_saturation: float = 0.35,
               min_value: float = 0.3):  # fmt: skip
    """The pixels of ``image`` in ``colour`` (default: its :func:`dominant_colour`): saturated, bright
    enough, and nearest that hue — the drawn shape, since backgrounds are grey. A boolean array."""
    import numpy as np

    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.int32)
    colour = colour or dominant_colour(image, min_saturation=min_saturation, min_value=min_value)
    coloured = saturated(image, min_saturation=min_saturation, min_value=min_value)
    if colour is None:
        return np.zeros(coloured.shape, dtype=bool)
    nearest = np.rint(hsv[..., 0] * 360 / 255 / 60).astype(int) % 6
    return coloured & (nearest == list(COLOURS).index(colour))


def saturated(image: Image.Image, *, min_saturation: float = 0.35, min_value: float = 0.3):
    """The pixels :func:`dominant_colour` counts (saturated and bright enough: not the grey background),
    whatever their hue. A boolean array."""
    import numpy as np

    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.int32)
    return (hsv[..., 1] >= round(min_saturation * 255)) & (hsv[..., 2] >= round(min_value * 255))


def _template(shape: str, box: tuple[int, int, int, int]):
    """``shape`` drawn as :meth:`Drawing.render` draws it, stretched to fill ``box`` (x0, y0, x1, y1)."""
    import numpy as np

    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, box, 255)
    return np.asarray(canvas) > 0


def classify_shape(image: Image.Image, colour: str | None = None) -> str | None:
    """Which of :data:`SHAPES` the coloured shape of ``image`` is (its :func:`shape_mask`): the shape whose
    template, stretched to the mask's bounding box, overlaps the mask best (IoU); ``None`` when under 1%
    of the picture is in the colour. A blob gets the nearest shape, usually ``circle``."""
    mask = shape_mask(image, colour)
    if mask.sum() < 0.01 * mask.size:
        return None
    ys, xs = mask.nonzero()
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))

    def iou(shape: str) -> float:
        template = _template(shape, box)
        return float((template & mask).sum() / (template | mask).sum())

    return max(SHAPES, key=iou)


#: Bounding-box sides below this are "small", at or above it "large" (:data:`SIZES` leaves a gap there).
SIZE_THRESHOLD = (SIZES["small"][1] + SIZES["large"][0]) // 2


def classify_placement(image: Image.Image, colour: str | None = None) -> tuple[tuple[int, int], str] | None:
    """Where and how large the coloured shape of ``image`` (its :func:`shape_mask`) is: the 3×3 grid cell
    (row, column) of its bounding box's centre, as :attr:`Drawing.cell` counts, and ``"small"`` or
    ``"large"`` by the box's longer side; ``None`` when under 1% of the picture is in the colour."""
    mask = shape_mask(image, colour)
    if mask.sum() < 0.01 * mask.size:
        return None
    ys, xs = mask.nonzero()
    height, width = mask.shape

    def third(lo: int, hi: int, extent: int) -> int:
        return min(2, int((lo + hi + 1) / 2 * 3 / extent))

    cell = (third(int(ys.min()), int(ys.max()), height), third(int(xs.min()), int(xs.max()), width))
    side = max(int(xs.max() - xs.min()), int(ys.max() - ys.min())) + 1
    return cell, "small" if side < SIZE_THRESHOLD else "large"


#: The example groups shipped in ``examples/groups`` (colour, shape, seed).
EXAMPLE_GROUPS = (("red", "circle", 11), ("blue", "square", 12), ("green", "triangle", 13), ("yellow", "cross", 14))


def write_examples(root, references: int = 3) -> list:
    """Write ``root/<colour>-<shape>/0N.png`` for :data:`EXAMPLE_GROUPS`; returns the folders."""
    from pathlib import Path

    folders = []
    for colour, shape, seed in EXAMPLE_GROUPS:
        folder = Path(root) / f"{colour}-{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, drawing in enumerate(make_group(seed, references, colour, shape)):
            drawing.render().save(folder / f"{i + 1:02d}.png")
        folders.append(folder)
    return folders


def write_controls(root) -> list:
    """Write ``root/<shape>.png``: one large cyan drawing of each of :data:`SHAPES` in the centre, the
    control images of the README's ControlNet example (``--control-preprocess canny`` keeps only the
    outline); returns the files."""
    from pathlib import Path

    Path(root).mkdir(parents=True, exist_ok=True)
    files = []
    for shape in SHAPES:
        rng = random.Random(f"easyref-demo-control-{shape}")
        drawing = random_drawing(rng, "cyan", shape)
        while (drawing.cell, drawing.size) != ((1, 1), "large"):
            drawing = random_drawing(rng, "cyan", shape)
        files.append(Path(root) / f"{shape}.png")
        drawing.render().save(files[-1])
    return files


if __name__ == "__main__":
    import sys
    from pathlib import Path

    examples = Path(sys.argv[1] if len(sys.argv) > 1 else "examples")
    for path in write_examples(examples / "groups") + write_controls(examples / "controls"):
        print(path)
