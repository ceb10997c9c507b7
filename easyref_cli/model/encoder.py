"""The EasyRef reference encoder: Qwen2-VL trunk + final layer + 64 reference tokens + projector.

This module reproduces what the official code computed (DESIGN §2 rules 1–6), including its
accidents, because the public checkpoint was trained on exactly that:

* rule 1: chat-template prompt, images first, then ``instruction + caption``;
* rule 2: EXIF/RGB (done by :func:`easyref_cli.files.load_image`), the ``qwen_vl_utils``
  pre-resize, then the Qwen2-VL image processor with ``cond_image_size`` pixel bounds;
* rule 3: decoder layers ``0 … n-2`` run causally with plain sequential positions in all three
  M-RoPE sections, then the model's final RMSNorm;
* rule 4: a separate copy of the last layer + its own RMSNorm over ``[trunk ; reference tokens]``,
  causal by default (``bidirectional_final=True`` is the named deviation);
* rule 5: ``Linear → GELU → Linear → LayerNorm`` projector;
* rule 6: the unconditional embedding from one black 512² image and an empty caption.

``lm_head`` logits are never computed and the MLLM is loaded once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from easyref_cli.constants import (
    ASSISTANT_SUFFIX,
    COND_IMAGE_SIZE,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    INSTRUCTION,
    NUM_REFERENCE_TOKENS,
    PRE_RESIZE_FACTOR,
    PRE_RESIZE_MAX_PIXELS,
    PRE_RESIZE_MIN_PIXELS,
    SYSTEM_PROMPT,
    UNCOND_IMAGE_SIZE,
)
from easyref_cli.errors import InputError, ModelError
from easyref_cli.model import compat

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Rule 1 and 2: prompt text and image preprocessing
# --------------------------------------------------------------------------------------------


def build_prompt(image_token_counts: Sequence[int], caption: str, instruction: str = INSTRUCTION) -> str:
    """The exact MLLM prompt text (Qwen2-VL chat template, default system message)."""
    images = "".join(IMAGE_PLACEHOLDER.format(pads=IMAGE_PAD * n) for n in image_token_counts)
    return f"{SYSTEM_PROMPT}{images}{instruction}{caption}{ASSISTANT_SUFFIX}"


def qwen_vl_utils_smart_resize(
    height: int,
    width: int,
    factor: int = PRE_RESIZE_FACTOR,
    min_pixels: int = PRE_RESIZE_MIN_PIXELS,
    max_pixels: int = PRE_RESIZE_MAX_PIXELS,
) -> tuple[int, int]:
    """``qwen_vl_utils.smart_resize`` (the pre-resize the official code applied before the processor)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is above Qwen2-VL's 200:1 limit"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_label(image, index: int, count: int) -> str:
    """How an error names a reference image: its file when the image says (``info["path"]``, as
    :func:`easyref_cli.files.load_image` may record it, or PIL's ``filename``), else its place in the group."""
    path = (getattr(image, "info", None) or {}).get("path") or getattr(image, "filename", "")
    return f"reference image {path}" if path else f"reference image {index + 1} of {count}"


