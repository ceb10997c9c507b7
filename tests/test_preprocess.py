"""The built-in ControlNet preprocessors: canny's properties, a hand-checked non-max suppression, and
a literal port of OpenCV's canny.cpp loops as the reference for the vectorized code."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from easyref_cli.preprocess import (
    PREPROCESSORS,
    _hysteresis,
    _non_max_suppression,
    _sobel,
    canny,
    canny_edges,
    preprocess_control,
)


def _edges(image: Image.Image, *args, **kwargs) -> np.ndarray:
    out = np.asarray(canny(image, *args, **kwargs))
    assert out.dtype == np.uint8 and out.shape == (image.height, image.width, 3)
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 0] == out[:, :, 2]).all()
    assert set(np.unique(out)) <= {0, 255}
    return out[:, :, 0] == 255


def _noise(seed: int, shape=(48, 40), scale: int = 255) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * scale).astype(np.uint8)


def _reference_canny(gray: np.ndarray, low: int, high: int) -> np.ndarray:
    """OpenCV canny.cpp, loop for loop (L1, aperture 3): NMS into a 0/1/2 map, then a stack."""
    gx, gy = _sobel(gray)
    h, w = gray.shape
    mag = np.zeros((h + 2, w + 2), dtype=np.int64)
    mag[1:-1, 1:-1] = np.abs(gx) + np.abs(gy)
    state = np.ones((h + 2, w + 2), dtype=np.uint8)  # 1: no edge, 0: maybe, 2: edge
    stack = []
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            m, xs, ys = mag[i, j], int(gx[i - 1, j - 1]), int(gy[i - 1, j - 1])
            if m <= low:
                continue
            x, y = abs(xs), abs(ys) << 15
            if y < x * 13573:
                peak = m > mag[i, j - 1] and m >= mag[i, j + 1]
            elif y > x * 13573 + (x << 16):
                peak = m > mag[i - 1, j] and m >= mag[i + 1, j]
            else:
                s = -1 if (xs ^ ys) < 0 else 1
                peak = m > mag[i - 1, j - s] and m > mag[i + 1, j + s]
            if peak:
                state[i, j] = 2 if m > high else 0
                if m > high:
                    stack.append((i, j))
    while stack:
        i, j = stack.pop()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if state[i + di, j + dj] == 0:
                    state[i + di, j + dj] = 2
                    stack.append((i + di, j + dj))
    return state[1:-1, 1:-1] == 2


def test_the_choices():
    assert PREPROCESSORS == ("none", "canny")


def test_a_filled_square_gives_its_outline():
    arr = np.zeros((64, 72), dtype=np.uint8)
    arr[20:44, 24:50] = 255
    edges = _edges(Image.fromarray(arr).convert("RGB"))
    ys, xs = np.nonzero(edges)
    assert ys.size > 0
    # within 1 px of the boundary between rows 19|20, 43|44 and columns 23|24, 49|50
    near_row = (np.abs(ys - 19.5) <= 1.5) | (np.abs(ys - 43.5) <= 1.5)
    near_col = (np.abs(xs - 23.5) <= 1.5) | (np.abs(xs - 49.5) <= 1.5)
    inside = (ys >= 18) & (ys <= 45) & (xs >= 22) & (xs <= 51)
    assert ((near_row | near_col) & inside).all()
    # closed-ish: every side has (nearly) its whole length
    assert edges[18:21, 26:48].any(axis=0).all() and edges[43:46, 26:48].any(axis=0).all()
    assert edges[22:42, 22:25].any(axis=1).all() and edges[22:42, 49:52].any(axis=1).all()


@pytest.mark.parametrize("kind", ["constant", "gentle"])
def test_flat_and_gentle_images_have_no_edges(kind):
    yy, xx = np.mgrid[0:80, 0:96]
    arr = np.full((80, 96), 137.0) if kind == "constant" else 40 + 1.5 * xx + 0.7 * yy  # |gx|+|gy| <= 4 * 3
    img = Image.fromarray(np.rint(arr).astype(np.uint8))
    gx, gy = _sobel(np.asarray(img))
    assert (np.abs(gx) + np.abs(gy)).max() < 100
    assert not _edges(img).any()


def test_hysteresis_keeps_connected_weak_edges_and_drops_isolated_ones():
    arr = np.zeros((64, 64), dtype=np.uint8)
    arr[8:30, 32:] = 100  # step of 100: Sobel magnitude 400 > high
    arr[30:56, 32:] = 30  # step of 30: magnitude 120, between low and high, touching the strong edge
    arr[20:50, 6:16] = 30  # the same weak steps, alone
    gx, gy = _sobel(arr)
    assert (np.abs(gx) + np.abs(gy))[:, :24].max() <= 200  # the lone block is weak everywhere
    edges = _edges(Image.fromarray(arr))
    assert edges[34:54, 30:33].any(axis=1).all()  # the weak continuation is kept
    assert not edges[:, :24].any()  # the lone weak block is dropped
    assert not _edges(Image.fromarray(arr), low=150, high=200)[34:54, :].any()  # weak indeed


def test_hysteresis_is_8_connected_through_candidates():
    cand = np.zeros((7, 9), dtype=bool)
    cand[[1, 2, 3, 4], [1, 2, 3, 4]] = True  # a diagonal chain
    cand[1, 7] = cand[5, 7] = True  # lone candidates
    strong = np.zeros_like(cand)
    strong[1, 1] = strong[5, 7] = True
    expect = cand.copy()
    expect[1, 7] = False
    assert (_hysteresis(cand, strong) == expect).all()
    assert not _hysteresis(cand, np.zeros_like(cand)).any()
    # a long spiral, seeded at its inner end, is kept whole
    spiral, end = _spiral(41)
    seed = np.zeros_like(spiral)
    seed[end] = True
    assert (_hysteresis(spiral, seed) == spiral).all()
    assert (_reference_hysteresis(spiral, seed) == spiral).all()  # one path indeed


def _spiral(n: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A one-pixel path spiralling in from the corner, one empty pixel between its turns, and its end."""
    grid = np.zeros((n, n), dtype=bool)
    y = x = turn = blocked = 0
    grid[0, 0] = True
    while blocked < 2:
        dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[turn % 4]
        ahead = [(y + k * dy, x + k * dx) for k in (1, 2)]
        inside = [0 <= a < n and 0 <= b < n for a, b in ahead]
        if inside[0] and not grid[ahead[0]] and not (inside[1] and grid[ahead[1]]):
            (y, x), blocked = ahead[0], 0
            grid[y, x] = True
        else:
            turn, blocked = turn + 1, blocked + 1
    return grid, (y, x)


