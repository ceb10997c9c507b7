"""Test fixtures only (deterministic reference images); never imported by product code.

The tiny-model builders that ``--model tiny`` also uses are in :mod:`easyref_cli.tiny`.
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["make_reference_images", "tiny_cli_args"]


def make_reference_images(directory: Path, n: int = 3, size: tuple[int, int] = (64, 64), seed: int = 0) -> list[Path]:
    """Write ``n`` deterministic PNGs ``ref_00.png``, ``ref_01.png``… into ``directory``.

    Each is a grey background with a few coloured ellipses and rectangles. The colours come from
    one palette per ``seed``, so the images share a "style" and differ in layout, like a
    reference group. ``size`` is (width, height).
    """
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = size
    group_rng = random.Random(seed)
    palette = [tuple(group_rng.randint(0, 255) for _ in range(3)) for _ in range(4)]
    paths = []
    for index in range(n):
        rng = random.Random(seed * 7919 + index + 1)
        grey = rng.randint(96, 176)
        image = Image.new("RGB", (width, height), (grey, grey, grey))
        draw = ImageDraw.Draw(image)
        for shape in range(rng.randint(2, 4)):
            x0 = rng.randrange(0, max(1, width * 2 // 3))
            y0 = rng.randrange(0, max(1, height * 2 // 3))
            x1 = min(width - 1, x0 + rng.randint(max(2, width // 6), max(3, width // 2)))
            y1 = min(height - 1, y0 + rng.randint(max(2, height // 6), max(3, height // 2)))
            colour = rng.choice(palette)
            outline = tuple(c // 2 for c in colour)
            if shape % 2 == 0:
                draw.ellipse((x0, y0, x1, y1), fill=colour, outline=outline)
            else:
                draw.rectangle((x0, y0, x1, y1), fill=colour, outline=outline)
        path = directory / f"ref_{index:02d}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths


def tiny_cli_args(
    tiny=None, *, base_model=None, mllm=None, adapter=None, steps: int = 2, batch_size: int | None = 1
) -> list[str]:
    """``easyref generate`` flags for a 64² CPU run of the tiny models (``tiny``, or the paths given).

    ``batch_size=1`` by default: runs compared byte for byte must batch alike (``auto`` batches as it
    goes); ``None`` leaves ``--batch-size`` out.
    """
    models = {
        "--base-model": base_model or tiny.base_model,
        "--mllm": mllm or tiny.mllm,
        "--adapter": adapter or tiny.adapter_lora,
    }
    args = [str(a) for pair in models.items() for a in pair]
    args += ["--device", "cpu", "--width", "64", "--height", "64", "--steps", str(steps)]
    return args + (["--batch-size", str(batch_size)] if batch_size is not None else [])
