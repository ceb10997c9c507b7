"""Encode benchmark: the official encode path vs ours, side by side in one run.

Official path (as ``EasyRef.get_image_embeds`` in the official code): every prompt re-encodes the
whole prompt, the vision tower runs image by image, the trunk computes ``lm_head`` logits, and the
unconditional embedding is recomputed on every call. Ours: vision tower batched, system + images +
instruction encoded once per group (prefix K/V reused), per prompt only the caption suffix and the
final layer, no logits, uncond once per process.

    python bench/encode.py                       # CPU, mid-size random Qwen2-VL, 4 groups x 4 prompts
    python bench/encode.py --device cuda --size full --dtype bfloat16

Prints a table, then ``max_abs_diff=<x>`` (conditions of the two paths) and last ``encode_speedup=<x>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QWEN_SHAPES, sync, table, timed  # noqa: E402

from easyref_cli.constants import INSTRUCTION  # noqa: E402
from easyref_cli.model import compat  # noqa: E402
from easyref_cli.model.encoder import ImageBatch, black_image  # noqa: E402

PROMPTS = [
    "a watercolor painting of a lighthouse at dusk",
    "a knight riding through a snowy forest, cinematic lighting",
    "a cup of coffee on a wooden table",
    "portrait of an old fisherman, highly detailed",
    "a city skyline at night with neon reflections",
    "a cat sleeping on a windowsill",
]


def build(root: Path, size: str):
    from easyref_cli.model.checkpoint import split_state_dict
    from easyref_cli.tiny import build_tiny_qwen2vl, build_tiny_sdxl, official_state_dict

    text, vision, vocab = QWEN_SHAPES[size]
    mllm = build_tiny_qwen2vl(root / "qwen", text_overrides=text, vision_overrides=vision, vocab_size=vocab)
    sdxl = build_tiny_sdxl(root / "sdxl")
    return mllm, split_state_dict(official_state_dict(mllm, sdxl, lora=False), source="bench")


def reference_images(n_groups: int, n_refs: int, side: int):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(n_groups):
        imgs = []
        for _ in range(n_refs):
            arr = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
            imgs.append(Image.fromarray(arr))
        groups.append(imgs)
    return groups


class OfficialPath:
    """The official encode, re-implemented for timing: same maths, the official habits."""

    def __init__(self, mllm_path: Path, encoder, device: str, dtype: torch.dtype):
        from transformers import Qwen2VLForConditionalGeneration

        # The official code loads Qwen2-VL a second time for the trunk, with the last layer dropped.
        model = Qwen2VLForConditionalGeneration.from_pretrained(mllm_path, dtype=dtype, attn_implementation="sdpa")
        model.model.language_model.layers = model.model.language_model.layers[:-1]
        self.model = model.to(device).eval()
        self.enc = encoder  # final layer + projector weights, preprocessing

    @torch.inference_mode()
    def encode(self, images, caption: str) -> torch.Tensor:
        enc, lm = self.enc, self.model.model.language_model
        batch = enc.prepare_images(images)
        feats = []
        start = 0
        for i, (t, h, w) in enumerate(batch.grid_thw.tolist()):  # per-image vision loop
            n = t * h * w
            one = ImageBatch(batch.pixel_values[start : start + n], batch.grid_thw[i : i + 1], batch.token_counts[i : i + 1])
            feats.append(compat.vision_features(self.model.model.visual, one.pixel_values.to(enc.device), one.grid_thw.to(enc.device)))
            start += n
        ids = enc.tokenize(batch.token_counts, caption, INSTRUCTION).to(enc.device)
        emb = lm.embed_tokens(ids).clone()
        emb[ids == enc.image_token_id] = torch.cat(feats).to(emb.dtype)
        hidden = lm(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).last_hidden_state
        self.model.lm_head(hidden)  # the official trunk computed logits it never used
        return enc.projector(enc.final(hidden))[0]

    def condition(self, images, caption):
        """What one official ``generate`` call computes: cond and, again, uncond."""
        return self.encode(images, caption), self.encode([black_image()], "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--size", default="mid", choices=list(QWEN_SHAPES))
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--refs", type=int, default=3, help="reference images per group")
    ap.add_argument("--image-size", type=int, default=512)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    from easyref_cli.model.encoder import ReferenceEncoder

    with tempfile.TemporaryDirectory() as tmp:
        mllm, checkpoint = build(Path(tmp), args.size)
        ours = ReferenceEncoder.from_pretrained(mllm, checkpoint, device=args.device, dtype=dtype)
        official = OfficialPath(mllm, ours, args.device, dtype)
    groups = reference_images(args.groups, args.refs, args.image_size)
    prompts = (PROMPTS * 4)[: args.prompts]

    # warm-up both paths once
    official.condition(groups[0], prompts[0])
    ours.encode_caption(ours.encode_prefix(groups[0]), prompts[0])
    ours._uncond_cache.clear()

    def run_official():
        return [[official.condition(g, p) for p in prompts] for g in groups]

    first_prompt_s, extra_prompt_s = [], []

    def run_ours():
        out = []
        for g in groups:
            sync(args.device)
            t0 = __import__("time").perf_counter()
            prefix = ours.encode_prefix(g)
            conds = [ours.encode_caption(prefix, prompts[0])]
            sync(args.device)
            t1 = __import__("time").perf_counter()
            for p in prompts[1:]:
                conds.append(ours.encode_caption(prefix, p))
            sync(args.device)
            t2 = __import__("time").perf_counter()
            first_prompt_s.append(t1 - t0)
            if len(prompts) > 1:
                extra_prompt_s.append((t2 - t1) / (len(prompts) - 1))
            out.append([(c, ours.encode_uncond()) for c in conds])
        return out

    t_official, official_out = timed(run_official, args.device)
    t_ours, ours_out = timed(run_ours, args.device)

    diff = max(
        max((a[0].float() - b[0].float()).abs().max().item(), (a[1].float() - b[1].float()).abs().max().item())
        for ga, gb in zip(official_out, ours_out)
        for a, b in zip(ga, gb)
    )
    n = args.groups * args.prompts
    full = sum(first_prompt_s) / len(first_prompt_s)
    extra = sum(extra_prompt_s) / len(extra_prompt_s) if extra_prompt_s else float("nan")
    rows = [
        ("official (per-prompt re-encode, per-image vision, logits, uncond per call)", f"{t_official:.2f}", f"{1000 * t_official / n:.1f}"),
        ("easyref (batched vision, prefix once per group, no logits, uncond once)", f"{t_ours:.2f}", f"{1000 * t_ours / n:.1f}"),
    ]
    print(f"Qwen2-VL size={args.size} device={args.device} dtype={args.dtype}: {args.groups} groups x {args.prompts} prompts, {args.refs} refs of {args.image_size}px")
    print(table(rows, ("path", "total s", "ms per condition")))
    print(f"ours: first prompt of a group (full encode) {1000 * full:.1f} ms, each extra prompt {1000 * extra:.1f} ms "
          f"({100 * extra / full:.1f}% of a full encode)")
    print(f"extra_prompt_fraction={extra / full:.3f}")
    print(f"max_abs_diff={diff:.3g}")
    print(f"encode_speedup={t_official / t_ours:.2f}")


if __name__ == "__main__":
    main()
