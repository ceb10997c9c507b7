"""Tiny random models for ``--model tiny``, eval's tiny scorers, the demo build, tests and benchmarks.

Shipped product code (the test fixtures live in :mod:`easyref_cli.testing`).

No model hub is reachable where this project is developed and tested (DESIGN §3), so everything
is *built* here, with random weights, and saved in the standard ``save_pretrained`` layouts. The
real ``from_pretrained`` loading code is what then gets exercised.

What gets built (all fp32, seeded, a few MB in total, about a second on two CPU cores):

* a tiny **Qwen2-VL** folder: ``Qwen2VLForConditionalGeneration`` weights + config, a byte-level
  BPE tokenizer (the Qwen2 pre-tokenizer, the Qwen2-VL special tokens, each one id) and the PIL
  image processor (``Qwen2VLImageProcessorPil``; the torchvision-backed processors are avoided);
* a tiny **SDXL** pipeline folder (UNet, VAE, two CLIP text encoders with locally built CLIP
  tokenizers, Euler scheduler), the components of diffusers' own SDXL fast tests;
* **EasyRef checkpoints in the official key layout** (DESIGN §2 "Checkpoint formats to load"):
  adapter only, adapter + LoRA, adapter + LoRA + a fine-tuned ``multimodal_llm.`` subset in
  transformers-4.45 names, and a DeepSpeed-style ``.pt`` of the LoRA variant.

``python -m easyref_cli.tiny OUT_DIR`` builds all of it into ``OUT_DIR``.

Heavy libraries (torch, transformers, diffusers) are imported inside the functions, so importing
this module is cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, Qwen2VLConfig

    #: ``(processor name, Attention module)`` pairs of a UNet (see ``_unet_attention_modules``).
    AttentionModules = list[tuple[str, torch.nn.Module]]

__all__ = [
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN2VL_SPECIAL_TOKENS",
    "TINY_LORA_RANK",
    "TinyModels",
    "build_tiny_controlnet",
    "build_tiny_models",
    "build_tiny_qwen2vl",
    "build_tiny_sdxl",
    "ensure_tiny_controlnet",
    "ensure_tiny_models",
    "main",
    "official_state_dict",
]

#: LoRA rank of the tiny LoRA checkpoints (the released model uses 128).
TINY_LORA_RANK = 4

#: Qwen2's pre-tokenization regex (``transformers/models/qwen2/tokenization_qwen2.py``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen2-VL special tokens, in the order of their ids in the real vocabulary (they get
#: consecutive ids after the byte alphabet and the merges in the tiny one).
QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Written last into a complete tiny-model folder by ``ensure_tiny_models``; its content is the
#: builder version, so a cache built by an older version of this module is rebuilt.
_MARKER_NAME = ".easyref-tiny-complete"
_BUILD_VERSION = "easyref-tiny-models v2"  # v2: preprocessor_config.json with min/max_pixels
#: The tiny ControlNet (``ensure_tiny_controlnet``) has its own marker and version inside its folder,
#: so adding it leaves the tiny models above (and the ids of jobs made with them) unchanged.
_CONTROLNET_MARKER_NAME = ".easyref-tiny-controlnet-complete"
_CONTROLNET_BUILD_VERSION = "easyref-tiny-controlnet v1"

#: A few dozen merges of common English pairs for the tiny Qwen2 BPE (byte-level, "Ġ" = space).
#: Each merge only uses symbols that exist by then; the merged symbols join the vocabulary in
#: this order.
_QWEN_MERGES = (
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("h", "e"),
    ("i", "n"),
    ("r", "e"),
    ("o", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("Ġ", "s"),
    ("a", "t"),
    ("Ġ", "w"),
    ("Ġ", "o"),
    ("e", "n"),
    ("Ġ", "c"),
    ("i", "t"),
    ("i", "s"),
    ("a", "n"),
    ("o", "r"),
    ("e", "s"),
    ("Ġ", "b"),
    ("e", "d"),
    ("Ġ", "f"),
    ("in", "g"),
    ("Ġ", "p"),
    ("o", "u"),
    ("Ġa", "n"),
    ("a", "l"),
    ("a", "r"),
    ("Ġt", "o"),
    ("Ġ", "m"),
    ("Ġo", "f"),
    ("Ġ", "in"),
    ("Ġ", "d"),
    ("Ġ", "h"),
    ("Ġan", "d"),
    ("i", "c"),
    ("a", "s"),
    ("l", "e"),
    ("Ġt", "h"),
    ("i", "on"),
    ("o", "m"),
    ("l", "l"),
    ("en", "t"),
    ("Ġ", "n"),
    ("Ġ", "l"),
    ("s", "t"),
    ("Ġ", "re"),
    ("v", "e"),
    ("Ġ", "e"),
    ("r", "o"),
    ("l", "y"),
    ("Ġb", "e"),
    ("Ġ", "g"),
    ("Ġ", "T"),
    ("c", "t"),
    ("Ġ", "S"),
    ("i", "d"),
    ("o", "t"),
    ("Ġ", "I"),
    ("u", "t"),
    ("Ġ", "A"),
    ("Ġ", "is"),
    ("Ġ", "on"),
    ("i", "m"),
    ("a", "m"),
    ("o", "w"),
    ("a", "y"),
    ("a", "d"),
    ("s", "e"),
    ("Ġth", "at"),
    ("Ġ", "C"),
    ("Ġf", "or"),
    ("Ġ", "y"),
    ("v", "er"),
    ("u", "r"),
    ("Ġ", "u"),
    ("Ġy", "ou"),
    ("it", "h"),
    ("Ġw", "ith"),
    ("at", "ion"),
    ("a", "g"),
    ("Ġ", "im"),
    ("Ġim", "ag"),
    ("Ġimag", "e"),
)

#: A few CLIP merges (word-final symbols carry CLIP's "</w>" suffix).
_CLIP_MERGES = (
    ("a", "t</w>"),
    ("c", "at</w>"),
    ("t", "h"),
    ("th", "e</w>"),
    ("o", "f</w>"),
    ("o", "g</w>"),
    ("d", "og</w>"),
    ("p", "h"),
    ("o", "t"),
    ("ph", "ot"),
    ("phot", "o</w>"),
    ("i", "n</w>"),
    ("a", "n"),
    ("an", "d</w>"),
)


@dataclass(frozen=True)
class TinyModels:
    """Paths of a complete set of tiny models (see ``build_tiny_models``)."""

    root: Path
    #: Qwen2-VL folder (weights, config, tokenizer, image processor).
    mllm: Path
    #: SDXL pipeline folder.
    base_model: Path
    #: Official-layout ``.safetensors``: adapter only (no LoRA).
    adapter: Path
    #: Adapter + rank-``TINY_LORA_RANK`` LoRA on all attention layers.
    adapter_lora: Path
    #: Adapter + LoRA + a ``multimodal_llm.`` subset in transformers-4.45 names.
    adapter_mllm: Path
    #: DeepSpeed-style ``.pt``: ``torch.save({"module": state_dict})`` of the LoRA variant.
    adapter_deepspeed: Path


def tiny_layout(root: Path) -> TinyModels:
    """Where ``build_tiny_models`` puts each model under ``root``."""
    root = Path(root)
    adapters = root / "easyref"
    return TinyModels(
        root=root,
        mllm=root / "qwen2-vl",
        base_model=root / "sdxl",
        adapter=adapters / "adapter.safetensors",
        adapter_lora=adapters / "adapter_lora.safetensors",
        adapter_mllm=adapters / "adapter_lora_mllm.safetensors",
        adapter_deepspeed=adapters / "adapter_lora_deepspeed.pt",
    )


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' and diffusers' tqdm bars while building; restore their state after."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    states = [(module, module.is_progress_bar_enabled()) for module in (transformers_logging, diffusers_logging)]
    for module, _ in states:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Qwen2-VL
# --------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols, in GPT-2/Qwen2 vocabulary order ('!' = 0, 'Ġ' = 220)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _bpe_vocab(base: list[str], merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """``base`` symbols, then one symbol per merge; checks every merge is buildable."""
    vocab = {symbol: i for i, symbol in enumerate(base)}
    for left, right in merges:
        if left not in vocab or right not in vocab:
            raise ValueError(f"BPE merge {left!r} + {right!r} uses a symbol not built yet")
        vocab.setdefault(left + right, len(vocab))
    return vocab


def _build_qwen2_tokenizer():
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer and the Qwen2-VL special tokens.

    Built with ``transformers.Qwen2Tokenizer`` (tokenizers-backed in transformers 5.x), which sets
    up exactly Qwen2's normalizer (NFC), pre-tokenizer (``Split(regex, isolated)`` +
    ``ByteLevel(add_prefix_space=False, use_regex=False)``) and ``ByteLevel`` decoder.
    """
    from transformers import Qwen2Tokenizer

    vocab = _bpe_vocab(_byte_alphabet(), _QWEN_MERGES)
    for token in QWEN2VL_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=list(_QWEN_MERGES),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN2VL_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def _tiny_qwen2vl_text_config(ids: dict[str, int], vocab_size: int) -> dict:
    """The tiny text model's config entries (hidden 64, 3 layers, M-RoPE sections (2, 3, 3))."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],  # sums to head_dim / 2 = 8
        },
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        # 0.1 instead of 0.02: activations near unit scale, as in trained models (with 0.02
        # the hidden states are ~0.02 and the RMSNorm eps becomes visible).
        "initializer_range": 0.1,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _tiny_qwen2vl_vision_config() -> dict:
    """The tiny vision tower's config entries (depth 2, width 32, patch 14, merge 2)."""
    return {
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "initializer_range": 0.1,
    }


