"""End-to-end generation benchmark: plain SDXL vs EasyRef (ours) vs the official EasyRef path.

All three run side by side in one process on the same models and seeds:

* plain SDXL: text-only context, stock attention processors — the floor;
* ours: each (group, prompt) condition encoded once with prefix reuse, LoRA merged into the UNet,
  decoupled attention on SDPA with reference K/V computed once per image;
* official path (re-implemented here from the official code's habits): both conditions re-encoded
  on every call (full prompt, per-image vision loop, logits, uncond), LoRA applied on the fly in
  every attention layer, and attention through explicit probability maps (``get_attention_scores``
  + ``bmm``), as its attention-map processors do.

    python bench/generate.py                    # CPU, tiny random models
    python bench/generate.py --device cuda --size 1024 --steps 30 --dtype float16   # on a GPU
    python bench/generate.py --device cuda --full-size   # = bench/gpu.py: full-size SDXL + Qwen2-VL-2B

Prints a table, then ``overhead_vs_plain=<x>`` (ours / plain, time per image) and last
``speedup_vs_official=<x>`` (official / ours).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sync, table  # noqa: E402
from encode import PROMPTS, OfficialPath, reference_images  # noqa: E402


class _Lora(nn.Module):
    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down.weight.data.copy_(down)
        self.up.weight.data.copy_(up)

    def forward(self, x):
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class OfficialAttnProcessor(nn.Module):
    """LoRA on the fly + explicit attention maps (+ the IP branch on attn2), as the official processors."""

    def __init__(self, lora: dict, ip: dict | None, num_tokens: int, scale: float = 1.0):
        super().__init__()
        self.lora = nn.ModuleDict({k: _Lora(v["down"], v["up"]) for k, v in lora.items()})
        self.to_k_ip = self.to_v_ip = None
        if ip is not None:
            self.to_k_ip = nn.Linear(ip["to_k_ip"].shape[1], ip["to_k_ip"].shape[0], bias=False)
            self.to_v_ip = nn.Linear(ip["to_v_ip"].shape[1], ip["to_v_ip"].shape[0], bias=False)
            self.to_k_ip.weight.data.copy_(ip["to_k_ip"])
            self.to_v_ip.weight.data.copy_(ip["to_v_ip"])
        self.num_tokens, self.scale = num_tokens, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q = attn.to_q(hidden_states) + self.lora["to_q"](hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ip_ctx = None
        if self.to_k_ip is not None:
            ctx, ip_ctx = ctx[:, : -self.num_tokens], ctx[:, -self.num_tokens :]
        k = attn.to_k(ctx) + self.lora["to_k"](ctx)
        v = attn.to_v(ctx) + self.lora["to_v"](ctx)
        qh, kh, vh = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(qh, kh, None)  # the attention map, materialised
        out = attn.batch_to_head_dim(torch.bmm(probs, vh))
        if ip_ctx is not None:
            ik, iv = attn.head_to_batch_dim(self.to_k_ip(ip_ctx)), attn.head_to_batch_dim(self.to_v_ip(ip_ctx))
            self.attn_map = attn.get_attention_scores(qh, ik, None)  # kept for visualisation, as officially
            out = out + self.scale * attn.batch_to_head_dim(torch.bmm(self.attn_map, iv))
        return attn.to_out[1](attn.to_out[0](out) + self.lora["to_out"](out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--full-size", action="store_true",
                    help="full-size random SDXL-base + Qwen2-VL-2B built in memory: runs bench/gpu.py on --device "
                         "(1024², 30 steps, fp16/bf16, 4 groups x 4 prompts; the other options here are ignored)")
    args = ap.parse_args(argv)
    if args.full_size:  # same three paths, full-size models (bench/_common.py builders); same last two lines
        import gpu

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
    common = dict(num_inference_steps=args.steps, guidance_scale=5.0, width=args.size, height=args.size, output_type="np")

    # plain SDXL
    from easyref_cli.model.compat import diffusers_from_pretrained

    plain = diffusers_from_pretrained(StableDiffusionXLPipeline, str(tiny.base_model), dtype).to(args.device)
    plain.set_progress_bar_config(disable=True)

    def run_plain():
        for _, p, seed in jobs:
            plain(prompt=p, generator=torch.Generator("cpu").manual_seed(seed), **common)

    # ours
    ours = EasyRefPipeline.from_pretrained(tiny.base_model, tiny.mllm, checkpoint, device=args.device, dtype=args.dtype, attention="sdpa")

    def run_ours():
        enc = ours.encoder
        conds = {}
        for gi, g in enumerate(groups):
            prefix = enc.encode_prefix(g)
            for p in prompts:
                conds[(gi, p)] = RefEmbeds(enc.encode_caption(prefix, p), enc.encode_uncond())
        for gi, p, seed in jobs:
            ours.generate([GenerationRequest(prompt=p, ref_embeds=conds[(gi, p)], seed=seed, steps=args.steps, width=args.size, height=args.size)])

    # official path
    official_pipe = diffusers_from_pretrained(StableDiffusionXLPipeline, str(tiny.base_model), dtype).to(args.device)
    official_pipe.set_progress_bar_config(disable=True)
    unet = official_pipe.unet
    procs = {}
    for name in unet.attn_processors:
        path = name[: -len(".processor")]
        ip = checkpoint.ip.get(path) if path.endswith("attn2") else None
        procs[name] = OfficialAttnProcessor(checkpoint.lora[path], ip, checkpoint.num_tokens).to(args.device, dtype)
    unet.set_attn_processor(procs)
    official_enc = ReferenceEncoder.from_pretrained(tiny.mllm, checkpoint, device=args.device, dtype=ours.encoder_dtype)
    official = OfficialPath(tiny.mllm, official_enc, args.device, ours.encoder_dtype)

    def run_official():
        for gi, p, seed in jobs:
            cond, uncond = official.condition(groups[gi], p)
            pe, ne, pp, npp = official_pipe.encode_prompt(p, device=args.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
            pe = torch.cat([pe, cond[None].to(pe)], 1)
            ne = torch.cat([ne, uncond[None].to(ne)], 1)
            official_pipe(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp,
                          generator=torch.Generator("cpu").manual_seed(seed), **common)

    paths = (("plain SDXL (no references)", run_plain), ("easyref (ours)", run_ours), ("official EasyRef path", run_official))
    samples: dict[str, list[float]] = {name: [] for name, _ in paths}
    with torch.inference_mode():
        for _, fn in paths:
            fn()  # warm-up
        for _ in range(args.repeat):  # round-robin, so machine noise hits every path alike
            for name, fn in paths:
                sync(args.device)
                t0 = time.perf_counter()
                fn()
                sync(args.device)
                samples[name].append(time.perf_counter() - t0)
    results = {name: statistics.median(v) for name, v in samples.items()}
    n = len(jobs)
    rows = [(k, f"{v:.2f}", f"{n / v:.2f}", f"{1000 * v / n:.0f}") for k, v in results.items()]
    print(f"{args.groups} groups x {args.prompts} prompts, {args.steps} steps, {args.size}px, device={args.device} dtype={args.dtype} (tiny random models)")
    print(table(rows, ("path", "total s", "jobs/s", "ms per image")))
    t_plain, t_ours, t_official = results.values()
    print(f"overhead_vs_plain={t_ours / t_plain:.3f}")
    print(f"speedup_vs_official={t_official / t_ours:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
