"""The official EasyRef code's habits, re-implemented for timing (same maths): its encode path and its
UNet attention processors. Shared by ``bench.encode``, ``bench.generate`` and ``bench.gpu``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class OfficialPath:
    """The official encode (as ``EasyRef.get_image_embeds``): every prompt re-encodes the whole prompt,
    the vision tower runs image by image, the trunk computes ``lm_head`` logits, and every call
    recomputes the unconditional embedding. ``encoder`` (a ``ReferenceEncoder``) lends its final
    layer, projector and preprocessing."""

    def __init__(self, mllm_path: Path, encoder, device: str, dtype: torch.dtype):
        from transformers import Qwen2VLForConditionalGeneration

        # The official code loads Qwen2-VL a second time for the trunk, with the last layer dropped.
        model = Qwen2VLForConditionalGeneration.from_pretrained(mllm_path, dtype=dtype, attn_implementation="sdpa")
        model.model.language_model.layers = model.model.language_model.layers[:-1]
        self.model = model.to(device).eval()
        self.enc = encoder  # final layer + projector weights, preprocessing

    @torch.inference_mode()
    def encode(self, images, caption: str) -> torch.Tensor:
        from easyref_cli.constants import INSTRUCTION
        from easyref_cli.model import compat
        from easyref_cli.model.encoder import ImageBatch

        enc, lm = self.enc, self.model.model.language_model
        batch = enc.prepare_images(images)
        feats = []
        start = 0
        for i, (t, h, w) in enumerate(batch.grid_thw.tolist()):  # per-image vision loop
            n = t * h * w
            one = ImageBatch(
                batch.pixel_values[start : start + n], batch.grid_thw[i : i + 1], batch.token_counts[i : i + 1]
            )
            feats.append(
                compat.vision_features(
                    self.model.model.visual, one.pixel_values.to(enc.device), one.grid_thw.to(enc.device)
                )
            )
            start += n
        ids = enc.tokenize(batch.token_counts, caption, INSTRUCTION).to(enc.device)
        emb = lm.embed_tokens(ids).clone()
        emb[ids == enc.image_token_id] = torch.cat(feats).to(emb.dtype)
        hidden = lm(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).last_hidden_state
        self.model.lm_head(hidden)  # the official trunk computed logits it never used
        return enc.projector(enc.final(hidden))[0]

    def condition(self, images, caption):
        """What one official ``generate`` call computes: cond and, again, uncond."""
        from easyref_cli.model.encoder import black_image

        return self.encode(images, caption), self.encode([black_image()], "")


class InMemoryOfficialPath(OfficialPath):
    """:class:`OfficialPath` over an in-memory second Qwen2-VL copy (with ``lm_head``): no folder to load."""

    def __init__(self, model, encoder):  # noqa: D107 - no from_pretrained: the model is given
        self.model = model
        self.enc = encoder


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


def official_processors(unet, checkpoint, device: str, dtype: torch.dtype) -> dict:
    """One :class:`OfficialAttnProcessor` per attention layer of ``unet`` (for ``set_attn_processor``):
    the checkpoint's LoRA on every layer, its ``to_k_ip``/``to_v_ip`` on the ``attn2`` ones."""
    procs = {}
    for name in unet.attn_processors:
        path = name[: -len(".processor")]
        ip = checkpoint.ip.get(path) if path.endswith("attn2") else None
        with torch.device(device):
            proc = OfficialAttnProcessor(checkpoint.lora[path], ip, checkpoint.num_tokens)
        procs[name] = proc.to(device, dtype)
    return procs
