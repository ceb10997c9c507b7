"""Built-in ControlNet preprocessors (``--control-preprocess``), numpy + Pillow only: no OpenCV, no torch.

``canny`` reproduces OpenCV's ``cv2.Canny(image, low, high)`` with its defaults (aperture 3,
``L2gradient=False``), the call the public canny ControlNets' recipes make, step by step:

* **no blur**: ``cv2.Canny`` smooths nothing itself and the common ControlNet recipe calls it directly on
  the image, so no Gaussian blur is applied here either (the 3×3 Sobel is all the smoothing there is);
* 3×3 Sobel gradients (``gx`` right minus left, ``gy`` bottom minus top) with ``BORDER_REPLICATE``,
  as ``cv2.Canny`` calls ``Sobel``; the magnitude is the L1 norm ``|gx| + |gy|`` in integers;
* non-maximum suppression in 4 sectors with OpenCV's fixed-point ``tan(22.5°)`` bounds
  (``TG22 = round(0.41421356 * 2**15)``) and its exact tie rules: horizontal and vertical sectors keep
  ``m > previous and m >= next``, diagonal sectors ``m > both``; magnitudes outside the image count as 0,
  so the outermost pixels can be edges, as in OpenCV (no 1-pixel border is cleared);
* thresholds as OpenCV reads them: swapped when ``low > high``, floored to integers, and both strict
  (candidate ``m > low``, strong ``m > high``);
* hysteresis: a candidate is kept when it is 8-connected to a strong pixel through candidates. OpenCV
  grows edges with a stack; here the candidates' connected components are found with a vectorized
  union-find (hooking + pointer jumping), which gives the same set.

Input, before Canny:

* RGB-like modes (RGB, RGBA, P, CMYK, ...) are converted with Pillow's ``convert("RGB")``, which
  **drops** alpha (it is not composited), as ``diffusers.utils.load_image`` does;
* colour → gray (``per_channel=False`` only) uses OpenCV's ``COLOR_RGB2GRAY`` fixed-point formula
  ``(4899 R + 9617 G + 1868 B + 8192) >> 14``, not Pillow's ``convert("L")``: both use the ITU-R 601
  weights, but Pillow rounds differently and is 1 level off on 39,135 of the 2**24 colours (0.23 %);
* L / LA / La / 1 are read as gray (alpha dropped); 16-bit modes (``I;16*``) and ``I`` (how older
  Pillow opened 16-bit PNGs) are scaled to 8 bit by ``round(v * 255 / 65535)``, so an ``I`` image
  holding 0..255 values comes out nearly black; ``F`` is clipped to 0..255 and rounded.

Colour: by default (``per_channel=True``) this is the popular recipe ``cv2.Canny(np.array(rgb), low,
high)``, which runs the Sobel on the three channels and keeps, per pixel, the channel with the largest
magnitude (lllyasviel's annotator and the diffusers canny-ControlNet model cards call it so);
``per_channel=False`` is ``cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)``. OpenCV builds with Intel IPP may route single-channel ``Canny`` through IPP, whose results can
differ from OpenCV's own code in a few pixels; this module follows OpenCV's own code.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: the --control-preprocess choices
PREPROCESSORS: tuple[str, ...] = ("none", "canny")

_SHIFT = 15
#: OpenCV's tan(22.5°) in 15-bit fixed point (canny.cpp TG22)
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def preprocess_control(image: Image.Image, name: str) -> Image.Image:
    """The control image ControlNet reads: `none` → the image as RGB (a copy); `canny` → :func:`canny`.
    ValueError for an unknown name."""
    if name == "none":
        return image.convert("RGB")  # a copy even when the image is RGB already
    if name == "canny":
        return canny(image)
    raise ValueError(f"unknown control preprocessor {name!r}: choose one of {', '.join(PREPROCESSORS)}")


def canny(image: Image.Image, low: int = 100, high: int = 200, *, per_channel: bool = True) -> Image.Image:
    """Canny edges as an RGB image (255 on edges, 0 elsewhere, the three channels equal), the same size as
    ``image``: the usual SDXL canny-ControlNet input, computed like OpenCV's ``cv2.Canny(np.array(rgb), low,
    high)`` — the call the canny ControlNets' recipes make — with the L1 gradient (the thresholds apply to
    ``|gx| + |gy|`` of the 3×3 Sobel of each pixel's strongest channel) and no blur first.

    ``per_channel=False`` turns the image gray first (``cv2.Canny(cv2.cvtColor(rgb, COLOR_RGB2GRAY))``).
    Alpha is dropped, not composited; see the module docstring."""
    edges = canny_edges(_to_uint8(image, per_channel=per_channel), low, high)
    plane = edges.astype(np.uint8) * np.uint8(255)
    return Image.fromarray(np.repeat(plane[:, :, None], 3, axis=2), mode="RGB")


def canny_edges(array: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """``cv2.Canny(array, low, high) > 0`` for a uint8 ``(H, W)`` or ``(H, W, C)`` array, as a bool array."""
    low, high = sorted((low, high))
    low, high = int(np.floor(low)), int(np.floor(high))
    gx, gy = _sobel(np.asarray(array))
    mag = np.abs(gx) + np.abs(gy)
    if mag.ndim == 3:  # OpenCV: per pixel, the channel with the largest magnitude (the first on ties)
        pick = mag.argmax(axis=2)[:, :, None]
        mag, gx, gy = (np.take_along_axis(a, pick, axis=2)[:, :, 0] for a in (mag, gx, gy))
    candidates = _non_max_suppression(mag, gx, gy) & (mag > low)
    return _hysteresis(candidates, candidates & (mag > high))


def _to_uint8(image: Image.Image, *, per_channel: bool = False) -> np.ndarray:
    """The 8-bit array Canny runs on: gray ``(H, W)``, or ``(H, W, 3)`` RGB for ``per_channel``."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        return np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
    if mode in ("1", "L", "LA", "La"):  # Pillow converts La (premultiplied) to L only through LA
        return np.asarray((image.convert("LA") if mode == "La" else image).convert("L"), dtype=np.uint8)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if per_channel:
        return rgb
    r, g, b = (rgb[:, :, i].astype(np.int32) for i in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14).astype(np.uint8)  # OpenCV COLOR_RGB2GRAY


