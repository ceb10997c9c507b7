"""Decoupled cross-attention (DESIGN §2 rule 7), LoRA merging (rule 8), attention-backend probing.

Every ``attn2`` of the UNet gets an :class:`EasyRefAttnProcessor`: the context's last ``num_tokens``
tokens are the reference tokens and get their own keys/values::

    out = SDPA(q, K_text, V_text) + scale · SDPA(q, to_k_ip(ref), to_v_ip(ref))

before ``to_out``. ``attn1`` keeps a stock processor. LoRA is merged into the base weights at load
(exact: on ``attn2`` the k/v LoRA only ever sees text tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from easyref_cli.errors import ModelError, UsageError
from easyref_cli.settings import ATTENTION_CHOICES, choice_error

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ATTENTION_CHOICES  # one table, in settings


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, L, H, D)`` in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    import xformers.ops  # noqa: PLC0415 - optional dependency

    return xformers.ops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_bias=mask)


_KERNELS = {"sdpa": _sdpa, "xformers": _xformers}


class EasyRefAttnProcessor(nn.Module):
    """Decoupled cross-attention for one ``attn2``; holds only ``to_k_ip``/``to_v_ip``.

    An ``nn.Module`` so its weights appear in the UNet state dict under ``<attn>.processor.*``,
    exactly where the official checkpoint keeps them.
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        num_tokens: int = 64,
        scale: float = 1.0,
        backend: str = "sdpa",
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.scale = scale
        self.backend = backend
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        # Reference K/V reuse across denoising steps (see reference_kv_cache): the 64 reference tokens
        # are constant for a whole generation, so their projections are computed once, not per step.
        self.cache_kv = False
        self._kv_source: torch.Tensor | None = None
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        kernel = _KERNELS[self.backend]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if encoder_hidden_states is None:
            raise ModelError("EasyRefAttnProcessor is for cross-attention (attn2) only")
        batch = hidden_states.shape[0]

        split = encoder_hidden_states.shape[1] - self.num_tokens
        # contiguous: projecting a strided slice is many times slower on some backends (CPU bf16)
        text, refs = encoder_hidden_states[:, :split].contiguous(), encoder_hidden_states[:, split:]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, split, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        heads = attn.heads
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim)

        q = split_heads(query)
        out = kernel(q, split_heads(attn.to_k(text)), split_heads(attn.to_v(text)), attention_mask)
        if self.scale != 0:
            if self.cache_kv and self._kv is not None and self._kv_source is encoder_hidden_states:
                ip_k, ip_v = self._kv
            else:
                ip_k, ip_v = split_heads(self.to_k_ip(refs)), split_heads(self.to_v_ip(refs))
                if self.cache_kv:  # holding the source tensor keeps the identity check sound
                    self._kv_source, self._kv = encoder_hidden_states, (ip_k, ip_v)
            out = out + self.scale * kernel(q, ip_k, ip_v)
        hidden_states = out.reshape(batch, -1, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_adapter(
    unet: nn.Module,
    ip_weights: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    num_tokens: int,
    cross_attention_dim: int,
    scale: float = 1.0,
    backend: str = "sdpa",
) -> None:
    """Give every ``attn2`` an :class:`EasyRefAttnProcessor` loaded with its weights; ``attn1`` a stock one."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    processors = {}
    ref = next(unet.parameters())
    for name in unet.attn_processors:
        attn_path = name[: -len(".processor")]
        if not attn_path.endswith("attn2"):
            processors[name] = XFormersAttnProcessor() if backend == "xformers" else AttnProcessor2_0()
            continue
        attn = unet.get_submodule(attn_path)
        proc = EasyRefAttnProcessor(attn.to_k.out_features, cross_attention_dim, num_tokens, scale, backend)
        weights = ip_weights[attn_path]
        proc.to_k_ip.weight.data.copy_(weights["to_k_ip"])
        proc.to_v_ip.weight.data.copy_(weights["to_v_ip"])
        processors[name] = proc.to(device=ref.device, dtype=ref.dtype)
    unet.set_attn_processor(processors)


@contextmanager
def reference_kv_cache(unet: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within one denoising loop, compute each ``attn2``'s reference K/V once and reuse it every step.

    The pipeline builds the context tensor once before the loop, so every step passes the same
    tensor object; the cache is dropped on exit so nothing leaks into the next generation.
    """
    procs = [p for p in unet.attn_processors.values() if isinstance(p, EasyRefAttnProcessor)]
    for p in procs:
        p.cache_kv, p._kv_source, p._kv = enabled, None, None
    try:
        yield
    finally:
        for p in procs:
            p.cache_kv, p._kv_source, p._kv = False, None, None


def set_scale(unet: nn.Module, scale: float) -> None:
    for proc in unet.attn_processors.values():
        if isinstance(proc, EasyRefAttnProcessor):
            proc.scale = scale


def merge_lora(
    unet: nn.Module, lora: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], scale: float = 1.0
) -> int:
    """``W += scale · up @ down`` on ``to_q/to_k/to_v/to_out.0`` (computed in fp32). Returns layers merged."""
    merged = 0
    for attn_path, kinds in lora.items():
        attn = unet.get_submodule(attn_path)
        for kind, parts in kinds.items():
            linear = attn.to_out[0] if kind == "to_out" else getattr(attn, kind)
            delta = parts["up"].to(torch.float32) @ parts["down"].to(torch.float32)
            w = linear.weight.data
            w.copy_((w.to(torch.float32) + scale * delta.to(w.device)).to(w.dtype))
            merged += 1
    return merged


# --------------------------------------------------------------------------------------------
# attention backends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionChoice:
    backend: str  # "sdpa" | "xformers"
    requested: str
    reason: str  # why this backend (probe result)


def probe_xformers(device: str | torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Run one real tiny ``memory_efficient_attention`` call; wheels that install but can't run fail here."""
    try:
        import xformers.ops  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - import can fail in many ways (ABI, missing CUDA libs)
        return False, f"xformers not importable: {type(exc).__name__}: {exc}".strip()
    try:
        q = torch.randn(1, 8, 2, 16, device=device, dtype=dtype)
        out = xformers.ops.memory_efficient_attention(q, q, q)
        ref = _sdpa(q.float(), q.float(), q.float())
        if not torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2):
            return False, "xformers probe gave wrong results"
    except Exception as exc:  # noqa: BLE001
        return (
            False,
            f"xformers probe call failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        )
    return True, f"xformers {getattr(xformers, '__version__', '?')} probe ok"


def resolve_attention(requested: str, device: str | torch.device, dtype: torch.dtype) -> AttentionChoice:
    """``auto`` → xformers if its probe passes, else PyTorch SDPA; ``xformers`` fails loudly if it can't run."""
    if requested not in ATTENTION_BACKENDS:
        raise UsageError(choice_error("attention", requested, ATTENTION_BACKENDS))
    if requested == "sdpa":
        return AttentionChoice("sdpa", requested, "requested")
    ok, reason = probe_xformers(device, dtype)
    if ok:
        return AttentionChoice("xformers", requested, reason)
    if requested == "xformers":
        raise UsageError(f"attention 'xformers' was requested but {reason}; use 'sdpa' or 'auto'")
    return AttentionChoice("sdpa", requested, f"fallback: {reason}")