def _tiny_qwen2vl_config(
    ids: dict[str, int],
    vocab_size: int,
    text_overrides: dict | None,
    vision_overrides: dict | None,
) -> Qwen2VLConfig:
    """The ``Qwen2VLConfig`` of the tiny model, with the overrides applied."""
    from transformers import Qwen2VLConfig

    text_config = _tiny_qwen2vl_text_config(ids, vocab_size)
    vision_config = _tiny_qwen2vl_vision_config()
    text_config.update(text_overrides or {})
    vision_config.update(vision_overrides or {})
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _save_qwen2vl_image_processor(path: Path) -> None:
    """Save the PIL image processor with the real Qwen2-VL pixel bounds into ``path``."""
    from transformers import Qwen2VLImageProcessorPil

    # The real Qwen2-VL preprocessor bounds (min_pixels 56², max_pixels 16384·28²).
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 16384 * 28 * 28})
    image_processor.save_pretrained(path)
    # Like the real Qwen/Qwen2-VL-2B-Instruct file: top-level min_pixels/max_pixels too (they take
    # precedence over `size` when loading, so loaders must override them explicitly).
    config_file = path / "preprocessor_config.json"
    data = json.loads(config_file.read_text())
    data.update({"min_pixels": 56 * 56, "max_pixels": 16384 * 28 * 28})
    config_file.write_text(json.dumps(data, indent=2) + "\n")


