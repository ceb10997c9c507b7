"""Shared bits of the benchmarks: model shapes, prompts and reference images, interleaved timing rounds
and their per-round ratios, GPU memory, table printing, and in-memory builders of random full-size (or
tiny) SDXL, Qwen2-VL and EasyRef weights (no model folders written)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

#: Qwen2-VL shapes. "full" is Qwen2-VL-2B (times exactly like the real weights).
QWEN_SHAPES = {
    "tiny": ({}, {}, None),
    "mid": (
        {
            "hidden_size": 384,
            "intermediate_size": 1024,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        },
        {"depth": 6, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4, "hidden_size": 384},
        32000,
    ),
    "full": (
        {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        {
            "depth": 32,
            "embed_dim": 1280,
            "num_heads": 16,
            "mlp_ratio": 4,
            "hidden_size": 1536,
            "initializer_range": 0.02,
        },
        151936,
    ),
}

PROMPTS = [
    "a watercolor painting of a lighthouse at dusk",
    "a knight riding through a snowy forest, cinematic lighting",
    "a cup of coffee on a wooden table",
    "portrait of an old fisherman, highly detailed",
    "a city skyline at night with neon reflections",
    "a cat sleeping on a windowsill",
]


def reference_images(n_groups: int, n_refs: int, side: int) -> list[list]:
    """``n_groups`` groups of ``n_refs`` random RGB PIL images of ``side``² pixels (seeded: the same every run)."""
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


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Interleaved rounds and per-round ratios (the CPU benchmarks' comparisons)
# --------------------------------------------------------------------------------------------


def interleaved(paths: dict[str, Callable[[], object]], rounds: int, device: str = "cpu") -> dict[str, list[float]]:
    """Wall seconds of every path, once per round, the paths interleaved round by round.

    Round ``r`` runs each path once, in the given order when ``r`` is even and in reverse when it is
    odd (ABC, CBA, ABC, ...), so slow drift and bursts of machine noise fall on all paths alike
    instead of on whichever path was being timed then. Warm-ups are the caller's, before this.
    Returns ``{name: [seconds of round 0, round 1, ...]}``: compare paths with :func:`median_ratio`."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t0 = time.perf_counter()
            paths[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def round_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """``num[r] / den[r]`` for every round ``r`` (both measured in the same round)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"need the same, non-zero number of rounds, got {len(num)} and {len(den)}")
    return [a / b for a, b in zip(num, den, strict=True)]


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """The median of the per-round ratios ``num[r] / den[r]``: noise in one round moves one ratio, not the result."""
    return statistics.median(round_ratios(num, den))


def ratio_row(name: str, num: Sequence[float], den: Sequence[float], spec: str = ".3f") -> tuple[str, str, str, str]:
    """``(name, median, min, max)`` of the per-round ratios, formatted with ``spec`` (a :func:`table` row)."""
    ratios = round_ratios(num, den)
    return (name, *(format(x, spec) for x in (statistics.median(ratios), min(ratios), max(ratios))))


def seconds_row(name: str, samples: Sequence[float], per: int = 1) -> tuple[str, str, str, str, str]:
    """``(name, median s, min s, max s, median ms per item)`` of one path's per-round seconds (``per`` items a round)."""
    med = statistics.median(samples)
    return (name, f"{med:.2f}", f"{min(samples):.2f}", f"{max(samples):.2f}", f"{1000 * med / per:.1f}")


RATIO_HEADER = ("ratio (per round)", "median", "min", "max")


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# --------------------------------------------------------------------------------------------
# Timing with spread, GPU memory
# --------------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], object], device: str, *, warmup: int = 1, repeat: int = 5) -> dict:
    """``warmup`` untimed calls, then ``repeat`` timed ones: median / min / max seconds and the samples."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def reset_peak(device: str) -> None:
    """Free cached blocks and start a new peak-memory window (CUDA only)."""
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    """Peak allocated GPU memory since the last :func:`reset_peak`, GiB (``None`` off CUDA)."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def allocated_gib(device: str) -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if is_cuda(device) else None


# --------------------------------------------------------------------------------------------
# In-memory random models (no folders written): SDXL, Qwen2-VL, EasyRef weights
# --------------------------------------------------------------------------------------------

#: SDXL shapes. "full" is stabilityai/stable-diffusion-xl-base-1.0's unet / vae / text_encoder /
#: text_encoder_2 configs (2,567,463,684 UNet parameters, 140 attention layers), which time exactly
#: like the real weights; "tiny" is diffusers' SDXL fast-test shapes (as easyref_cli.tiny).
SDXL_SHAPES = {
    "full": {
        "unet": dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            center_input_sample=False,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            only_cross_attention=False,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            upcast_attention=False,
            resnet_time_scale_shift="default",
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            time_embedding_type="positional",
            conv_in_kernel=3,
            conv_out_kernel=3,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=32,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        # CLIP ViT-L/14 text model, then OpenCLIP ViT-bigG/14 text model with projection
        "text_encoder": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            projection_dim=768,
            vocab_size=49408,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
        ),
        "text_encoder_2": dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
            vocab_size=49408,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
        ),
    },
    "tiny": {
        "unet": dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=1,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            latent_channels=4,
            sample_size=128,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            hidden_act="gelu",
            projection_dim=32,
            vocab_size=1000,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
        ),
        "text_encoder_2": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            hidden_act="gelu",
            projection_dim=32,
            vocab_size=1000,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
        ),
    },
}

