"""Shared bits of the benchmarks: model shapes, timing, table printing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

#: Qwen2-VL shapes. "full" is Qwen2-VL-2B (times exactly like the real weights).
QWEN_SHAPES = {
    "tiny": ({}, {}, None),
    "mid": (
        {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
         "num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}},
        {"depth": 6, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4, "hidden_size": 384},
        32000,
    ),
    "full": (
        {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
         "num_key_value_heads": 2, "initializer_range": 0.02,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
        {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536, "initializer_range": 0.02},
        151936,
    ),
}


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeat: int = 1) -> tuple[float, object]:
    """Median wall seconds of ``repeat`` calls (after the caller's warm-up) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