def build_tiny_qwen2vl(
    path: Path,
    seed: int = 0,
    *,
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Build a tiny random ``Qwen2VLForConditionalGeneration`` folder at ``path``.

    Text model: hidden 64, 3 layers, 4 heads / 2 KV heads, M-RoPE sections (2, 3, 3), tied
    embeddings. Vision tower: depth 2, width 32, patch 14, merge 2 (its merger outputs 64).
    The folder holds ``config.json``, ``model.safetensors``, the tokenizer files and
    ``preprocessor_config.json``. Returns ``path``.

    ``text_overrides`` / ``vision_overrides`` change config entries (benchmarks build mid-size or
    full-size shapes this way); ``vocab_size`` pads the embedding (the tokenizer stays byte-level).
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_qwen2_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2VL_SPECIAL_TOKENS}
    vocab_size = max(vocab_size or 0, -(-len(tokenizer) // 64) * 64)  # the embedding covers every id
    config = _tiny_qwen2vl_config(ids, vocab_size, text_overrides, vision_overrides)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _save_qwen2vl_image_processor(path)
    return path


# --------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------


def build_clip_tokenizer(pad_token: str):
    """A CLIP tokenizer over the byte alphabet (+ "</w>" variants), a few merges, BOS/EOS.

    Same layout as the real CLIP vocabulary (bytes, word-final bytes, merges, then
    ``<|startoftext|>`` and ``<|endoftext|>``), ``model_max_length`` 77.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = _bpe_vocab(alphabet + [symbol + "</w>" for symbol in alphabet], _CLIP_MERGES)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(_CLIP_MERGES),
        pad_token=pad_token,
        model_max_length=77,
    )


def _tiny_sdxl_unet() -> UNet2DConditionModel:
    """The tiny SDXL UNet (channels 32/64, cross-attention dim 64), random weights from the
    global torch RNG."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + text_encoder_2 projection (32)
        cross_attention_dim=64,  # 32 + 32: both text encoders' hidden states, concatenated
        norm_num_groups=1,
    )


def _tiny_sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL's Euler scheduler settings."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )


def _tiny_sdxl_vae() -> AutoencoderKL:
    """The tiny VAE (channels 32/64, scale factor 4), random weights from the global torch RNG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )


def _tiny_clip_text_config(tokenizer, pad_token_id: int) -> CLIPTextConfig:
    """A 5-layer CLIP text config of width 32; BOS/EOS ids from ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling looks for this id (not the legacy 2)
        pad_token_id=pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=77,
    )


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Build a tiny random SDXL pipeline folder at ``path``, loadable with
    ``StableDiffusionXLPipeline.from_pretrained``.

    Components as in diffusers' SDXL fast tests: UNet (channels 32/64, cross-attention dim 64,
    24 attention layers: 12 ``attn1`` + 12 ``attn2``), VAE (channels 32/64, scale factor 4),
    two 5-layer CLIP text encoders of width 32 (the second with projection), Euler scheduler.
    ``tokenizer`` pads with ``<|endoftext|>``, ``tokenizer_2`` with ``!`` like SDXL's.
    Returns ``path``.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    # Each seeded model draws from the global RNG right after its manual_seed.
    torch.manual_seed(seed)
    unet = _tiny_sdxl_unet()
    scheduler = _tiny_sdxl_scheduler()
    torch.manual_seed(seed)
    vae = _tiny_sdxl_vae()
    tokenizer = build_clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer, tokenizer.pad_token_id))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer, tokenizer_2.pad_token_id))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_controlnet(base_model: Path, path: Path, seed: int = 0) -> Path:
    """Build a tiny SDXL ControlNet for the tiny SDXL at ``base_model`` into ``path`` (safetensors).

    diffusers' ``ControlNetModel.from_unet`` of its UNet (the encoder copied; RGB control images), with
    a conditioning embedding that downsamples as much as the base model's VAE (``(16, 32)`` for the tiny
    one's factor 2, diffusers' default ``(16, 32, 96, 256)`` for SDXL's 8). Its zero-initialised
    output convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``, the conditioning
    embedding's ``conv_out``) get small seeded random values, so that a control image changes the
    image. The global torch RNG is left as it was. Returns ``path``.
    """
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    base_model, path = Path(base_model), Path(path)
    vae_blocks = json.loads((base_model / "vae" / "config.json").read_text(encoding="utf-8"))["block_out_channels"]
    unet = UNet2DConditionModel.from_pretrained(base_model / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[: len(vae_blocks)]
        )
    g = _generator(seed, 7)  # parts 1-5 are the checkpoints' (official_state_dict)
    # the residual convolutions small; the control image's embedding about as strong as the latent's
    convs = [(conv, 0.1) for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block)]
    convs.append((controlnet.controlnet_cond_embedding.conv_out, 1.0))
    with torch.no_grad():
        for conv, std in convs:
            conv.weight.copy_(_randn(conv.weight.shape, g, std))
            conv.bias.copy_(_randn(conv.bias.shape, g, 0.02))
    with quiet_progress_bars():
        controlnet.save_pretrained(path, safe_serialization=True)
    return path


