"""End-to-end generation benchmark: plain SDXL vs EasyRef (ours) vs the official EasyRef path.

All three run side by side in one process on the same models and seeds:

* plain SDXL: text-only context, stock attention processors — the floor;
* ours: each (group, prompt) condition encoded once with prefix reuse, LoRA merged into the UNet,
  decoupled attention on SDPA with reference K/V computed once per image;
* official path (re-implemented here from the official code's habits): both conditions re-encoded
  on every call (full prompt, per-image vision loop, logits, uncond), LoRA applied on the fly in
  every attention layer, and attention through explicit probability maps (``get_attention_scores``
  + ``bmm``), as its attention-map processors do.

All three are warmed up once, then timed in interleaved rounds: each round runs every path once,
in alternating order (plain, ours, official; then official, ours, plain; ...), and every ratio is
the median of the per-round ratios, so machine noise cannot land on one path. From the repository root:

    python -m bench.generate                    # CPU, tiny random models, 8 rounds
    python -m bench.generate --device cuda --size 1024 --steps 30 --dtype float16   # on a GPU
    python -m bench.generate --device cuda --full-size   # = python -m bench.gpu: full-size SDXL + Qwen2-VL-2B

Prints a table of seconds per path, a table of per-round ratios (median / min / max), then
``overhead_vs_plain=<x>`` (ours / plain, time per image) and last ``speedup_vs_official=<x>``
(official / ours), both medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ._common import (
    PROMPTS,
    RATIO_HEADER,
    interleaved,
    median_ratio,
    ratio_row,
    reference_images,
    seconds_row,
    table,
)
from .official import OfficialPath, official_processors


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="timed interleaved rounds, each runs every path once (default 8); ratios are medians of per-round ratios",
    )
    ap.add_argument(
        "--full-size",
        action="store_true",
        help="full-size random SDXL-base + Qwen2-VL-2B built in memory: runs `python -m bench.gpu` on --device "
        "(1024², 30 steps, fp16/bf16, 4 groups x 4 prompts; the other options here are ignored)",
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.full_size:  # same three paths, full-size models (bench/_common.py builders); same last two lines
        from . import gpu

        return gpu.main(["--device", args.device])
    dtype = getattr(torch, args.dtype)

    from diffusers import StableDiffusionXLPipeline

    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.encoder import ReferenceEncoder
    from easyref_cli.model.pipeline import EasyRefPipeline, GenerationRequest, RefEmbeds
    from easyref_cli.tiny import build_tiny_models

    tmp = tempfile.TemporaryDirectory()
    tiny = build_tiny_models(Path(tmp.name))
    checkpoint = load_checkpoint(tiny.adapter_lora)
    groups = reference_images(args.groups, args.refs, 256)
    prompts = (PROMPTS * 4)[: args.prompts]
    jobs = [(gi, p, 1000 + i) for gi in range(args.groups) for i, p in enumerate(prompts)]
    common = dict(
        num_inference_steps=args.steps, guidance_scale=5.0, width=args.size, height=args.size, output_type="np"
    )

    # plain SDXL
    from easyref_cli.model.compat import diffusers_from_pretrained

    plain = diffusers_from_pretrained(StableDiffusionXLPipeline, str(tiny.base_model), dtype).to(args.device)
    plain.set_progress_bar_config(disable=True)

    def run_plain():
        for _, p, seed in jobs:
            plain(prompt=p, generator=torch.Generator("cpu").manual_seed(seed), **common)

    # ours
    ours = EasyRefPipeline.from_pretrained(
        tiny.base_model, tiny.mllm, checkpoint, device=args.device, dtype=args.dtype, attention="sdpa"
    )

    def run_ours():
        enc = ours.encoder
        enc._uncond_cache.clear()  # once per run, as in one `easyref generate` process
        conds = {}
        for gi, g in enumerate(groups):
            prefix = enc.encode_prefix(g)
            for p in prompts:
                conds[(gi, p)] = RefEmbeds(enc.encode_caption(prefix, p), enc.encode_uncond())
        for gi, p, seed in jobs:
            ours.generate(
                [
                    GenerationRequest(
                        prompt=p,
                        ref_embeds=conds[(gi, p)],
                        seed=seed,
                        steps=args.steps,
                        width=args.size,
                        height=args.size,
                    )
                ]
            )

    # official path
    official_pipe = diffusers_from_pretrained(StableDiffusionXLPipeline, str(tiny.base_model), dtype).to(args.device)
    official_pipe.set_progress_bar_config(disable=True)
    unet = official_pipe.unet
    unet.set_attn_processor(official_processors(unet, checkpoint, args.device, dtype))
    official_enc = ReferenceEncoder.from_pretrained(tiny.mllm, checkpoint, device=args.device, dtype=ours.encoder_dtype)
    official = OfficialPath(tiny.mllm, official_enc, args.device, ours.encoder_dtype)

    def run_official():
        for gi, p, seed in jobs:
            cond, uncond = official.condition(groups[gi], p)
            pe, ne, pp, npp = official_pipe.encode_prompt(
                p, device=args.device, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            pe = torch.cat([pe, cond[None].to(pe)], 1)
            ne = torch.cat([ne, uncond[None].to(ne)], 1)
            official_pipe(
                prompt_embeds=pe,
                negative_prompt_embeds=ne,
                pooled_prompt_embeds=pp,
                negative_pooled_prompt_embeds=npp,
                generator=torch.Generator("cpu").manual_seed(seed),
                **common,
            )

    paths = {"plain SDXL (no references)": run_plain, "easyref (ours)": run_ours, "official EasyRef path": run_official}
    with torch.inference_mode():
        for fn in paths.values():
            fn()  # warm-up, untimed
        times = interleaved(paths, args.rounds, args.device)
    t_plain, t_ours, t_official = times.values()
    n = len(jobs)
    rows = [seconds_row(name, samples, n) for name, samples in times.items()]
    ratios = [
        ratio_row("overhead_vs_plain (ours / plain)", t_ours, t_plain),
        ratio_row("speedup_vs_official (official / ours)", t_official, t_ours, ".2f"),
    ]
    print(
        f"{args.groups} groups x {args.prompts} prompts, {args.steps} steps, {args.size}px, device={args.device} "
        f"dtype={args.dtype} (tiny random models); {args.rounds} interleaved rounds after a warm-up"
    )
    print(table(rows, ("path", "median s", "min s", "max s", "ms per image (median)")))
    print()
    print(table(ratios, RATIO_HEADER))
    print()
    print(f"overhead_vs_plain={median_ratio(t_ours, t_plain):.3f}")
    print(f"speedup_vs_official={median_ratio(t_official, t_ours):.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
