"""GPU benchmark: full-size random SDXL + Qwen2-VL-2B, fp16 / bf16, 1024², 30 steps, in one run.

Self-contained: every model is built in memory from its config with random weights (random weights
time exactly like the real ones; nothing is downloaded or written): the SDXL-base UNet, VAE and both
CLIP text encoders, Qwen2-VL-2B, and official-layout EasyRef weights (projector, final layer, 64
reference tokens, ``to_k_ip``/``to_v_ip`` on every ``attn2``, rank-128 LoRA on all 140 attention
layers). It measures, side by side on one card:

* UNet ms per CFG step (batch 2) — plain SDXL processors vs EasyRef decoupled attention (ours) vs the
  official path's processors (on-the-fly LoRA, materialised attention maps); eager and
  ``torch.compile``'d (plain and ours);
* encode ms per group (prefix + first prompt), per extra prompt, uncond; the official encode path;
* seconds per image (conditions precomputed: CLIP + 30 steps + VAE decode) for plain / ours / official,
  and totals for G groups × P prompts = encode of every condition + G·P images;
* peak GPU memory per phase (``torch.cuda.max_memory_allocated``, reset between phases): encode
  (Qwen2-VL alone), generate (SDXL alone, the MLLM released), and the official habit (SDXL and two
  Qwen2-VL copies resident).

It ends with a markdown block for docs/PERFORMANCE.md, then ``key=value`` lines (last:
``overhead_vs_plain`` and ``speedup_vs_official``). ``--out FILE.json`` writes every number, and is
rewritten after each stage, so a run cut short still leaves what it measured.

On the device machine (torch 2.11 + CUDA 13, transformers 5.17, no diffusers: carry diffusers and
importlib_metadata as wheels; docs/PERFORMANCE.md "How to run the GPU benchmark" has the exact steps):

    python3 -m bench.gpu --out $OUT/gpu.json           # H100/H200: about 5-7 minutes (an estimate)
    python -m bench.gpu --small --device cpu            # tiny shapes, fp32, same code path (< 2 min)

Run it from the repository root: ``python -m`` puts the current directory on ``sys.path``, so
``easyref_cli`` is imported from the checkout without installing it.

Unlike ``bench.encode`` and ``bench.generate`` (interleaved rounds, medians of per-round ratios),
this script measures the paths stage by stage, because the one UNet on the card is changed between
them (LoRA merged then unmerged, processors swapped, compiled): its ratios are ratios of medians, on
a dedicated card where run-to-run noise is small.

A stage that fails is recorded and the run goes on; ``--budget-s`` skips the compile stages when too
little time is left for them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ._common import (
    PROMPTS,
    allocated_gib,
    build_qwen2vl,
    build_reference_encoder,
    build_sdxl,
    in_memory_checkpoint,
    install_easyref,
    is_cuda,
    meta_unet,
    peak_gib,
    reference_images,
    reset_peak,
    sync,
    table,
    time_calls,
)
from .official import InMemoryOfficialPath, official_processors

PRODUCT_COMPILE_MODE = "max-autotune-no-cudagraphs"  # what `easyref generate --compile` uses


class Run:
    """Results, stage bookkeeping (errors, skips, time budget) and the incremental JSON file."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.data: dict = {
            "meta": {},
            "encode": {},
            "unet_step_ms": {},
            "image_s": {},
            "compile": {},
            "peak_gib": {},
            "totals_s": {},
            "ratios": {},
            "stages": {},
            "skipped": [],
            "errors": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def allows(self, name: str, needs_s: float) -> bool:
        budget = self.args.budget_s
        if budget and self.elapsed() + needs_s > budget:
            self.data["skipped"].append(
                f"{name}: {self.elapsed():.0f}s used, about {needs_s:.0f}s needed, budget {budget:.0f}s"
            )
            self.log(f"SKIP {name}: not enough of the {budget:.0f}s budget left (--budget-s 0 lifts it)")
            return False
        return True

    @contextmanager
    def stage(self, name: str):
        self.log(f"-- {name}")
        t = time.perf_counter()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - record, keep going: a lease is too short to lose a run
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.log(f"ERROR in {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            self.data["stages"][name] = round(time.perf_counter() - t, 2)
            self.save()

    def save(self, final: bool = False) -> None:
        self.data["meta"]["complete"] = final
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.data, indent=1, default=str))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny SDXL and Qwen2-VL shapes (CPU testing of this script)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --small 64)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; --small 3)")
    ap.add_argument("--dtype", default="auto", help="auto = fp16 SDXL + bf16 Qwen2-VL on CUDA, fp32 on CPU")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per group")
    ap.add_argument("--refs", type=int, default=3, help="reference images per group")
    ap.add_argument("--ref-side", type=int, default=512, help="reference image side in pixels")
    ap.add_argument("--images", type=int, default=None, help="timed images per path and mode (default 2; --small 1)")
    ap.add_argument("--repeat", type=int, default=None, help="timed UNet steps per variant (default 10; --small 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed UNet steps first (default 3; --small 1)")
    ap.add_argument(
        "--lora-rank", type=int, default=None, help="LoRA rank of the random adapter (default 128; --small 4)"
    )
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"])
    ap.add_argument("--skip-compile", action="store_true", help="eager only")
    ap.add_argument(
        "--compile-mode",
        default="default",
        help=f"torch.compile mode (default 'default'; `easyref generate --compile` uses {PRODUCT_COMPILE_MODE}, "
        "whose autotuning may take many minutes per UNet)",
    )
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager on CPU)")
    ap.add_argument(
        "--budget-s", type=float, default=450.0, help="skip compile stages that would end past this (0: no limit)"
    )
    ap.add_argument("--out", default=None, help="write all results as JSON here (rewritten after every stage)")
    ap.add_argument(
        "--from-json", default=None, metavar="FILE", help="measure nothing: print the summary of a saved --out file"
    )
    args = ap.parse_args(argv)
    small = args.small
    for name, full, tiny in (
        ("size", 1024, 64),
        ("steps", 30, 3),
        ("images", 2, 1),
        ("repeat", 10, 3),
        ("warmup", 3, 1),
        ("lora_rank", 128, 4),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    if args.compile_backend is None:
        # Inductor on CPU would time the C++ compiler, not the code path: dynamo alone checks that here.
        args.compile_backend = "inductor" if is_cuda(args.device) else "eager"
    return args


def versions() -> dict:
    import diffusers
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["card"] = torch.cuda.get_device_name()
        info["card_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def dynamo_counts() -> dict:
    """Dynamo's process-wide counters (``torch._dynamo.reset`` leaves them): take differences."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "break_reasons": sorted(counters["graph_break"]),
    }


def dynamo_delta(before: dict) -> dict:
    """Graphs compiled and graph breaks since ``before``: 1 graph and 0 breaks means no recompile, no split."""
    now = dynamo_counts()
    return {
        "graphs": now["unique_graphs"] - before["unique_graphs"],
        "graph_breaks": now["graph_breaks"] - before["graph_breaks"],
        "break_reasons": [r for r in now["break_reasons"] if r not in before["break_reasons"]][:5],
    }


def compile_unet(sdxl, raw_unet, args) -> None:
    """As ``easyref_cli.model.pipeline.compile_unet`` (static shapes, no fullgraph), with a chosen mode/backend."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh cache per variant: no guard can hand one variant's graph to the other
    kwargs = {"fullgraph": False, "dynamic": False, "backend": args.compile_backend}
    if args.compile_backend == "inductor":
        kwargs["mode"] = args.compile_mode
    sdxl.unet = torch.compile(raw_unet, **kwargs)


def main(argv=None) -> None:  # noqa: C901, PLR0915 - one linear script, stage by stage
    args = parse_args(argv)
    if args.from_json:  # e.g. a run cut short by its time limit: its JSON holds every finished stage
        summarize(json.loads(Path(args.from_json).read_text()))
        return
    run = Run(args)
    device = args.device
    from diffusers.models.attention_processor import AttnProcessor2_0

    from easyref_cli.model import adapter as adapter_mod
    from easyref_cli.model import compat
    from easyref_cli.model.pipeline import (
        EasyRefPipeline,
        GenerationRequest,
        NonFiniteImages,
        RefEmbeds,
        make_scheduler,
        resolve_dtypes,
    )

    compat.quiet_loading()
    # diffusers 0.42 logs a warning and a FutureWarning on every fp16 image (its VAE upcast calls .to(dtype)):
    # keep the log readable, the device tool returns only the last 12,000 characters
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    sdxl_dtype, enc_dtype = resolve_dtypes(None if args.dtype == "auto" else args.dtype, device)
    shapes = "tiny" if args.small else "full"
    qwen_size = "tiny" if args.small else "full"
    G, P = args.groups, args.prompts  # noqa: N806
    n_jobs = G * P
    meta = run.data["meta"]
    meta.update(versions())
    meta.update(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "command": " ".join(["python -m bench.gpu", *(sys.argv[1:] if argv is None else argv)]),
            "device": device,
            "sdxl_dtype": str(sdxl_dtype).replace("torch.", ""),
            "encoder_dtype": str(enc_dtype).replace("torch.", ""),
            "shapes": shapes,
            "size": args.size,
            "steps": args.steps,
            "groups": G,
            "prompts": P,
            "refs": args.refs,
            "ref_side": args.ref_side,
            "lora_rank": args.lora_rank,
            "images_timed": args.images,
            "unet_repeat": args.repeat,
            "compile": None if args.skip_compile else {"backend": args.compile_backend, "mode": args.compile_mode},
        }
    )
    run.log(
        f"{meta.get('card', device)} | torch {meta['torch']} transformers {meta['transformers']} "
        f"diffusers {meta['diffusers']} | SDXL {meta['sdxl_dtype']}, Qwen2-VL {meta['encoder_dtype']}, {shapes} shapes"
    )
    torch.manual_seed(0)
    groups = reference_images(G, args.refs, args.ref_side)
    prompts = (PROMPTS * (P // len(PROMPTS) + 1))[:P]
    E = run.data["encode"]  # noqa: N806
    PK = run.data["peak_gib"]  # noqa: N806
    ST = run.data["unet_step_ms"]  # noqa: N806
    IM = run.data["image_s"]  # noqa: N806
    CO = run.data["compile"]  # noqa: N806
    state: dict = {}

    # ---- phase 1: encode (Qwen2-VL alone on the card) -----------------------------------------
    with run.stage("build Qwen2-VL + EasyRef weights"):
        qwen, tokenizer, image_processor = build_qwen2vl(qwen_size, device, enc_dtype, seed=0)
        rng = device if is_cuda(device) else "cpu"
        checkpoint = in_memory_checkpoint(qwen, meta_unet(shapes), lora_rank=args.lora_rank, seed=0, rng_device=rng)
        enc = build_reference_encoder(qwen, tokenizer, image_processor, checkpoint, device=device, dtype=enc_dtype)
        del qwen  # lm_head goes with it: ours never computes logits
        state.update(checkpoint=checkpoint, enc=enc)
        meta["encoder_params"] = sum(p.numel() for p in enc.parameters())
        run.log(
            f"encoder: {_count(meta['encoder_params'])} parameters (trunk without lm_head + final layer + projector), "
            f"resident {_gib(allocated_gib(device))}"
        )

    with run.stage("encode: ours"):
        enc = state["enc"]
        for g in groups:  # warm-up: one full round (cheap), so no first-call cost lands in one group's number
            prefix = enc.encode_prefix(g)
            for p in prompts:
                enc.encode_caption(prefix, p)
        enc.encode_uncond()
        enc._uncond_cache.clear()
        reset_peak(device)
        E["resident_gib"] = allocated_gib(device)
        first, extra, conds = [], [], {}
        sync(device)
        t_all = time.perf_counter()
        for gi, g in enumerate(groups):
            sync(device)
            t0 = time.perf_counter()
            prefix = enc.encode_prefix(g)
            conds[(gi, prompts[0])] = enc.encode_caption(prefix, prompts[0])
            sync(device)
            t1 = time.perf_counter()
            for p in prompts[1:]:
                conds[(gi, p)] = enc.encode_caption(prefix, p)
            sync(device)
            first.append(t1 - t0)
            if P > 1:
                extra.append((time.perf_counter() - t1) / (P - 1))
        t_u = time.perf_counter()
        uncond = enc.encode_uncond()
        sync(device)
        E["ours_uncond_ms"] = 1000 * (time.perf_counter() - t_u)
        E["ours_total_s"] = time.perf_counter() - t_all
        E["ours_group_ms"] = 1000 * sum(first) / len(first)
        E["ours_group_ms_samples"] = [1000 * x for x in first]
        E["ours_extra_prompt_ms"] = 1000 * sum(extra) / len(extra) if extra else None
        E["extra_prompt_fraction"] = E["ours_extra_prompt_ms"] / E["ours_group_ms"] if extra else None
        E["prefix_tokens"] = int(prefix.length)
        PK["encode_ours"] = peak_gib(device)
        state["ref_embeds"] = {k: RefEmbeds(v, uncond) for k, v in conds.items()}
        del prefix  # its K/V cache lives on the card
        run.log(
            f"ours: group (prefix + first prompt) {E['ours_group_ms']:.1f} ms, extra prompt "
            f"{E['ours_extra_prompt_ms'] or float('nan'):.1f} ms, uncond {E['ours_uncond_ms']:.1f} ms, "
            f"{G}x{P} total {E['ours_total_s']:.2f} s, prefix {E['prefix_tokens']} tokens, peak {_gib(PK['encode_ours'])}"
        )

    with run.stage("encode: official path"):
        enc = state["enc"]
        qwen2, _, _ = build_qwen2vl(qwen_size, device, enc_dtype, seed=0)  # the official code's second copy
        lm2 = qwen2.model.language_model
        lm2.layers = lm2.layers[:-1]
        qwen2.model.visual.load_state_dict(enc.visual.state_dict())
        lm2.load_state_dict(enc.language_model.state_dict())  # lm_head stays tied to embed_tokens
        official = InMemoryOfficialPath(qwen2, enc)
        state["official"] = official
        official.condition(groups[0], prompts[0])  # warm-up
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        out = {(gi, p): official.condition(g, p) for gi, g in enumerate(groups) for p in prompts}
        sync(device)
        E["official_total_s"] = time.perf_counter() - t0
        E["official_condition_ms"] = 1000 * E["official_total_s"] / n_jobs
        PK["encode_official"] = peak_gib(device)
        E["encode_speedup"] = E["official_total_s"] / E["ours_total_s"]
        E["max_abs_diff"] = max(
            max(
                (out[k][0].float() - state["ref_embeds"][k].cond.float()).abs().max().item(),
                (out[k][1].float() - state["ref_embeds"][k].uncond.float()).abs().max().item(),
            )
            for k in out
        )
        run.log(
            f"official: {E['official_condition_ms']:.1f} ms per condition (cond + uncond, full prompt, per-image "
            f"vision, logits), total {E['official_total_s']:.2f} s, peak {_gib(PK['encode_official'])}; "
            f"encode_speedup {E['encode_speedup']:.2f}, max_abs_diff {E['max_abs_diff']:.3g}"
        )

    with run.stage("release the MLLM"):
        # two-phase design: the MLLM leaves the card before SDXL arrives (kept in host memory here,
        # only because the official path needs it back later)
        for key in ("enc", "official"):
            if key in state:
                (state[key].model if key == "official" else state[key]).to("cpu")
        if "enc" in state:
            state["enc"]._uncond_cache.clear()
        gc.collect()
        reset_peak(device)
        meta["resident_after_release_gib"] = allocated_gib(device)

    # ---- phase 2: generate (SDXL alone on the card) -------------------------------------------
    with run.stage("build SDXL"):
        sdxl = build_sdxl(shapes, device, sdxl_dtype, seed=0)
        sdxl.scheduler = make_scheduler("euler", sdxl.scheduler.config)  # as EasyRefPipeline.from_pretrained
        raw_unet = sdxl.unet
        raw_unet.set_attn_processor(AttnProcessor2_0())
        state.update(sdxl=sdxl, raw_unet=raw_unet)
        meta["unet_params"] = sum(p.numel() for p in raw_unet.parameters())
        meta["sdxl_resident_gib"] = allocated_gib(device)
        run.log(
            f"SDXL: UNet {_count(meta['unet_params'])} parameters, {len(raw_unet.attn_processors)} attention layers, "
            f"pipeline resident {_gib(meta['sdxl_resident_gib'])}"
        )

    seeds = iter(range(1000, 10**6))

    def step_fn(context_tokens: int):
        """One UNet call on a CFG batch, with exactly the pipeline's arguments (same compiled graph)."""
        unet = state["raw_unet"]
        cfg = unet.config
        lat = args.size // state["sdxl"].vae_scale_factor  # the pipeline's latent side (128 at 1024² for SDXL)
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        g = torch.Generator(device).manual_seed(0)

        def rnd(*shape):
            return torch.randn(shape, generator=g, device=device).to(sdxl_dtype)

        with torch.inference_mode():  # inference tensors, like the pipeline's: else dynamo guards recompile
            sample = rnd(2, cfg.in_channels, lat, lat)
            context = rnd(2, context_tokens, cfg.cross_attention_dim)
            t = torch.tensor(999.0, device=device)  # as the scheduler: a 0-dim float32 tensor
            added = {
                "text_embeds": rnd(2, pooled),
                "time_ids": torch.tensor(
                    [[args.size, args.size, 0, 0, args.size, args.size]] * 2, device=device, dtype=sdxl_dtype
                ),
            }

        @torch.inference_mode()
        def step():
            return state["sdxl"].unet(
                sample,
                t,
                encoder_hidden_states=context,
                timestep_cond=None,
                cross_attention_kwargs=None,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]

        return step

    def record_step(key: str, tokens: int, kv_cache: bool = False) -> None:
        step = step_fn(tokens)
        with adapter_mod.reference_kv_cache(state["raw_unet"], enabled=kv_cache):
            r = time_calls(step, device, warmup=args.warmup, repeat=args.repeat)
        ST[key] = 1000 * r["median"]
        ST[key + "_spread"] = [1000 * r["min"], 1000 * r["max"]]
        run.log(f"UNet step {key}: {ST[key]:.1f} ms (min {1000 * r['min']:.1f}, max {1000 * r['max']:.1f})")

    def record_images(key: str, image) -> None:
        r = time_calls(image, device, warmup=1, repeat=args.images)
        IM[key] = r["median"]
        IM[key + "_samples"] = r["samples"]
        run.log(f"image {key}: {IM[key]:.2f} s per image ({args.steps} steps, {args.size}²)")

    common = dict(
        num_inference_steps=args.steps, guidance_scale=5.0, width=args.size, height=args.size, output_type="np"
    )
    nonfinite = run.data.setdefault("nonfinite_images", {})

    @torch.inference_mode()
    def plain_image():
        i = next(seeds)
        state["sdxl"](prompt=prompts[i % P], generator=torch.Generator("cpu").manual_seed(i), **common)

    @torch.inference_mode()
    def ours_image():
        i = next(seeds)
        gi, p = (i // P) % G, prompts[i % P]
        request = GenerationRequest(
            prompt=p,
            ref_embeds=state["ref_embeds"][(gi, p)],
            seed=i,
            steps=args.steps,
            width=args.size,
            height=args.size,
        )
        try:
            state["ours"].generate([request])
        except NonFiniteImages:  # random fp16 weights may overflow: the work was done all the same
            nonfinite["ours"] = nonfinite.get("ours", 0) + 1

    # plain SDXL, eager
    with run.stage("plain SDXL, eager"):
        record_step("plain_eager", 77)
        reset_peak(device)
        record_images("plain_eager", plain_image)
        PK["generate_plain"] = peak_gib(device)

    # ours, eager: LoRA merged, decoupled attention, reference K/V once per image
    with run.stage("easyref (ours), eager"):
        choice = _install_ours(state, device, args)
        meta["attention"] = {"backend": choice.backend, "reason": choice.reason}
        ours = EasyRefPipeline(
            state["sdxl"],
            state["checkpoint"],
            mllm_path="<in-memory>",
            device=device,
            sdxl_dtype=sdxl_dtype,
            encoder_dtype=enc_dtype,
            attention=choice,
        )
        state["ours"] = ours
        tokens = 77 + state["checkpoint"].num_tokens
        record_step("ours_eager", tokens, kv_cache=True)
        reset_peak(device)
        record_images("ours_eager", ours_image)
        PK["generate_ours"] = peak_gib(device)

    # official path, eager: LoRA on the fly, explicit attention maps, conditions encoded per call
    with run.stage("official path, eager"):
        raw_unet, ckpt = state["raw_unet"], state["checkpoint"]
        if ckpt.has_lora:
            adapter_mod.merge_lora(raw_unet, ckpt.lora, scale=-1.0)  # back to the base weights
        raw_unet.set_attn_processor(official_processors(raw_unet, ckpt, device, sdxl_dtype))
        record_step("official_eager", 77 + ckpt.num_tokens)
        official = state["official"]
        official.model.to(device)  # the official habit: both Qwen2-VL copies and SDXL resident together
        official.enc.to(device)
        sdxl = state["sdxl"]
        cond_s: list[float] = []

        @torch.inference_mode()
        def official_image():
            i = next(seeds)
            gi, p = (i // P) % G, prompts[i % P]
            sync(device)
            t0 = time.perf_counter()
            cond, unc = official.condition(groups[gi], p)
            sync(device)
            cond_s.append(time.perf_counter() - t0)
            pe, ne, pp, npp = sdxl.encode_prompt(
                p, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            pe = torch.cat([pe, cond[None].to(pe)], 1)
            ne = torch.cat([ne, unc[None].to(ne)], 1)
            sdxl(
                prompt_embeds=pe,
                negative_prompt_embeds=ne,
                pooled_prompt_embeds=pp,
                negative_pooled_prompt_embeds=npp,
                generator=torch.Generator("cpu").manual_seed(i),
                **common,
            )
            return cond_s[-1]

        reset_peak(device)
        r = time_calls(official_image, device, warmup=1, repeat=args.images)
        PK["official_all_resident"] = peak_gib(device)
        # generation alone: the per-call encode is counted once, from the encode phase
        gen = [t - c for t, c in zip(r["samples"], cond_s[1:], strict=True)]
        IM["official_eager"] = statistics.median(gen)
        IM["official_eager_samples"] = gen
        IM["official_condition_in_call_s"] = cond_s[1:]
        run.log(
            f"image official_eager: {IM['official_eager']:.2f} s per image without its encode "
            f"(+{1000 * sum(cond_s[1:]) / len(cond_s[1:]):.0f} ms encode in the call), peak with everything "
            f"resident {_gib(PK['official_all_resident'])}"
        )
        official.model.to("cpu")  # off the card before the compiled stages (the closure above still holds them)
        official.enc.to("cpu")
        del official_image
        state.pop("official", None)
        state.pop("enc", None)
        gc.collect()
        reset_peak(device)

    # compiled: plain, then ours (each its own fresh dynamo cache)
    if args.skip_compile:
        run.data["skipped"].append("compile: --skip-compile")
    elif run.allows("compile plain", 240):
        with run.stage("plain SDXL, compiled"):
            raw_unet = state["raw_unet"]
            raw_unet.set_attn_processor(AttnProcessor2_0())  # base weights (LoRA unmerged above)
            before = dynamo_counts()
            compile_unet(state["sdxl"], raw_unet, args)
            step = step_fn(77)
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            CO["plain_first_call_s"] = time.perf_counter() - t0
            run.log(f"compiled plain UNet in {CO['plain_first_call_s']:.1f} s")
            record_step("plain_compiled", 77)
            record_images("plain_compiled", plain_image)
            CO["plain_dynamo"] = dynamo_delta(before)
        if run.allows("compile ours", 150):
            with run.stage("easyref (ours), compiled"):
                state["sdxl"].unet = state["raw_unet"]
                _install_ours(state, device, args)
                before = dynamo_counts()
                compile_unet(state["sdxl"], state["raw_unet"], args)
                state["ours"].compiled = {
                    "enabled": True,
                    "reason": f"torch.compile ({args.compile_backend}, {args.compile_mode})",
                }
                tokens = 77 + state["checkpoint"].num_tokens
                step = step_fn(tokens)
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                CO["ours_first_call_s"] = time.perf_counter() - t0
                run.log(f"compiled ours UNet in {CO['ours_first_call_s']:.1f} s")
                record_step("ours_compiled", tokens)
                reset_peak(device)
                record_images("ours_compiled", ours_image)
                PK["generate_ours_compiled"] = peak_gib(device)
                CO["ours_dynamo"] = dynamo_delta(before)

    run.save(final=True)
    summarize(run.data)
    run.save(final=True)  # with the ratios


def _install_ours(state: dict, device: str, args):
    return install_easyref(state["sdxl"], state["checkpoint"], device=device, attention=args.attention)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _count(n) -> str:
    return "?" if n is None else (f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M")


def _gib(x) -> str:
    return "n/a (no CUDA)" if x is None else f"{x:.2f} GiB"


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(d: dict) -> None:
    """Ratios into ``d["totals_s"]``/``d["ratios"]``, then the markdown block and the key=value lines.
    Needs only the results dict, so ``--from-json`` can print it again from a (partial) saved run."""
    m = d["meta"]
    E, ST, IM, PK, T, R = d["encode"], d["unet_step_ms"], d["image_s"], d["peak_gib"], d["totals_s"], d["ratios"]  # noqa: N806
    G, P = m["groups"], m["prompts"]  # noqa: N806
    n = G * P
    ours_enc, off_enc = E.get("ours_total_s"), E.get("official_total_s")

    def total(enc_s, image_key):
        img = IM.get(image_key)
        return None if img is None or enc_s is None else enc_s + n * img

    T["plain_eager"] = n * IM["plain_eager"] if "plain_eager" in IM else None
    T["plain_compiled"] = n * IM["plain_compiled"] if "plain_compiled" in IM else None
    T["ours_eager"] = total(ours_enc, "ours_eager")
    T["ours_compiled"] = total(ours_enc, "ours_compiled")
    T["official_eager"] = total(off_enc, "official_eager")

    per_image = {k: (v / n if v is not None else None) for k, v in T.items()}
    R["overhead_vs_plain"] = _ratio(per_image["ours_compiled"], per_image["plain_compiled"])
    R["overhead_vs_plain_generate"] = _ratio(IM.get("ours_compiled"), IM.get("plain_compiled"))
    R["overhead_vs_plain_step"] = _ratio(ST.get("ours_compiled"), ST.get("plain_compiled"))
    R["overhead_vs_plain_eager"] = _ratio(per_image["ours_eager"], per_image["plain_eager"])
    R["overhead_vs_plain_step_eager"] = _ratio(ST.get("ours_eager"), ST.get("plain_eager"))
    R["speedup_vs_official"] = _ratio(T["official_eager"], T["ours_eager"])
    R["speedup_vs_official_compiled"] = _ratio(T["official_eager"], T["ours_compiled"])
    R["encode_speedup"] = E.get("encode_speedup")
    R["extra_prompt_fraction"] = E.get("extra_prompt_fraction")
    peaks = [PK.get("encode_ours"), PK.get("generate_ours")]
    R["peak_gib"] = max(peaks) if all(p is not None for p in peaks) else None

    def f(x, spec=".1f", unit=""):
        return "—" if x is None else f"{x:{spec}}{unit}"

    card = m.get("card", m["device"])
    print()
    print("=" * 100)
    print(
        f"### GPU: {card}, {m['date']}"
        if m.get("card")
        else f"### {m['device']} ({m['shapes']} shapes: a test of the script, not a result), {m['date']}"
    )
    print()
    print(
        f"torch {m['torch']}"
        + (f" (CUDA {m['cuda']})" if m.get("cuda") else "")
        + f", transformers {m['transformers']}, "
        f"diffusers {m['diffusers']}; random weights, {m['shapes']} shapes (SDXL-base UNet {_count(m.get('unet_params'))}, "
        f"Qwen2-VL encoder {_count(m.get('encoder_params'))}), SDXL {m['sdxl_dtype']}, Qwen2-VL {m['encoder_dtype']}, "
        f"{m['size']}², {m['steps']} Euler steps, CFG 5, batch 1; {G} groups × {P} prompts, "
        f"{m['refs']} references of {m['ref_side']}px; LoRA rank {m['lora_rank']}; attention {m.get('attention', {}).get('backend', '?')}; "
        + (
            f"torch.compile backend {m['compile']['backend']}, mode {m['compile']['mode']}."
            if m["compile"]
            else "eager only."
        )
    )
    print()
    print("```")
    print(m["command"])
    print("```")
    print()
    rows = [
        ("UNet ms per CFG step, eager", f(ST.get("plain_eager")), f(ST.get("ours_eager")), f(ST.get("official_eager"))),
        ("UNet ms per CFG step, compiled", f(ST.get("plain_compiled")), f(ST.get("ours_compiled")), "—"),
        (
            "s per image (conditions ready), eager",
            f(IM.get("plain_eager"), ".2f"),
            f(IM.get("ours_eager"), ".2f"),
            f(IM.get("official_eager"), ".2f"),
        ),
        (
            "s per image (conditions ready), compiled",
            f(IM.get("plain_compiled"), ".2f"),
            f(IM.get("ours_compiled"), ".2f"),
            "—",
        ),
        (
            "encode ms per group (prefix + first prompt)",
            "—",
            f(E.get("ours_group_ms")),
            f(E.get("official_condition_ms")),
        ),
        ("encode ms per extra prompt", "—", f(E.get("ours_extra_prompt_ms")), f(E.get("official_condition_ms"))),
        (
            f"{G}×{P} total s (encode + {n} images), eager",
            f(T["plain_eager"]),
            f(T["ours_eager"]),
            f(T["official_eager"]),
        ),
        (f"{G}×{P} total s, compiled", f(T["plain_compiled"]), f(T["ours_compiled"]), "—"),
        (
            "s per image incl. encode, eager",
            f(per_image["plain_eager"], ".2f"),
            f(per_image["ours_eager"], ".2f"),
            f(per_image["official_eager"], ".2f"),
        ),
        ("peak GiB, encode phase", "—", f(PK.get("encode_ours"), ".2f"), f(PK.get("encode_official"), ".2f")),
        (
            "peak GiB, generate phase",
            f(PK.get("generate_plain"), ".2f"),
            f(PK.get("generate_ours"), ".2f"),
            f(PK.get("official_all_resident"), ".2f") + " (all resident)"
            if PK.get("official_all_resident") is not None
            else "—",
        ),
    ]
    print(table(rows, ("", "plain SDXL", "easyref (ours)", "official path")))
    print()
    print(
        "Official path: both conditions re-encoded per image (full prompt, per-image vision loop, logits), "
        "LoRA on the fly, materialised attention maps; its per-image encode is counted once in the totals, "
        "from the encode phase. Totals = measured encode of all conditions + images × measured median "
        f"seconds per image ({m['images_timed']} timed per path and mode, after one warm-up)."
    )
    print()

    def verdict(x, ok):
        return "—" if x is None else ("yes" if ok(x) else "**no**")

    ov, sp, ef, pk = R["overhead_vs_plain"], R["speedup_vs_official"], R["extra_prompt_fraction"], R["peak_gib"]
    targets = [
        (
            "EasyRef per image ≤ 1.05× plain SDXL, compiled (incl. amortised encode)",
            f(ov, ".3f", "×"),
            verdict(ov, lambda x: x <= 1.05),
        ),
        (
            "  same, generation only / UNet step only",
            f"{f(R['overhead_vs_plain_generate'], '.3f', '×')} / {f(R['overhead_vs_plain_step'], '.3f', '×')}",
            "",
        ),
        (
            f"≥ 2× the official path's throughput, {G}×{P} (ours eager / compiled)",
            f"{f(sp, '.2f', '×')} / {f(R['speedup_vs_official_compiled'], '.2f', '×')}",
            verdict(sp, lambda x: x >= 2),
        ),
        (
            "extra prompt ≤ 15% of a full encode",
            f(None if ef is None else 100 * ef, ".1f", "%"),
            verdict(ef, lambda x: x <= 0.15),
        ),
        (
            "peak GPU memory ≤ 9.5 GiB (max of encode and generate phase)",
            f(pk, ".2f", " GiB"),
            verdict(pk, lambda x: x <= 9.5),
        ),
    ]
    print(table(targets, ("target", "measured", "met")))
    if d["skipped"] or d["errors"] or d.get("nonfinite_images"):
        print()
        for s in d["skipped"]:
            print(f"- skipped: {s}")
        for k, v in d["errors"].items():
            print(f"- error in {k}: {v}")
        if d.get("nonfinite_images"):
            print(f"- non-finite images (random fp16 weights overflowing; timing unaffected): {d['nonfinite_images']}")
    if d["compile"]:
        print()
        print(f"compile: {json.dumps(d['compile'], default=str)}")
    print("=" * 100)

    def kv(key, value, spec):
        print(f"{key}={'nan' if value is None else format(value, spec)}")

    for key in ("plain_eager", "ours_eager", "official_eager", "plain_compiled", "ours_compiled"):
        kv(f"unet_ms_{key}", ST.get(key), ".2f")
    for key in ("plain_eager", "ours_eager", "official_eager", "plain_compiled", "ours_compiled"):
        kv(f"image_s_{key}", IM.get(key), ".3f")
    kv("encode_group_ms", E.get("ours_group_ms"), ".1f")
    kv("encode_extra_prompt_ms", E.get("ours_extra_prompt_ms"), ".1f")
    kv("encode_official_condition_ms", E.get("official_condition_ms"), ".1f")
    kv("max_abs_diff", E.get("max_abs_diff"), ".3g")
    for key in (
        "encode_ours",
        "encode_official",
        "generate_plain",
        "generate_ours",
        "generate_ours_compiled",
        "official_all_resident",
    ):
        kv(f"peak_gib_{key}", PK.get(key), ".2f")
    kv("peak_gib", R["peak_gib"], ".2f")
    kv("encode_speedup", R["encode_speedup"], ".2f")
    kv("extra_prompt_fraction", R["extra_prompt_fraction"], ".3f")
    kv("overhead_vs_plain_step", R["overhead_vs_plain_step"], ".3f")
    kv("overhead_vs_plain_generate", R["overhead_vs_plain_generate"], ".3f")
    kv("overhead_vs_plain_eager", R["overhead_vs_plain_eager"], ".3f")
    kv("speedup_vs_official_compiled", R["speedup_vs_official_compiled"], ".2f")
    kv("overhead_vs_plain", R["overhead_vs_plain"], ".3f")
    kv("speedup_vs_official", R["speedup_vs_official"], ".2f")


if __name__ == "__main__":
    main()