# --------------------------------------------------------------------------------------------
# Official EasyRef checkpoints
# --------------------------------------------------------------------------------------------


def _read_safetensors_folder(folder: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` folder whose names pass ``keep`` (see
    :func:`easyref_cli.model.checkpoint.read_folder_tensors`)."""
    from easyref_cli.model.checkpoint import read_folder_tensors

    return read_folder_tensors(folder, keep)


def _to_v445_name(key: str) -> str:
    """Qwen2-VL parameter name in the transformers-4.45 layout.

    5.x modules are ``model.visual.*`` / ``model.language_model.*``; 4.45 had ``visual.*`` /
    ``model.*``. (transformers 5.24 already *saves* the 4.45 names; both are accepted here.)
    """
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def _generator(seed: int, part: int) -> torch.Generator:
    """An independent CPU generator per checkpoint part, so that adding a part (LoRA, MLLM)
    leaves the values of the others unchanged."""
    import torch

    return torch.Generator("cpu").manual_seed(seed * 1009 + part)


def _randn(shape: tuple[int, ...], generator: torch.Generator, std: float) -> torch.Tensor:
    import torch

    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * std


def _perturb(tensor: torch.Tensor, generator: torch.Generator, rel: float = 0.1, floor: float = 0.02) -> torch.Tensor:
    """A float32 copy of ``tensor`` plus Gaussian noise of ``rel`` × its std (``floor`` for
    constant tensors such as norm weights or zero biases)."""
    base = tensor.detach().to("cpu").float()
    std = float(base.std()) if base.numel() > 1 else 0.0
    return (base + _randn(base.shape, generator, rel * std if std > 1e-8 else floor)).contiguous()


def _unet_attention_modules(base_model_path: Path):
    """``(unet config, [(processor name, Attention module)])`` from a meta-device UNet.

    The UNet is built from its config on the meta device: module structure and shapes only,
    no weights, instant even for full-size SDXL.
    """
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(Path(base_model_path) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    suffix = ".processor"
    modules = [
        (name, unet.get_submodule(name[: -len(suffix)])) for name in unet.attn_processors if name.endswith(suffix)
    ]
    return unet.config, modules


def _read_mllm_v445(mllm_path: Path, layer_prefix: str, *, everything: bool) -> dict[str, torch.Tensor]:
    """The MLLM tensors in transformers-4.45 names: all of them with ``everything``, else only
    the decoder layer under ``layer_prefix`` and the final norm."""

    def wanted(key: str) -> bool:
        name = _to_v445_name(key)
        return everything or name.startswith(layer_prefix) or name == "model.norm.weight"

    return {_to_v445_name(k): v for k, v in _read_safetensors_folder(mllm_path, wanted).items()}


def _projector_state(hidden: int, cross: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Projector: Linear(h, h) -> GELU -> Linear(h, cross) -> LayerNorm(cross)."""
    return {
        "image_proj_model.proj.0.weight": _randn((hidden, hidden), g, hidden**-0.5),
        "image_proj_model.proj.0.bias": _randn((hidden,), g, 0.02),
        "image_proj_model.proj.2.weight": _randn((cross, hidden), g, hidden**-0.5),
        "image_proj_model.proj.2.bias": _randn((cross,), g, 0.02),
        "image_proj_model.proj.3.weight": 1.0 + _randn((cross,), g, 0.05),
        "image_proj_model.proj.3.bias": _randn((cross,), g, 0.02),
    }


def _final_layer_state(
    mllm: dict[str, torch.Tensor], layer_prefix: str, hidden: int, num_tokens: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Final layer: the official init copies the MLLM's last decoder layer (and its norm)."""
    state: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in mllm if k.startswith(layer_prefix)):
        state["mllm_final_layer.layers.0." + key[len(layer_prefix) :]] = _perturb(mllm[key], g)
    state["mllm_final_layer.norm.weight"] = _perturb(mllm["model.norm.weight"], g)
    state["mllm_final_layer.reference_tokens"] = _randn((num_tokens, hidden), g, 0.1)
    return state


def _ip_state(
    base_model_path: Path, attention: AttentionModules, cross: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Decoupled cross-attention: to_k_ip / to_v_ip on every attn2 (official init: copies of
    to_k / to_v). The UNet weights are read from disk; the modules give names and shapes."""
    attn2 = [(name, module) for name, module in attention if name.endswith("attn2.processor")]
    wanted_unet = {f"{name[: -len('.processor')]}.{proj}.weight" for name, _ in attn2 for proj in ("to_k", "to_v")}
    unet_weights = _read_safetensors_folder(Path(base_model_path) / "unet", wanted_unet.__contains__)
    state: dict[str, torch.Tensor] = {}
    for name, module in attn2:
        base = name[: -len(".processor")]
        for proj in ("to_k", "to_v"):
            weight = unet_weights.get(f"{base}.{proj}.weight")
            shape = (getattr(module, proj).out_features, cross)
            if weight is None or tuple(weight.shape) != shape:
                weight = _randn(shape, g, cross**-0.5)
            state[f"unet.{name}.{proj}_ip.weight"] = _perturb(weight, g)
    return state


def _lora_state(attention: AttentionModules, lora_rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """LoRA on to_q / to_k / to_v / to_out.0 of every attention module; up != 0 so merging matters."""
    state: dict[str, torch.Tensor] = {}
    for name, module in attention:
        for lora_name, linear in (
            ("to_q_lora", module.to_q),
            ("to_k_lora", module.to_k),
            ("to_v_lora", module.to_v),
            ("to_out_lora", module.to_out[0]),
        ):
            fan_in = linear.in_features
            state[f"unet.{name}.{lora_name}.down.weight"] = _randn((lora_rank, fan_in), g, fan_in**-0.5)
            state[f"unet.{name}.{lora_name}.up.weight"] = _randn(
                (linear.out_features, lora_rank), g, 0.09 * lora_rank**-0.5
            )
    return state


def _adapter_module_duplicates(state: dict[str, torch.Tensor], attention: AttentionModules) -> dict[str, torch.Tensor]:
    """The official training code's `adapter_modules` ModuleList (unet.attn_processors.values())
    duplicated the processor weights under its own index; a couple of such keys (the first
    attn2's to_k_ip / to_v_ip, copied from ``state``) stand for them."""
    index, name = next((i, n) for i, (n, _) in enumerate(attention) if n.endswith("attn2.processor"))
    duplicates: dict[str, torch.Tensor] = {}
    for proj in ("to_k_ip", "to_v_ip"):
        duplicate = state[f"unet.{name}.{proj}.weight"].clone()
        duplicates[f"adapter_modules.{index}.{proj}.weight"] = duplicate
    return duplicates


def _mllm_state(
    mllm: dict[str, torch.Tensor], layer_prefix: str, tied: bool, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """A fine-tuned MLLM, in transformers-4.45 names, without its last decoder layer."""
    state: dict[str, torch.Tensor] = {}
    for key in sorted(mllm):
        if key.startswith(layer_prefix) or (tied and key == "lm_head.weight"):
            continue
        state["multimodal_llm." + key] = _perturb(mllm[key], g)
    if tied:  # 4.45 state dicts list the tied head too (transformers 5 saves only one)
        state["multimodal_llm.lm_head.weight"] = state["multimodal_llm.model.embed_tokens.weight"].clone()
    return state


def official_state_dict(
    mllm_path: Path,
    base_model_path: Path,
    *,
    lora: bool,
    multimodal_llm: bool = False,
    seed: int = 0,
    lora_rank: int = TINY_LORA_RANK,
    num_tokens: int = 64,
) -> dict[str, torch.Tensor]:
    """Random EasyRef weights in the official checkpoint key layout (``zongzhuofan/EasyRef``).

    Shapes come from the models at ``mllm_path`` (a Qwen2-VL folder) and ``base_model_path``
    (an SDXL folder). Values are seeded, small and non-zero, so every part visibly changes the
    output. Each part has its own generator: the adapter keys are identical with and without
    ``lora`` / ``multimodal_llm``.

    Keys (fp32, contiguous, no shared storage):

    * ``image_proj_model.proj.{0,2,3}.{weight,bias}`` — Linear(h, h), Linear(h, cross), LayerNorm;
    * ``mllm_final_layer.layers.0.*`` (a perturbed copy of the MLLM's last decoder layer),
      ``mllm_final_layer.norm.weight``, ``mllm_final_layer.reference_tokens`` (num_tokens, h);
    * ``unet.<attn2 processor>.to_{k,v}_ip.weight`` for every ``attn2`` (perturbed to_k/to_v);
    * with ``lora``: ``unet.<processor>.to_{q,k,v,out}_lora.{down,up}.weight`` for every
      attention module (``attn1`` and ``attn2``), non-zero ``up``;
    * with ``multimodal_llm``: ``multimodal_llm.`` + the perturbed MLLM in 4.45 names
      (``visual.*``, ``model.embed_tokens``, ``model.layers.0 … n-2``, ``model.norm``,
      ``lm_head.weight``) — the last decoder layer is left out, as in the official trunk;
    * ``adapter_modules.<i>.to_{k,v}_ip.weight``: duplicates of the first ``attn2``'s adapter
      weights (the official training code saved such copies; loaders must ignore them).
    """
    from transformers import AutoConfig

    # 1. Shapes from the two models (and the MLLM tensors the parts copy)
    mllm_config = AutoConfig.from_pretrained(mllm_path)
    text_config = mllm_config.get_text_config()
    hidden = text_config.hidden_size
    last = text_config.num_hidden_layers - 1
    unet_config, attention = _unet_attention_modules(base_model_path)
    cross = unet_config.cross_attention_dim
    layer_prefix = f"model.layers.{last}."
    mllm = _read_mllm_v445(mllm_path, layer_prefix, everything=multimodal_llm)

    # 2. One part per generator, in key order: projector, final layer, IP, LoRA, duplicates, MLLM
    state: dict[str, torch.Tensor] = {}
    state.update(_projector_state(hidden, cross, _generator(seed, 1)))
    state.update(_final_layer_state(mllm, layer_prefix, hidden, num_tokens, _generator(seed, 2)))
    state.update(_ip_state(base_model_path, attention, cross, _generator(seed, 3)))
    if lora:
        state.update(_lora_state(attention, lora_rank, _generator(seed, 4)))
    state.update(_adapter_module_duplicates(state, attention))
    if multimodal_llm:
        tied = bool(getattr(mllm_config, "tie_word_embeddings", False))
        state.update(_mllm_state(mllm, layer_prefix, tied, _generator(seed, 5)))

    return {key: value.contiguous() for key, value in state.items()}


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------


def build_tiny_models(root: Path, seed: int = 0) -> TinyModels:
    """Build the tiny Qwen2-VL, the tiny SDXL and the four EasyRef checkpoints under ``root``."""
    import torch

    layout = tiny_layout(root)
    layout.root.mkdir(parents=True, exist_ok=True)
    with quiet_progress_bars():
        build_tiny_qwen2vl(layout.mllm, seed=seed)
        build_tiny_sdxl(layout.base_model, seed=seed)
    common = {"seed": seed}
    _save_safetensors(official_state_dict(layout.mllm, layout.base_model, lora=False, **common), layout.adapter)
    lora_state = official_state_dict(layout.mllm, layout.base_model, lora=True, **common)
    _save_safetensors(lora_state, layout.adapter_lora)
    _save_safetensors(
        official_state_dict(layout.mllm, layout.base_model, lora=True, multimodal_llm=True, **common),
        layout.adapter_mllm,
    )
    torch.save({"module": lora_state}, layout.adapter_deepspeed)
    return layout


def _is_complete(root: Path, marker: str = _MARKER_NAME, version: str = _BUILD_VERSION) -> bool:
    try:
        return (Path(root) / marker).read_text().strip() == version
    except OSError:
        return False


def _is_foreign(folder: Path) -> bool:
    """Whether ``folder`` holds something that is not a tiny-model cache (never overwritten)."""
    if not folder.is_dir():
        return folder.exists()
    return not (folder / _MARKER_NAME).exists() and any(folder.iterdir())


def _build_in_place(folder: Path, build: Callable[[Path], object], marker: str, version: str) -> None:
    """``build(tmp)`` into a temporary folder next to ``folder``, its marker written last, then moved into
    place with one ``os.replace``; a stale or partial ``folder`` is moved aside first, and when two
    processes race the loser drops its copy and uses the winner's."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        (tmp / marker).write_text(version + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if _is_complete(folder, marker, version):  # somebody finished while we were building
            return
        if folder.exists():  # stale version: move it out of the way
            trash = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(OSError):
                os.replace(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder, marker, version):  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_models(cache_dir: Path) -> TinyModels:
    """The tiny models in ``cache_dir``, built there first if they are missing or stale.

    Idempotent and safe under concurrency: a complete folder (marker file with the builder
    version, written last) is reused as is. Otherwise everything is built into a temporary folder
    next to ``cache_dir`` and moved into place with one ``os.replace``; when two processes race,
    the loser drops its copy and uses the winner's. A stale folder (older builder version) is moved
    aside first; a non-empty folder without the marker is not ours and is left alone (error).
    """
    cache_dir = Path(cache_dir)
    if _is_complete(cache_dir):
        return tiny_layout(cache_dir)
    if _is_foreign(cache_dir):
        raise FileExistsError(f"{cache_dir} exists and is not a tiny-model cache; choose an empty or new folder")
    _build_in_place(cache_dir, build_tiny_models, _MARKER_NAME, _BUILD_VERSION)
    return tiny_layout(cache_dir)


def ensure_tiny_controlnet(root: Path) -> Path:
    """The tiny ControlNet for the tiny models in ``root`` (``root / "controlnet"``), built there first
    if it is missing or stale, with its own marker file, as :func:`ensure_tiny_models` builds them."""
    folder = Path(root) / "controlnet"
    if not _is_complete(folder, _CONTROLNET_MARKER_NAME, _CONTROLNET_BUILD_VERSION):
        base = tiny_layout(root).base_model
        _build_in_place(folder, lambda tmp: build_tiny_controlnet(base, tmp), _CONTROLNET_MARKER_NAME,
                        _CONTROLNET_BUILD_VERSION)  # fmt: skip
    return folder


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m easyref_cli.tiny OUT_DIR [--seed N]``: build everything, print the paths."""
    parser = argparse.ArgumentParser(
        prog="python -m easyref_cli.tiny",
        description="Build tiny random EasyRef test models (Qwen2-VL, SDXL, checkpoints).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to build into (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    models = build_tiny_models(args.out_dir, seed=args.seed)
    for field in fields(models):
        if field.name != "root":
            print(f"{field.name}: {getattr(models, field.name)}")


if __name__ == "__main__":
    main()