def _reference_hysteresis(cand, strong):
    out = strong.copy()
    while True:
        grown = out.copy()
        p = np.pad(out, 1)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= p[1 + dy : 1 + dy + out.shape[0], 1 + dx : 1 + dx + out.shape[1]] & cand
        if (grown == out).all():
            return out
        out = grown


def test_non_max_suppression_by_hand():
    mag = np.array([[0, 1, 3, 2, 0], [0, 2, 2, 1, 0], [5, 4, 3, 2, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]])
    one, zero = np.ones_like(mag), np.zeros_like(mag)
    expect = np.array([[0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]])
    assert (_non_max_suppression(mag, one, zero) == expect.astype(bool)).all()  # gradient along x
    assert (_non_max_suppression(mag.T, zero, one) == expect.T.astype(bool)).all()  # along y
    diag = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert not _non_max_suppression(diag, np.ones((3, 3), int), np.ones((3, 3), int))[1, 1]  # ↘: vs ↖
    assert _non_max_suppression(diag, np.ones((3, 3), int), -np.ones((3, 3), int))[1, 1]  # ↗: vs ↙, ↗


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_literal_opencv_port(seed):
    rng = np.random.default_rng(seed)
    gray = _noise(seed, scale=255 if seed % 2 else 90)
    gray[rng.integers(0, 48, 6), :] //= 3  # some structure besides noise
    for low, high in ((100, 200), (50, 120), (200, 100), (30.7, 300.2)):
        expect = _reference_canny(gray, int(min(low, high)), int(max(low, high)))
        assert (canny_edges(gray, low, high) == expect).all()


def test_higher_thresholds_never_add_edges():
    img = Image.fromarray(_noise(7, (96, 96)))
    base = _edges(img, 50, 120)
    assert base.any()
    for low, high in ((80, 120), (50, 200), (120, 300), (200, 400)):
        assert not (_edges(img, low, high) & ~base).any()


def test_modes_and_determinism():
    gray = _noise(3, (40, 50)) // 2 + 60
    gray[10:30, 15:35] = 250
    base = _edges(Image.fromarray(gray))
    assert base.any()
    assert (_edges(Image.fromarray(gray)) == base).all()
    rgb = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    assert (_edges(rgb) == base).all() and (_edges(rgb, per_channel=True) == base).all()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(_noise(4, (40, 50))))  # alpha is dropped, not composited
    assert (_edges(rgba) == base).all()
    wide = Image.fromarray(gray.astype(np.uint16) * 257)
    assert wide.mode.startswith("I;16")
    assert (_edges(wide) == base).all()
    assert (_edges(rgb.convert("P")) == _edges(rgb.convert("P").convert("RGB"))).all()


def test_colour_takes_the_strongest_channel_by_default_and_opencv_gray_on_request():
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, 16:, 2] = 200  # a blue step: gray step of 23 (too weak), blue channel step of 200
    assert not _edges(Image.fromarray(arr), per_channel=False).any()
    assert _edges(Image.fromarray(arr))[:, 15].all()
    assert (np.asarray(preprocess_control(Image.fromarray(arr), "canny"))[:, 15] == 255).all()


def test_preprocess_control():
    rgb = Image.fromarray(_noise(5, (20, 30, 3)))
    same = preprocess_control(rgb, "none")
    assert same is not rgb and same.mode == "RGB" and (np.asarray(same) == np.asarray(rgb)).all()
    assert preprocess_control(rgb.convert("L"), "none").mode == "RGB"
    assert (np.asarray(preprocess_control(rgb, "canny")) == np.asarray(canny(rgb))).all()
    with pytest.raises(ValueError, match="sobel"):
        preprocess_control(rgb, "sobel")