def _sobel(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel ``(gx, gy)`` in int32 with replicated borders (OpenCV's ``BORDER_REPLICATE``)."""
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (array.ndim - 2)
    p = np.pad(array.astype(np.int32), pad, mode="edge")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]  # smoothed down the columns: (H, W + 2)
    cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # smoothed along the rows: (H + 2, W)
    return rows[:, 2:] - rows[:, :-2], cols[2:] - cols[:-2]


def _non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Where ``mag`` is a local maximum across the edge, with OpenCV's sectors and tie rules
    (neighbours outside the image count as 0). Thresholds are applied by the caller."""
    h, w = mag.shape
    m = np.pad(mag.astype(np.int64), 1)
    c = m[1:-1, 1:-1]

    def nb(dy: int, dx: int) -> np.ndarray:
        return m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx, gy = gx.astype(np.int64), gy.astype(np.int64)
    x, y = np.abs(gx), np.abs(gy) << _SHIFT
    tg22x = x * _TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << (_SHIFT + 1)))
    same_sign = (gx ^ gy) >= 0  # gradient towards down-right or up-left: compare those neighbours
    diagonal = np.where(same_sign, (c > nb(-1, -1)) & (c > nb(1, 1)), (c > nb(-1, 1)) & (c > nb(1, -1)))
    keep = np.where(horizontal, (c > nb(0, -1)) & (c >= nb(0, 1)), diagonal)
    return np.where(vertical, (c > nb(-1, 0)) & (c >= nb(1, 0)), keep)


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected (through candidates) to a strong pixel, ``strong`` ⊆ ``candidates``.

    Connected components by union-find on the candidate pixels only: every round hooks each root to the
    smallest root across an edge, then pointer-jumps until every pixel points at its root; edges already
    inside one tree are dropped, so rounds shrink fast (O(log n) rounds)."""
    h, w = candidates.shape
    flat = np.pad(candidates, 1).ravel()  # a False frame: neighbours never wrap around a row
    where = np.flatnonzero(flat)
    if where.size == 0:
        return np.zeros((h, w), dtype=bool)
    node = np.full(flat.size, -1, dtype=np.int64)
    node[where] = np.arange(where.size)
    wp = w + 2
    a_list, b_list = [], []
    for offset in (1, wp - 1, wp, wp + 1):  # right, down-left, down, down-right: each pair once
        linked = where[flat[where + offset]]
        a_list.append(node[linked])
        b_list.append(node[linked + offset])
    a, b = np.concatenate(a_list), np.concatenate(b_list)
    parent = np.arange(where.size)
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            break
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    seeded = np.zeros(where.size, dtype=bool)
    seeded[parent[np.pad(strong, 1).ravel()[where]]] = True
    out = np.zeros(flat.size, dtype=bool)
    out[where[seeded[parent]]] = True
    return out.reshape(h + 2, w + 2)[1:-1, 1:-1]
