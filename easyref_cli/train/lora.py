"""Trainable UNet attention processors: decoupled reference attention + optional LoRA.

Semantics of the official training processors (IP-Adapter's ``LoRAAttnProcessor2_0`` on ``attn1``,
``LoRAIPAttnProcessor2_0`` on ``attn2``), which is what the released checkpoint was trained with:

* LoRA is ``W x + up(down(x))`` on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` (scale 1, no alpha);
  ``down`` starts Gaussian with std ``1/rank``, ``up`` at zero, so a fresh LoRA changes nothing;
* on ``attn2`` the context's last ``num_tokens`` tokens are the reference tokens: the text part goes
  through ``to_k``/``to_v`` (+ their LoRA), the reference part through ``to_k_ip``/``to_v_ip`` only,
  and ``out = SDPA(q, K_text, V_text) + scale · SDPA(q, K_ref, V_ref)`` before ``to_out``.

Because the ``attn2`` k/v LoRA only ever sees text tokens, ``W += up @ down`` at load time
(:func:`easyref_cli.model.adapter.merge_lora`) reproduces exactly what was trained.

The processors are ``nn.Module``s, so their weights live in the UNet state dict under
``<attn path>.processor.{to_k_ip,to_v_ip,to_q_lora.down,...}.weight`` — the official key names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from easyref_cli.errors import UsageError

LORA_KINDS = ("to_q", "to_k", "to_v", "to_out")


class LoRALinear(nn.Module):
    """``up(down(x))`` with ``down: in → rank`` and ``up: rank → out`` (no bias), computed in the weights' dtype."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class TrainAttnProcessor(nn.Module):
    """One attention layer's trainable parts: LoRA (``rank`` not None) and/or the reference branch (``ip``)."""

    def __init__(
        self,
        *,
        query_dim: int,
        context_dim: int,
        inner_dim: int,
        rank: int | None,
        ip: bool,
        cross_attention_dim: int | None = None,
        num_tokens: int = 64,
        scale: float = 1.0,
    ):
        super().__init__()
        self.rank = rank
        self.num_tokens = num_tokens
        self.scale = scale
        self.has_ip = ip
        if rank is not None:
            self.to_q_lora = LoRALinear(query_dim, inner_dim, rank)
            self.to_k_lora = LoRALinear(context_dim, inner_dim, rank)
            self.to_v_lora = LoRALinear(context_dim, inner_dim, rank)
            self.to_out_lora = LoRALinear(inner_dim, query_dim, rank)
        if ip:
            if cross_attention_dim is None:
                raise ValueError("the reference branch needs cross_attention_dim")
            self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
            self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)

    def _lora(self, kind: str, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.rank is None else getattr(self, f"{kind}_lora")(x)

    def _project(self, linear: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
        out = linear(x)
        delta = self._lora(kind, x)
        return out if delta is None else out + delta

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]

        refs = None
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = encoder_hidden_states
            if self.has_ip:
                split = encoder_hidden_states.shape[1] - self.num_tokens
                context, refs = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = self._project(attn.to_q, "to_q", hidden_states)
        key = self._project(attn.to_k, "to_k", context)
        value = self._project(attn.to_v, "to_v", context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        q = split_heads(query)
        out = F.scaled_dot_product_attention(q, split_heads(key), split_heads(value), attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        if refs is not None:
            ip = F.scaled_dot_product_attention(q, split_heads(self.to_k_ip(refs)), split_heads(self.to_v_ip(refs)))
            out = out + self.scale * ip.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)

        hidden_states = self._project(attn.to_out[0], "to_out", out)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_layers(unet: nn.Module) -> list[str]:
    """Attention module paths of the UNet (``…attn1`` / ``…attn2``), in processor order."""
    return [name[: -len(".processor")] for name in unet.attn_processors]


def check_lora_rank(unet: nn.Module, rank: int) -> None:
    """The official ``LoRALinearLayer`` refused ``rank > min(in, out)``; so do we, before any work."""
    if rank < 1:
        raise UsageError(f"--lora-rank must be at least 1, got {rank}")
    smallest = min(
        min(linear.in_features, linear.out_features)
        for path in attention_layers(unet)
        for linear in _linears(unet.get_submodule(path)).values()
    )
    if rank > smallest:
        raise UsageError(
            f"--lora-rank {rank} is larger than the smallest attention projection of this UNet ({smallest}); "
            f"use --lora-rank {smallest} or less"
        )


def install_train_processors(
    unet: nn.Module,
    *,
    ip_weights: Mapping[str, Mapping[str, torch.Tensor]],
    lora_rank: int | None,
    lora_weights: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
    num_tokens: int,
    cross_attention_dim: int,
) -> dict[str, TrainAttnProcessor | None]:
    """Give every attention layer its trainable processor; returns ``{attn path: processor}``.

    ``attn2`` always gets the reference branch, loaded from ``ip_weights``; with ``lora_rank`` every
    layer also gets LoRA (fresh, or loaded from ``lora_weights`` when given). Without LoRA,
    ``attn1`` keeps diffusers' stock SDPA processor (its entry is ``None``).
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors: dict[str, object] = {}
    installed: dict[str, TrainAttnProcessor | None] = {}
    for name in unet.attn_processors:
        path = name[: -len(".processor")]
        attn = unet.get_submodule(path)
        is_cross = path.endswith("attn2")
        if not is_cross and lora_rank is None:
            processors[name] = AttnProcessor2_0()
            installed[path] = None
            continue
        proc = TrainAttnProcessor(
            query_dim=attn.to_q.in_features,
            context_dim=attn.to_k.in_features,
            inner_dim=attn.to_q.out_features,
            rank=lora_rank,
            ip=is_cross,
            cross_attention_dim=cross_attention_dim,
            num_tokens=num_tokens,
        )
        if is_cross:
            proc.to_k_ip.weight.data.copy_(ip_weights[path]["to_k_ip"])
            proc.to_v_ip.weight.data.copy_(ip_weights[path]["to_v_ip"])
        if lora_rank is not None and lora_weights:
            for kind in LORA_KINDS:
                layer = getattr(proc, f"{kind}_lora")
                layer.down.weight.data.copy_(lora_weights[path][kind]["down"])
                layer.up.weight.data.copy_(lora_weights[path][kind]["up"])
        processors[name] = proc
        installed[path] = proc
    unet.set_attn_processor(processors)
    return installed


def processor_weights(
    installed: Mapping[str, TrainAttnProcessor | None],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """``(ip, lora)`` in :class:`~easyref_cli.model.checkpoint.EasyRefCheckpoint` form (detached CPU copies)."""
    ip: dict[str, dict[str, torch.Tensor]] = {}
    lora: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for path, proc in installed.items():
        if proc is None:
            continue
        if proc.has_ip:
            ip[path] = {kind: _cpu(getattr(proc, kind).weight) for kind in ("to_k_ip", "to_v_ip")}
        if proc.rank is not None:
            lora[path] = {
                kind: {part: _cpu(getattr(getattr(proc, f"{kind}_lora"), part).weight) for part in ("down", "up")}
                for kind in LORA_KINDS
            }
    return ip, lora


def _linears(attn: nn.Module) -> dict[str, nn.Linear]:
    return {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()
