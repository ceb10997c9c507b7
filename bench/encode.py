"""Encode benchmark: the official encode path vs ours, side by side in one run.

Official path (as ``EasyRef.get_image_embeds`` in the official code): every prompt re-encodes the
whole prompt, the vision tower runs image by image, the trunk computes ``lm_head`` logits, and the
unconditional embedding is recomputed on every call. Ours: vision tower batched, system + images +
instruction encoded once per group (prefix K/V reused), per prompt only the caption suffix and the
final layer, no logits, uncond once per run.

Both paths are warmed up once, then timed in interleaved rounds (round r: official then ours, round
r+1: ours then official, ...); every ratio is the median of the per-round ratios, so machine noise
cannot land on one path. From the repository root:

    python -m bench.encode                       # CPU, mid-size random Qwen2-VL, 4 groups x 4 prompts, 6 rounds
    python -m bench.encode --device cuda --size full --dtype bfloat16

Prints a table of seconds per path, a table of per-round ratios (median / min / max), then
``extra_prompt_fraction=<x>``, ``max_abs_diff=<x>`` (conditions of the two paths) and last
``encode_speedup=<x>`` (official / ours, median of per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ._common import (
    PROMPTS,
    QWEN_SHAPES,
    RATIO_HEADER,
    interleaved,
    median_ratio,
    ratio_row,
    reference_images,
    seconds_row,
    sync,
    table,
)
from .official import OfficialPath


def build(root: Path, size: str):
    from easyref_cli.model.checkpoint import split_state_dict
    from easyref_cli.tiny import build_tiny_qwen2vl, build_tiny_sdxl, official_state_dict

    text, vision, vocab = QWEN_SHAPES[size]
    mllm = build_tiny_qwen2vl(root / "qwen", text_overrides=text, vision_overrides=vision, vocab_size=vocab)
    sdxl = build_tiny_sdxl(root / "sdxl")
    return mllm, split_state_dict(official_state_dict(mllm, sdxl, lora=False), source="bench")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.encode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--size", default="mid", choices=list(QWEN_SHAPES))
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--refs", type=int, default=3, help="reference images per group")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument(
        "--rounds", type=int, default=6, help="timed interleaved rounds, each runs both paths once (default 6)"
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    from easyref_cli.model.encoder import ReferenceEncoder

    with tempfile.TemporaryDirectory() as tmp:
        mllm, checkpoint = build(Path(tmp), args.size)
        ours = ReferenceEncoder.from_pretrained(mllm, checkpoint, device=args.device, dtype=dtype)
        official = OfficialPath(mllm, ours, args.device, dtype)
    groups = reference_images(args.groups, args.refs, args.image_size)
    prompts = (PROMPTS * 4)[: args.prompts]

    outputs: dict[str, list] = {}
    first_prompt_s: list[float] = []  # per round: mean seconds of a group's first prompt (prefix + caption)
    extra_prompt_s: list[float] = []  # per round: mean seconds of each further prompt (caption only)

    def run_official():
        outputs["official"] = [[official.condition(g, p) for p in prompts] for g in groups]

    def run_ours():
        ours._uncond_cache.clear()  # once per run, as in one `easyref generate` process
        out, first, extra = [], [], []
        for g in groups:
            sync(args.device)
            t0 = time.perf_counter()
            prefix = ours.encode_prefix(g)
            conds = [ours.encode_caption(prefix, prompts[0])]
            sync(args.device)
            t1 = time.perf_counter()
            for p in prompts[1:]:
                conds.append(ours.encode_caption(prefix, p))
            sync(args.device)
            t2 = time.perf_counter()
            first.append(t1 - t0)
            if len(prompts) > 1:
                extra.append((t2 - t1) / (len(prompts) - 1))
            out.append([(c, ours.encode_uncond()) for c in conds])
        first_prompt_s.append(statistics.mean(first))
        if extra:
            extra_prompt_s.append(statistics.mean(extra))
        outputs["ours"] = out

    run_official()  # warm-up, untimed
    run_ours()
    first_prompt_s.clear()
    extra_prompt_s.clear()
    times = interleaved({"official": run_official, "ours": run_ours}, args.rounds, args.device)

    diff = max(
        max((a[0].float() - b[0].float()).abs().max().item(), (a[1].float() - b[1].float()).abs().max().item())
        for ga, gb in zip(outputs["official"], outputs["ours"], strict=True)
        for a, b in zip(ga, gb, strict=True)
    )
    n = args.groups * args.prompts
    speedup = median_ratio(times["official"], times["ours"])
    fraction = median_ratio(extra_prompt_s, first_prompt_s) if extra_prompt_s else float("nan")
    full = statistics.median(first_prompt_s)
    extra = statistics.median(extra_prompt_s) if extra_prompt_s else float("nan")
    rows = [
        seconds_row("official (per-prompt re-encode, per-image vision, logits, uncond per call)", times["official"], n),
        seconds_row("easyref (batched vision, prefix once per group, no logits, uncond once)", times["ours"], n),
    ]
    ratios = [ratio_row("encode_speedup (official / ours)", times["official"], times["ours"], ".2f")]
    if extra_prompt_s:
        ratios.append(ratio_row("extra_prompt_fraction (extra prompt / full encode)", extra_prompt_s, first_prompt_s))
    print(
        f"Qwen2-VL size={args.size} device={args.device} dtype={args.dtype}: {args.groups} groups x {args.prompts} prompts, "
        f"{args.refs} refs of {args.image_size}px; {args.rounds} interleaved rounds after a warm-up"
    )
    print(table(rows, ("path", "median s", "min s", "max s", "ms per condition (median)")))
    print()
    print(table(ratios, RATIO_HEADER))
    print()
    print(
        f"ours: first prompt of a group (full encode) {1000 * full:.1f} ms, each extra prompt {1000 * extra:.1f} ms "
        f"(medians over rounds; per-round ratio median {100 * fraction:.1f}% of a full encode)"
    )
    print(f"extra_prompt_fraction={fraction:.3f}")
    print(f"max_abs_diff={diff:.3g}")
    print(f"encode_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