#: stable-diffusion-xl-base-1.0's scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def _on_device(device: str, build: Callable[[], object]):
    """Build modules with their parameters created (and randomly initialised) directly on ``device``."""
    with torch.device(device):
        return build()


def build_sdxl(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A random SDXL ``StableDiffusionXLPipeline`` in memory: UNet, VAE, both CLIP text encoders
    (``SDXL_SHAPES[size]``), locally built CLIP tokenizers (they pad to 77 tokens like the real
    ones), the SDXL Euler scheduler. Weights are created on ``device`` then cast to ``dtype``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from easyref_cli.tiny import build_clip_tokenizer

    shapes = SDXL_SHAPES[size]
    tokenizer = build_clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = build_clip_tokenizer(pad_token="!")

    def text_config(overrides: dict, pad_token_id: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_token_id,
            **overrides,
        )

    torch.manual_seed(seed)
    unet = _on_device(device, lambda: UNet2DConditionModel(**shapes["unet"]))
    vae = _on_device(device, lambda: AutoencoderKL(**shapes["vae"]))
    text_encoder = _on_device(
        device, lambda: CLIPTextModel(text_config(shapes["text_encoder"], tokenizer.pad_token_id))
    )
    text_encoder_2 = _on_device(
        device, lambda: CLIPTextModelWithProjection(text_config(shapes["text_encoder_2"], tokenizer_2.pad_token_id))
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def meta_unet(size: str):
    """The SDXL UNet of ``SDXL_SHAPES[size]`` on the meta device: names and shapes, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_SHAPES[size]["unet"])


def qwen2vl_config(size: str):
    """``Qwen2VLConfig`` of ``QWEN_SHAPES[size]`` (defaults: easyref_cli.tiny's tiny model), for the
    byte-level tokenizer of :func:`easyref_cli.tiny._build_qwen2_tokenizer`; returns (config, tokenizer)."""
    from transformers import Qwen2VLConfig

    from easyref_cli.tiny import QWEN2VL_SPECIAL_TOKENS, _build_qwen2_tokenizer

    tokenizer = _build_qwen2_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2VL_SPECIAL_TOKENS}
    text_overrides, vision_overrides, vocab = QWEN_SHAPES[size]
    text = {
        "vocab_size": max(vocab or 0, -(-len(tokenizer) // 64) * 64),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "initializer_range": 0.1,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
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
    text.update(text_overrides)
    vision.update(vision_overrides)
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return config, tokenizer


def build_qwen2vl(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A random ``Qwen2VLForConditionalGeneration`` (``QWEN_SHAPES[size]``; "full" = Qwen2-VL-2B) built on
    ``device`` in ``dtype`` with SDPA attention, plus its tokenizer and the PIL image processor with the
    bounds ``ReferenceEncoder.from_pretrained`` gives it. Returns (model, tokenizer, image_processor)."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from easyref_cli.model.encoder import processor_pixel_bounds

    config, tokenizer = qwen2vl_config(size)
    torch.manual_seed(seed)
    model = _on_device(
        device, lambda: Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    min_pixels, max_pixels = processor_pixel_bounds()
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return model, tokenizer, image_processor


def _rand(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian fp32 tensor drawn on the generator's device, returned on the CPU (where checkpoints live)."""
    return (torch.randn(shape, generator=generator, device=generator.device) * std).cpu()


def in_memory_checkpoint(
    qwen_model, unet, *, num_tokens: int = 64, lora_rank: int = 128, seed: int = 0, rng_device: str = "cpu"
):
    """Random EasyRef weights in the official layout, as an ``EasyRefCheckpoint`` (CPU fp32, like a loaded
    file), without writing anything: projector, final layer (a copy of the MLLM's last decoder layer and
    norm, as the official init), 64 reference tokens, ``to_k_ip``/``to_v_ip`` on every ``attn2`` and
    rank-``lora_rank`` LoRA on ``to_q/to_k/to_v/to_out.0`` of all attention layers. ``unet`` may be a
    meta-device UNet (:func:`meta_unet`): only names and shapes are read. Random tensors are drawn on
    ``rng_device`` (fast on a GPU)."""
    from easyref_cli.model import compat
    from easyref_cli.model.checkpoint import EasyRefCheckpoint

    _, language_model = compat.split_qwen2vl(qwen_model)
    hidden = compat.text_config(qwen_model.config).hidden_size
    cross = unet.config.cross_attention_dim
    g = torch.Generator(device=rng_device).manual_seed(seed)
    image_proj = {
        "proj.0.weight": _rand((hidden, hidden), hidden**-0.5, g),
        "proj.0.bias": _rand((hidden,), 0.02, g),
        "proj.2.weight": _rand((cross, hidden), hidden**-0.5, g),
        "proj.2.bias": _rand((cross,), 0.02, g),
        "proj.3.weight": 1.0 + _rand((cross,), 0.05, g),
        "proj.3.bias": _rand((cross,), 0.02, g),
    }
    last = language_model.layers[-1]
    final_layer = {f"layers.0.{k}": v.detach().float().cpu().clone() for k, v in last.state_dict().items()}
    final_layer["norm.weight"] = language_model.norm.weight.detach().float().cpu().clone()
    final_layer["reference_tokens"] = _rand((num_tokens, hidden), 0.1, g)
    ip: dict = {}
    lora: dict = {}
    for name in unet.attn_processors:
        path = name[: -len(".processor")]
        attn = unet.get_submodule(path)
        if path.endswith("attn2"):
            ip[path] = {kind: _rand((attn.to_k.out_features, cross), cross**-0.5, g) for kind in ("to_k_ip", "to_v_ip")}
        if lora_rank:
            lora[path] = {
                kind: {
                    "down": _rand((lora_rank, lin.in_features), lin.in_features**-0.5, g),
                    "up": _rand((lin.out_features, lora_rank), 0.09 * lora_rank**-0.5, g),
                }
                for kind, lin in (
                    ("to_q", attn.to_q),
                    ("to_k", attn.to_k),
                    ("to_v", attn.to_v),
                    ("to_out", attn.to_out[0]),
                )
            }
    return EasyRefCheckpoint(
        source="<in-memory random>", sha256="", image_proj=image_proj, final_layer=final_layer, ip=ip, lora=lora
    )


def build_reference_encoder(qwen_model, tokenizer, image_processor, checkpoint, *, device: str, dtype: torch.dtype):
    """``ReferenceEncoder.from_pretrained`` without the folder: same split (vision tower, trunk = layers
    0 … n-2 + norm, no ``lm_head``), final layer and projector loaded strictly from ``checkpoint``.
    Takes over ``qwen_model``'s vision tower and text model (its layer list is shortened)."""
    from easyref_cli.model import compat
    from easyref_cli.model.encoder import FinalLayer, ReferenceEncoder, ReferenceProjector

    visual, language_model = compat.split_qwen2vl(qwen_model)
    language_model.layers = language_model.layers[:-1]
    tcfg = compat.text_config(qwen_model.config)
    final_layer = FinalLayer(tcfg, num_tokens=checkpoint.num_tokens)
    projector = ReferenceProjector(tcfg.hidden_size, checkpoint.cross_attention_dim)
    checkpoint.apply_encoder(final_layer, projector)
    encoder = ReferenceEncoder(
        visual=visual,
        language_model=language_model,
        final_layer=final_layer,
        projector=projector,
        tokenizer=tokenizer,
        image_processor=image_processor,
        image_token_id=qwen_model.config.image_token_id,
    )
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def install_easyref(sdxl, checkpoint, *, device: str, attention: str = "auto"):
    """What ``EasyRefPipeline.from_pretrained`` does to the UNet: strict check, LoRA merged, decoupled
    attention processors installed. Returns the ``AttentionChoice``."""
    from easyref_cli.model import adapter as adapter_mod

    unet = getattr(sdxl.unet, "_orig_mod", sdxl.unet)
    checkpoint.check_unet(unet)
    if checkpoint.has_lora:
        adapter_mod.merge_lora(unet, checkpoint.lora)
    choice = adapter_mod.resolve_attention(attention, device, unet.dtype)
    adapter_mod.install_adapter(
        unet,
        checkpoint.ip,
        num_tokens=checkpoint.num_tokens,
        cross_attention_dim=checkpoint.cross_attention_dim,
        backend=choice.backend,
    )
    return choice
