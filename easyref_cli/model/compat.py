"""Every call whose spelling depends on the transformers / diffusers version lives here.

Tested range: transformers 5.17 – 5.24 (``pyproject.toml`` pins ``<5.40``, where the
``past_key_values`` → ``cache`` rename of ``Qwen2VLTextModel.forward`` becomes final).
"""

from __future__ import annotations

import inspect
import logging
from functools import cache
from typing import Any

import torch


@cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword under which ``module.forward`` takes a KV cache (``cache`` from 5.24, else ``past_key_values``)."""
    params = _forward_params(type(module))
    if "cache" in params:
        return {"cache": cache}
    return {"past_key_values": cache}


def vision_features(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Run the Qwen2-VL vision tower once over all images; return merged patch features ``(tokens, hidden)``.

    The tower's attention is block-diagonal per image (``cu_seqlens``), so one batched call equals
    the official per-image loop.
    """
    out = visual(pixel_values.to(dtype=next(visual.parameters()).dtype), grid_thw=grid_thw)
    if isinstance(out, torch.Tensor):  # older transformers returned the merged features directly
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected vision tower output {type(out).__name__}")
    return pooled


def split_qwen2vl(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return ``(vision tower, text model)`` of a loaded ``Qwen2VLForConditionalGeneration``."""
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    language_model = getattr(inner, "language_model", None)
    if visual is None or language_model is None:
        raise TypeError(f"{type(model).__name__} does not look like a transformers 5.x Qwen2-VL model")
    return visual, language_model


def text_config(config: Any) -> Any:
    return getattr(config, "text_config", config)


def mrope_section(config: Any) -> list[int] | None:
    tc = text_config(config)
    params = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    return params.get("mrope_section")


def quiet_loading() -> None:
    """No per-file "Loading weights" bars from transformers/diffusers: we draw our own progress."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()
    dlog.disable_progress_bar()


def diffusers_from_pretrained(cls, path: str, dtype: torch.dtype, **kwargs):
    """``cls.from_pretrained`` with a dtype, under either spelling (``dtype`` from diffusers 0.37, ``torch_dtype`` before)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return cls.from_pretrained(path, torch_dtype=dtype, **kwargs)


def diffusers_from_single_file(cls, source: str, dtype: torch.dtype, **kwargs):
    """``cls.from_single_file`` offline (``local_files_only=True``: configs come from ``config=``, a local folder,
    never the hub) with a dtype under the spelling every version takes (``torch_dtype``; ``dtype`` from 0.37)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return cls.from_single_file(source, torch_dtype=dtype, local_files_only=True, **kwargs)


class _EmptyFp32ModulesFilter(logging.Filter):
    """diffusers 0.42's ``ModelMixin.to(dtype)`` warns that modules "should be kept in float32: []" on every
    cast, even with none to keep: SDXL's fp16 decode with ``force_upcast`` casts the VAE up and back per batch."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("should be kept in float32: []" in message and message.startswith("There are modules in"))


def quiet_dtype_casts() -> None:
    """Drop diffusers' empty "should be kept in float32: []" warning (nothing to act on); idempotent."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFp32ModulesFilter) for f in log.filters):
        log.addFilter(_EmptyFp32ModulesFilter())


def pooled_output(output):
    """The projected embeddings from CLIP's ``get_image_features``/``get_text_features``: transformers
    5.x returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds them, 4.x the tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers ≥ 5.24 ``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` before."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
