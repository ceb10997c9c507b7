"""VAE decode benchmark: SDXL's float32 upcast (``force_upcast: true``) vs an fp16-safe VAE decoded in float16
(``force_upcast: false``, e.g. madebyollin/sdxl-vae-fp16-fix given as ``--vae``), side by side in one run.

In float16, ``StableDiffusionXLPipeline.__call__`` casts the VAE to float32 for the decode, decodes, and casts
it back, whenever ``vae.config.force_upcast`` is true (SDXL's own VAE overflows in float16); a VAE whose
config says ``force_upcast: false`` is decoded in float16 as it is. (bfloat16 never upcasts: both paths
would be the same.) The two paths here are the same random VAE, differing only in that flag, inside the
real diffusers pipeline — tiny UNet and text encoders, 1 step without CFG, so that the decode dominates.
Each round times the whole call and, by wrapping ``vae.decode``, the decode alone.

Both paths are warmed up once, then timed in interleaved rounds (A B, then B A, ...); every ratio is the
median of the per-round ratios. From the repository root:

    python -m bench.vae_upcast                                       # CPU: tiny VAE, 64 px, 6 rounds
    python -m bench.vae_upcast --device cuda --vae-size full --size 1024 --batch 4

On a CPU without native float16 arithmetic, float16 kernels are emulated and far slower than float32, so
there the upcast *wins*; the saving this flag exists for is a GPU's (half the VAE's activation memory,
faster fp16 convolutions, no per-batch casts of the VAE). Prints a table of seconds per path, a table of
per-round ratios, ``max_abs_diff=<x>`` (the two paths' images, 0-1 scale) and last
``fp16_decode_speedup=<x>`` (upcast / fp16 call seconds: above 1, skipping the upcast is faster).
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

from ._common import RATIO_HEADER, SDXL_SHAPES, build_sdxl, interleaved, median_ratio, ratio_row, seconds_row, sync
from ._common import table as format_table


def _pipelines(args, dtype):
    """Two SDXL pipelines sharing the tiny UNet/text encoders, each with the same random VAE of
    ``--vae-size``, configured ``force_upcast`` true and false."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    base = build_sdxl("tiny", args.device, dtype)
    torch.manual_seed(0)
    upcast = AutoencoderKL(**{**SDXL_SHAPES[args.vae_size]["vae"], "force_upcast": True})
    fp16_safe = AutoencoderKL.from_config({**upcast.config, "force_upcast": False})
    fp16_safe.load_state_dict(upcast.state_dict())
    pipes = {}
    for name, vae in (("upcast", upcast), ("fp16", fp16_safe)):
        vae = vae.to(device=args.device, dtype=dtype).eval().requires_grad_(False)
        pipes[name] = StableDiffusionXLPipeline(**{**base.components, "vae": vae})
        pipes[name].set_progress_bar_config(disable=True)
    return pipes


def _timed_decode(pipe, device: str, seconds: list[float], dtypes: set) -> None:
    """Record the seconds of every ``vae.decode`` call of ``pipe`` in ``seconds``, the VAE's dtype then in ``dtypes``."""
    decode = pipe.vae.decode

    def timed(*a, **kw):
        dtypes.add(str(pipe.vae.dtype).removeprefix("torch."))
        sync(device)
        t0 = time.perf_counter()
        out = decode(*a, **kw)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        return out

    pipe.vae.decode = timed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.vae_upcast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument(
        "--vae-size", default="tiny", choices=list(SDXL_SHAPES), help="tiny: fast-test shapes; full: SDXL's"
    )
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=1, help="images per call (decoded together)")
    ap.add_argument("--rounds", type=int, default=6, help="timed interleaved rounds (default 6)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    from easyref_cli.model.compat import quiet_dtype_casts

    quiet_dtype_casts()  # diffusers logs an empty "kept in float32" warning on each cast of the upcast path
    warnings.filterwarnings("ignore", category=FutureWarning)  # and `upcast_vae` is deprecated
    pipes = _pipelines(args, getattr(torch, args.dtype))
    decode_s: dict[str, list[float]] = {name: [] for name in pipes}
    decode_dtype: dict[str, set] = {name: set() for name in pipes}
    images = {}
    for name, pipe in pipes.items():
        _timed_decode(pipe, args.device, decode_s[name], decode_dtype[name])

    def call(name: str):
        def run():
            out = pipes[name](
                prompt="a lighthouse at dusk", num_inference_steps=1, guidance_scale=1.0, width=args.size,
                height=args.size, num_images_per_prompt=args.batch, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0),
            )  # fmt: skip
            images[name] = out.images
            assert pipes[name].vae.dtype == getattr(torch, args.dtype)  # cast back after an upcast

        return run

    paths = {"upcast": call("upcast"), "fp16": call("fp16")}
    with torch.inference_mode():
        for fn in paths.values():
            fn()  # warm-up, untimed
        for samples in decode_s.values():
            samples.clear()
        times = interleaved(paths, args.rounds, args.device)
    dt = {n: "/".join(sorted(d)) for n, d in decode_dtype.items()}
    cast = "VAE cast up, decode, cast back" if dt["upcast"] != args.dtype else f"no upcast in {args.dtype}"
    label = {"upcast": f"force_upcast=true (decode in {dt['upcast']}: {cast})",
             "fp16": f"force_upcast=false (decode in {dt['fp16']})"}  # fmt: skip
    rows = [seconds_row(f"call: {label[n]}", times[n], args.batch) for n in paths]
    flag = {"upcast": "true", "fp16": "false"}
    rows += [
        seconds_row(f"vae.decode only (force_upcast={flag[n]}), in {dt[n]}", decode_s[n], args.batch) for n in paths
    ]
    ratios = [
        ratio_row("fp16_decode_speedup (call: upcast / fp16)", times["upcast"], times["fp16"], ".2f"),
        ratio_row("decode only (upcast / fp16)", decode_s["upcast"], decode_s["fp16"], ".2f"),
    ]
    diff = float(abs(images["upcast"] - images["fp16"]).max())
    print(
        f"VAE size={args.vae_size}, {args.size}px x {args.batch}, device={args.device} dtype={args.dtype}, tiny UNet "
        f"and text encoders, 1 step without CFG; {args.rounds} interleaved rounds after a warm-up; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(format_table(rows, ("path", "median s", "min s", "max s", "ms per image (median)")))
    print()
    print(format_table(ratios, RATIO_HEADER))
    print()
    print(f"max_abs_diff={diff:.3g}")
    print(f"fp16_decode_speedup={median_ratio(times['upcast'], times['fp16']):.2f}")


if __name__ == "__main__":
    main()