def processor_pixel_bounds(cond_image_size: int = COND_IMAGE_SIZE) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` the official code gave the Qwen2-VL processor."""
    side = cond_image_size // 28
    return (side - 1) ** 2 * 28 * 28, (side**2 + 1) * 28 * 28


def pre_resize(image):
    """Rule 2's first resize: ``qwen_vl_utils`` smart resize with PIL bicubic."""
    from PIL import Image

    h, w = qwen_vl_utils_smart_resize(image.height, image.width)
    if (w, h) == image.size:
        return image
    return image.resize((w, h), resample=Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed reference images, ready for the vision tower."""

    pixel_values: torch.Tensor  # (total patches, C·T·P·P)
    grid_thw: torch.Tensor  # (images, 3)
    token_counts: tuple[int, ...]  # merged tokens per image (grid h·w / merge²)


# --------------------------------------------------------------------------------------------
# Rule 5: projector
# --------------------------------------------------------------------------------------------


class ReferenceProjector(nn.Module):
    """``Linear(h,h) → GELU → Linear(h,cross) → LayerNorm(cross)``; keys ``proj.0/2/3`` as the official MLPProjModel."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FinalLayer(nn.Module):
    """The separate copy of the last decoder layer, its RMSNorm and the learnable reference tokens.

    State-dict keys match the official ``mllm_final_layer.`` prefix: ``layers.0.*``, ``norm.weight``,
    ``reference_tokens`` ``(num_tokens, hidden)``.
    """

    def __init__(self, text_config, num_tokens: int = NUM_REFERENCE_TOKENS):
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRMSNorm

        # layer_idx=0: the copy has its own (single-layer) cache; keeping the original index would
        # make a DynamicCache report length 0 and silently restart positions (DESIGN §5).
        self.layers = nn.ModuleList([Qwen2VLDecoderLayer(text_config, layer_idx=0)])
        self.norm = Qwen2VLRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.reference_tokens = nn.Parameter(torch.zeros(num_tokens, text_config.hidden_size))

    @property
    def num_tokens(self) -> int:
        return self.reference_tokens.shape[0]


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


class ReferenceEncoder(nn.Module):
    """Encodes a group of reference images + caption into ``(num_tokens, cross_attention_dim)``."""

    def __init__(
        self,
        *,
        visual: nn.Module,
        language_model: nn.Module,
        final_layer: FinalLayer,
        projector: ReferenceProjector,
        tokenizer,
        image_processor,
        image_token_id: int,
        bidirectional_final: bool = False,
    ):
        super().__init__()
        self.visual = visual
        self.language_model = language_model  # decoder layers 0 … n-2 + final norm
        self.final_layer = final_layer
        self.projector = projector
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.bidirectional_final = bidirectional_final
        self._uncond_cache: dict[tuple[str, str, str], torch.Tensor] = {}

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        mllm_path: str | Path,
        checkpoint,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cond_image_size: int = COND_IMAGE_SIZE,
        bidirectional_final: bool = False,
    ) -> ReferenceEncoder:
        """Build from a Qwen2-VL folder and an :class:`~easyref_cli.model.checkpoint.EasyRefCheckpoint`."""
        # 1. the MLLM folder: tokenizer, image processor (rule 2 bounds), weights
        mllm_path = Path(mllm_path)
        _check_mllm_dir(mllm_path)
        compat.quiet_loading()
        tokenizer = _load_tokenizer(mllm_path)
        image_processor = _load_image_processor(mllm_path, cond_image_size)
        model = _load_qwen2vl(mllm_path, dtype)
        _check_pixel_bounds(image_processor, cond_image_size, mllm_path)

        # 2. the trunk (rule 3), then the final layer and projector with the checkpoint's weights
        if checkpoint.mllm:
            checkpoint.apply_mllm(model)
        visual, language_model = compat.split_qwen2vl(model)
        # Rule 3: the trunk is layers 0 … n-2 (the official code dropped the last one) + final norm.
        language_model.layers = language_model.layers[:-1]
        tcfg = compat.text_config(model.config)
        image_token_id = model.config.image_token_id
        del model  # drops lm_head: logits are never computed

        cross_dim = checkpoint.cross_attention_dim
        final_layer = FinalLayer(tcfg, num_tokens=checkpoint.num_tokens)
        projector = ReferenceProjector(tcfg.hidden_size, cross_dim)
        checkpoint.apply_encoder(final_layer, projector)
        encoder = cls(
            visual=visual,
            language_model=language_model,
            final_layer=final_layer,
            projector=projector,
            tokenizer=tokenizer,
            image_processor=image_processor,
            image_token_id=image_token_id,
            bidirectional_final=bidirectional_final,
        )
        return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.final_layer.reference_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.reference_tokens.dtype

    @property
    def num_tokens(self) -> int:
        return self.final_layer.num_tokens

    # ---- rule 2 ------------------------------------------------------------------------------

    def prepare_images(self, images: Sequence) -> ImageBatch:
        """Pre-resize (qwen_vl_utils) then run the Qwen2-VL image processor on RGB PIL images."""
        if not images:
            raise InputError("a reference group needs at least one image")
        resized = []
        for i, im in enumerate(images):
            try:
                resized.append(pre_resize(im))
            except ValueError as exc:  # the 200:1 aspect limit
                raise InputError(
                    f"cannot use {image_label(im, i, len(images))} ({im.width}×{im.height} pixels): {exc}; crop or "
                    "pad it, or move it out of its group"
                ) from exc
        out = self.image_processor(images=resized, return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = getattr(self.image_processor, "merge_size", 2)
        counts = tuple(int(t * h * w) // (merge * merge) for t, h, w in grid.tolist())
        return ImageBatch(pixel_values=out["pixel_values"], grid_thw=grid, token_counts=counts)

    def tokenize(self, image_token_counts: Sequence[int], caption: str, instruction: str) -> torch.Tensor:
        text = build_prompt(image_token_counts, caption, instruction)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids

    # ---- rules 3–5 -----------------------------------------------------------------------------

    def image_features(self, batch: ImageBatch) -> torch.Tensor:
        """Vision tower in one batched call → ``(sum tokens, hidden)``."""
        return compat.vision_features(self.visual, batch.pixel_values.to(self.device), batch.grid_thw.to(self.device))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image slots filled by the vision features."""
        input_ids = input_ids.to(self.device)
        embeds = self.language_model.embed_tokens(input_ids)
        mask = input_ids == self.image_token_id
        n_slots = int(mask.sum())
        if n_slots != image_embeds.shape[0]:
            raise ModelError(
                f"prompt has {n_slots} image slots but the vision tower gave {image_embeds.shape[0]} features"
            )
        embeds = embeds.clone()
        embeds[mask] = image_embeds.to(embeds.dtype)
        return embeds

    def trunk(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Layers 0 … n-2, causal, sequential positions in all three M-RoPE sections, then the final norm."""
        seq = inputs_embeds.shape[1]
        positions = sequential_positions(0, seq, inputs_embeds.shape[0], inputs_embeds.device)
        out = self.language_model(inputs_embeds=inputs_embeds, position_ids=positions, use_cache=False)
        return out.last_hidden_state

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final layer over ``[hidden ; reference tokens]`` + its norm; returns the last ``num_tokens`` states."""
        batch = hidden.shape[0]
        refs = self.final_layer.reference_tokens.to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1)
        x = torch.cat([hidden, refs], dim=1)
        positions = sequential_positions(0, x.shape[1], batch, x.device)
        position_embeddings = self.language_model.rotary_emb(x, positions)
        for layer in self.final_layer.layers:
            x = layer(
                x,
                attention_mask=None,
                position_embeddings=position_embeddings,
                is_causal=not self.bidirectional_final,
            )
        x = self.final_layer.norm(x)
        return x[:, -self.num_tokens :]

    @torch.inference_mode()
    def encode_full(self, images: Sequence, caption: str = "", instruction: str = INSTRUCTION) -> torch.Tensor:
        """The whole prompt in one pass (no prefix reuse). The reference path for tests and the fallback."""
        batch = self.prepare_images(images)
        input_ids = self.tokenize(batch.token_counts, caption, instruction)
        embeds = self.embed(input_ids, self.image_features(batch))
        hidden = self.trunk(embeds)
        return self.projector(self.final(hidden))[0]

    # ---- prefix reuse (DESIGN §5): images + instruction once per group, then per caption only the suffix

    @torch.inference_mode()
    def encode_prefix(self, images: Sequence, instruction: str = INSTRUCTION) -> PrefixState:
        """Run system + images + instruction once: keep the trunk's and the final layer's K/V for it.

        Valid because the trunk and the final layer are causal over these positions and the caption comes
        after them (the final layer's K/V are projections of its input, so they hold for the
        bidirectional option too).
        """
        batch = self.prepare_images(images)
        text = build_prompt(batch.token_counts, "", instruction)
        prefix_text = text[: len(text) - len(ASSISTANT_SUFFIX)]
        ids = self.tokenizer(prefix_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        embeds = self.embed(ids, self.image_features(batch))
        n = embeds.shape[1]
        trunk_kv, final_kv = PrefixKV(), PrefixKV()
        hidden = self._layers(self.language_model.layers, embeds, 0, trunk_kv, causal=True)
        hidden = self.language_model.norm(hidden)
        self._layers(self.final_layer.layers, hidden, 0, final_kv, causal=True)
        trunk_kv.freeze()
        final_kv.freeze()
        return PrefixState(
            images=list(images),
            instruction=instruction,
            token_counts=batch.token_counts,
            input_ids=ids,
            length=n,
            trunk_kv=trunk_kv,
            final_kv=final_kv,
        )

    @torch.inference_mode()
    def encode_caption(self, prefix: PrefixState, caption: str) -> torch.Tensor:
        """Condition tokens for ``caption`` reusing ``prefix``: only the caption suffix runs through the trunk.

        Falls back to :meth:`encode_full` when the tokenizer does not split ``prefix + caption`` as
        ``tokens(prefix) + tokens(caption)``.
        """
        suffix_ids = self.tokenizer(caption + ASSISTANT_SUFFIX, add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        full_ids = self.tokenize(prefix.token_counts, caption, prefix.instruction)
        if not torch.equal(full_ids, torch.cat([prefix.input_ids, suffix_ids], dim=1)):
            logger.debug("tokenizer merges across the caption boundary of %r: full encode", caption)
            return self.encode_full(prefix.images, caption, prefix.instruction)
        start = prefix.length
        embeds = self.language_model.embed_tokens(suffix_ids.to(self.device))
        hidden = self._layers(self.language_model.layers, embeds, start, prefix.trunk_kv, causal=True)
        hidden = self.language_model.norm(hidden)
        refs = self.final_layer.reference_tokens.to(hidden.dtype).unsqueeze(0)
        x = torch.cat([hidden, refs], dim=1)
        x = self._layers(self.final_layer.layers, x, start, prefix.final_kv, causal=not self.bidirectional_final)
        x = self.final_layer.norm(x)[:, -self.num_tokens :]
        return self.projector(x)[0]

    def _layers(self, layers, x: torch.Tensor, start: int, kv: PrefixKV, *, causal: bool) -> torch.Tensor:
        """Decoder layers over positions ``start … start+len-1`` attending to ``kv``'s cached prefix, with an
        explicit mask (SDPA's own ``is_causal`` is top-left aligned, wrong once a prefix is cached)."""
        q_len = x.shape[1]
        positions = sequential_positions(start, q_len, x.shape[0], x.device)
        position_embeddings = self.language_model.rotary_emb(x, positions)
        mask = attention_mask(q_len, start, x.dtype, x.device, causal=causal)
        for layer in layers:
            x = layer(x, attention_mask=mask, position_embeddings=position_embeddings, **compat.cache_kwargs(layer, kv))
        return x

    def encode(self, images: Sequence, caption: str = "", instruction: str = INSTRUCTION) -> torch.Tensor:
        """Condition tokens ``(num_tokens, cross_attention_dim)`` for one group and caption."""
        return self.encode_caption(self.encode_prefix(images, instruction), caption)

    def encode_uncond(self, instruction: str = INSTRUCTION) -> torch.Tensor:
        """Rule 6: one black 512² image, the instruction and an empty caption. Cached per instruction."""
        key = (instruction, str(self.device), str(self.dtype))
        if key not in self._uncond_cache:
            self._uncond_cache[key] = self.encode([black_image()], "", instruction)
        return self._uncond_cache[key]


class PrefixKV:
    """A minimal KV cache for one prefix, shared read-only by every caption of a group.

    While recording it stores each layer's K/V; once frozen, ``update`` returns ``prefix ⊕ new`` and
    stores nothing, so one prefix serves any number of captions without copies or cropping.
    """

    def __init__(self) -> None:
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._frozen = False

    def freeze(self) -> None:
        self._frozen = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self._frozen:
            self._kv[layer_idx] = (key_states, value_states)
            return key_states, value_states
        k, v = self._kv[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv[layer_idx][0].shape[-2] if layer_idx in self._kv else 0


@dataclass
class PrefixState:
    """What :meth:`ReferenceEncoder.encode_prefix` keeps for a group: reused by every caption."""

    images: list
    instruction: str
    token_counts: tuple[int, ...]
    input_ids: torch.Tensor
    length: int
    trunk_kv: PrefixKV
    final_kv: PrefixKV


def attention_mask(q_len: int, past: int, dtype: torch.dtype, device, *, causal: bool) -> torch.Tensor:
    """Additive ``(1, 1, q_len, past + q_len)`` mask: query ``i`` (at position ``past + i``) sees keys ``≤ past + i``."""
    mask = torch.zeros(q_len, past + q_len, dtype=dtype, device=device)
    if causal:
        blocked = torch.ones(q_len, past + q_len, dtype=torch.bool, device=device).triu(past + 1)
        mask.masked_fill_(blocked, torch.finfo(dtype).min)
    return mask[None, None]


def sequential_positions(start: int, length: int, batch: int, device) -> torch.Tensor:
    """Plain positions ``start … start+length-1`` repeated in all three M-RoPE sections: ``(3, batch, length)``."""
    pos = torch.arange(start, start + length, device=device)
    return pos.view(1, 1, -1).expand(3, batch, -1)


def black_image():
    from PIL import Image

    return Image.new("RGB", (UNCOND_IMAGE_SIZE, UNCOND_IMAGE_SIZE))


def _load_tokenizer(mllm_path: Path):
    """The MLLM's tokenizer; any loading failure becomes a :class:`ModelError`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(mllm_path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise ModelError(f"cannot load the tokenizer from {mllm_path}: {exc}") from exc


def _load_image_processor(mllm_path: Path, cond_image_size: int):
    """The PIL Qwen2-VL image processor with the official pixel bounds for ``cond_image_size`` (rule 2)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    min_pixels, max_pixels = processor_pixel_bounds(cond_image_size)
    try:
        # The real preprocessor_config.json carries top-level min_pixels/max_pixels, which beat a
        # `size=` override: override those keys themselves (and size, for configs without them).
        return Qwen2VLImageProcessorPil.from_pretrained(
            mllm_path,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the Qwen2-VL image processor config from {mllm_path}: {exc}") from exc


def _load_qwen2vl(mllm_path: Path, dtype: torch.dtype) -> nn.Module:
    """The full ``Qwen2VLForConditionalGeneration`` (SDPA attention) in ``dtype``."""
    from transformers import Qwen2VLForConditionalGeneration

    try:
        return Qwen2VLForConditionalGeneration.from_pretrained(mllm_path, dtype=dtype, attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load Qwen2-VL weights from {mllm_path}: {exc}") from exc


def _check_pixel_bounds(image_processor, cond_image_size: int, path: Path) -> None:
    """Rule 2 guard: a ``cond_image_size``² image must give ``(S/28)²`` tokens, whatever the config says."""
    from PIL import Image

    side = cond_image_size // 28 * 28
    grid = image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")["image_grid_thw"][0]
    tokens = int(grid.prod()) // 4
    if tokens != (cond_image_size // 28) ** 2:
        raise ModelError(
            f"the image processor of {path} turns a {side}² image into {tokens} tokens, not "
            f"{(cond_image_size // 28) ** 2}: its pixel bounds could not be set (unexpected preprocessor_config.json)"
        )


def _check_mllm_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"MLLM folder {path} does not exist; mllm must be a local Qwen2-VL folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a transformers model folder")
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    if not has_tokenizer:
        raise ModelError(
            f"{path} has no tokenizer (tokenizer.json / vocab.json); copy the tokenizer files of "
            "Qwen/Qwen2-VL-2B-Instruct into it"
        )
