"""SDXL + EasyRef: load from model folders, encode references, generate.

Shaped like a diffusers pipeline: one ``__call__`` of numbered steps, and reference embeddings can
be passed precomputed (``ref_embeds``) so a batch tool encodes each group once. ControlNet, img2img
and inpainting run diffusers' own SDXL pipelines over the same components (:mod:`.control`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from easyref_cli.constants import INSTRUCTION, OFFICIAL_NEGATIVE_PROMPT
from easyref_cli.env import default_device
from easyref_cli.errors import JobError, ModelError, UsageError
from easyref_cli.model import adapter as adapter_mod
from easyref_cli.model import compat, control
from easyref_cli.model.checkpoint import EasyRefCheckpoint, load_checkpoint
from easyref_cli.model.encoder import ReferenceEncoder
from easyref_cli.settings import DTYPE_ALIASES, OFFLOAD_CHOICES, SCHEDULERS, choice_error

logger = logging.getLogger(__name__)

__all__ = ["EasyRefPipeline", "GenerationRequest", "NonFiniteImages", "RefEmbeds", "default_device"]


@dataclass(frozen=True)
class RefEmbeds:
    """Conditional and unconditional reference tokens, each ``(num_tokens, cross_attention_dim)``."""

    cond: torch.Tensor
    uncond: torch.Tensor


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate. A batch of requests shares everything but the per-image fields
    (prompt, negative prompt, references, seed, control/init/mask images): see :meth:`batch_key`."""

    prompt: str
    ref_embeds: RefEmbeds
    seed: int
    negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT
    steps: int = 30
    guidance: float = 5.0
    scale: float = 1.0
    width: int = 1024
    height: int = 1024
    #: a ``scheduler:`` name; ``None`` keeps the pipeline's current sampler
    scheduler: str | None = None
    guidance_rescale: float = 0.0
    zero_negative: str = "never"
    seed_mode: str = "cpu"
    #: with ``seed_mode="official"``: this image's place among the ``noise_samples`` images of one
    #: official call, whose noise stream is seeded ``seed - noise_index``
    noise_index: int = 0
    noise_samples: int = 1
    #: one PIL image per loaded ControlNet, in load order, already preprocessed; ``()``: no ControlNet
    control_images: tuple = ()
    #: PIL RGB, already width×height: the img2img / inpainting source
    init_image: Any = None
    #: PIL "L", already width×height: the inpainting mask (white = repaint); needs ``init_image``
    mask_image: Any = None
    #: ControlNet settings: one value per ControlNet, or a single value for all
    control_scale: tuple[float, ...] = (1.0,)
    control_start: tuple[float, ...] = (0.0,)
    control_end: tuple[float, ...] = (1.0,)
    #: img2img / inpainting: the fraction of the steps that denoise the init image
    strength: float = 0.8

    def batch_key(self) -> tuple:
        """What requests of one batch must share: every field but the per-image ones, and the mode
        (how many control images, whether an init image, whether a mask). With
        ``zero_negative="empty"`` an empty negative prompt may mean zeroed embeddings, so a batch must
        not mix empty and given negatives there (CLIP("") differs from zeros: the image would change)."""
        shared = tuple(getattr(self, f.name) for f in fields(self) if f.name not in _PER_IMAGE)
        mode = (len(self.control_images), self.init_image is not None, self.mask_image is not None)
        return (*shared, mode, self.zero_negative == "empty" and bool(self.negative_prompt))


#: a request's input pictures (each image its own)
_INPUT_IMAGES = frozenset({"control_images", "init_image", "mask_image"})
_PER_IMAGE = (
    frozenset({"prompt", "ref_embeds", "seed", "negative_prompt", "noise_index", "noise_samples"}) | _INPUT_IMAGES
)


def resolve_dtypes(dtype: str | None, device: str) -> tuple[torch.dtype, torch.dtype]:
    """``(sdxl dtype, encoder dtype)``. Default: fp16 SDXL + bf16 Qwen2-VL on GPUs (as the official code), fp32 on CPU."""
    canonical = DTYPE_ALIASES.get(str(dtype).strip().lower()) if dtype is not None else "auto"
    if canonical is None:
        raise UsageError(choice_error("dtype", dtype, sorted(set(DTYPE_ALIASES))))
    if canonical == "auto":
        if str(device).startswith("cpu"):
            return torch.float32, torch.float32
        return torch.float16, torch.bfloat16
    return getattr(torch, canonical), getattr(torch, canonical)


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise UsageError(choice_error("scheduler", name, tuple(SCHEDULERS)))
    sampler = SCHEDULERS[name]
    return getattr(diffusers, sampler.diffusers_class).from_config(config, **sampler.config)


class EasyRefPipeline:
    """An SDXL pipeline with EasyRef adapters installed, plus the reference encoder (loaded lazily)."""

    def __init__(
        self,
        sdxl,
        checkpoint: EasyRefCheckpoint,
        *,
        mllm_path: str | Path,
        device: str,
        sdxl_dtype: torch.dtype,
        encoder_dtype: torch.dtype,
        attention: adapter_mod.AttentionChoice,
        bidirectional_final: bool = False,
        scheduler: str = "euler",
        base_scheduler_config=None,
        compiled: dict | None = None,
        offload: str = "none",
        controlnets: Sequence = (),
    ):
        self.sdxl = sdxl
        self.checkpoint = checkpoint
        self.mllm_path = Path(mllm_path)
        self.device = device
        self.sdxl_dtype = sdxl_dtype
        self.encoder_dtype = encoder_dtype
        self.attention = attention
        self.bidirectional_final = bidirectional_final
        self._encoder: ReferenceEncoder | None = None
        self._scheduler_name = scheduler
        # the base model's own scheduler config: every sampler is built from it
        self._base_scheduler_config = base_scheduler_config or sdxl.scheduler.config
        self.compiled: dict = compiled or {"enabled": False, "reason": "not requested"}
        self.offload = offload
        self.controlnets: list = list(controlnets)
        # diffusers' pipeline per mode (ControlNet, img2img, inpainting), over the same components
        self._modes = control.ModePipelines(sdxl, self.controlnets, dtype=sdxl_dtype, device=device, offload=offload)

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path,
        mllm: str | Path,
        adapter: str | Path | EasyRefCheckpoint,
        *,
        device: str | None = None,
        dtype: str | None = None,
        attention: str = "auto",
        scheduler: str = "euler",
        bidirectional_final: bool = False,
        compile: bool = False,
        offload: str = "none",
        vae: str | Path | None = None,
        base_config: str | Path | None = None,
        loras: Sequence[tuple[str | Path, float]] = (),
        controlnets: Sequence[str | Path] = (),
    ) -> EasyRefPipeline:
        """Load SDXL (a diffusers folder, or a single file with ``base_config``; ``vae`` replacing its
        VAE), install EasyRef (full UNet weights, its LoRA merged, the decoupled adapter), fuse
        the community ``loras`` ``(file, weight)`` in order, then load the local ``controlnets``
        folders (diffusers ``ControlNetModel``; each attends to the text tokens only)."""
        device = device or default_device()
        sdxl_dtype, encoder_dtype = resolve_dtypes(dtype, device)
        base_folder = Path(base_model) if Path(base_model).is_dir() else None
        for path in controlnets:  # config files only: fail before loading anything
            control.check_controlnet(Path(path), base_folder)
        checkpoint = adapter if isinstance(adapter, EasyRefCheckpoint) else load_checkpoint(adapter)
        sdxl = load_sdxl(base_model, sdxl_dtype, config=base_config, vae=vae)
        base_scheduler_config = sdxl.scheduler.config
        sdxl.scheduler = make_scheduler(scheduler, base_scheduler_config)
        unet = sdxl.unet
        checkpoint.check_unet(unet)
        if checkpoint.unet_weights:
            _load_unet_weights(unet, checkpoint)
        if checkpoint.has_lora:
            adapter_mod.merge_lora(unet, checkpoint.lora)
        if loras:
            from easyref_cli.model.loras import fuse_loras

            fuse_loras(sdxl, loras)  # after EasyRef's LoRA, before its adapter takes the attention processors
        choice = adapter_mod.resolve_attention(attention, device, sdxl_dtype)
        adapter_mod.install_adapter(
            unet,
            checkpoint.ip,
            num_tokens=checkpoint.num_tokens,
            cross_attention_dim=checkpoint.cross_attention_dim,
            backend=choice.backend,
        )
        nets = control.load_controlnets(
            controlnets, base_model=base_folder, unet=unet, dtype=sdxl_dtype,
            num_tokens=checkpoint.num_tokens, backend=choice.backend,
        )  # fmt: skip
        placement = place_pipeline(sdxl, device, offload)
        for net in nets if placement == "none" else ():  # offloaded: the mode's pipeline hooks them
            net.to(device)
        compiled = compile_unet(sdxl, device) if compile else {"enabled": False, "reason": "not requested"}
        sdxl.set_progress_bar_config(disable=True)
        return cls(
            sdxl,
            checkpoint,
            mllm_path=mllm,
            device=device,
            sdxl_dtype=sdxl_dtype,
            encoder_dtype=encoder_dtype,
            attention=choice,
            bidirectional_final=bidirectional_final,
            scheduler=scheduler,
            base_scheduler_config=base_scheduler_config,
            compiled=compiled,
            offload=placement,
            controlnets=nets,
        )

    def set_scheduler(self, name: str) -> None:
        """Switch the sampler (built from the base model's own scheduler config)."""
        if name != self._scheduler_name:
            self.sdxl.scheduler = make_scheduler(name, self._base_scheduler_config)
            self._scheduler_name = name

    @property
    def encoder(self) -> ReferenceEncoder:
        """The reference encoder, loaded on first use (a fully cached run never loads it)."""
        if self._encoder is None:
            self._encoder = ReferenceEncoder.from_pretrained(
                self.mllm_path,
                self.checkpoint,
                device=self.device,
                dtype=self.encoder_dtype,
                bidirectional_final=self.bidirectional_final,
            )
        return self._encoder

    # ---- encoding ------------------------------------------------------------------------------

    def encode_references(self, images: Sequence, caption: str = "", instruction: str = INSTRUCTION) -> RefEmbeds:
        enc = self.encoder
        return RefEmbeds(cond=enc.encode(images, caption, instruction), uncond=enc.encode_uncond(instruction))

    # ---- generation ----------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str,
        *,
        refs: Sequence | None = None,
        ref_embeds: RefEmbeds | None = None,
        negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT,
        seed: int = 0,
        steps: int = 30,
        guidance: float = 5.0,
        scale: float = 1.0,
        width: int = 1024,
        height: int = 1024,
        guidance_rescale: float = 0.0,
        zero_negative: str = "never",
        caption: str | None = None,
        instruction: str = INSTRUCTION,
        control_images: Sequence = (),
        init_image=None,
        mask_image=None,
        strength: float = 0.8,
        control_scale: float | Sequence[float] = (1.0,),
        control_start: float | Sequence[float] = (0.0,),
        control_end: float | Sequence[float] = (1.0,),
    ):
        """Generate one image. Pass ``refs`` (PIL images) or precomputed ``ref_embeds``; ``control_images``
        (one per loaded ControlNet), ``init_image`` (img2img) and ``mask_image`` (inpainting, with
        ``init_image``) pick the mode (see :class:`GenerationRequest`)."""
        # 1. check inputs before any work
        if (refs is None) == (ref_embeds is None):
            raise UsageError("pass exactly one of refs= or ref_embeds=")
        # 2. encode references (caption defaults to the prompt, as the official code)
        if ref_embeds is None:
            ref_embeds = self.encode_references(refs, prompt if caption is None else caption, instruction)
        request = GenerationRequest(
            prompt=prompt,
            ref_embeds=ref_embeds,
            seed=seed,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            scale=scale,
            width=width,
            height=height,
            scheduler=self._scheduler_name,
            guidance_rescale=guidance_rescale,
            zero_negative=zero_negative,
            control_images=tuple(control_images),
            init_image=init_image,
            mask_image=mask_image,
            strength=strength,
            control_scale=_floats(control_scale),
            control_start=_floats(control_start),
            control_end=_floats(control_end),
        )
        return self.generate([request])[0]

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[GenerationRequest], step_callback: Callable[[int, int], None] | None = None
    ) -> list:
        """Generate a batch of images sharing steps/size/guidance/scale and mode. One CPU generator per image,
        so the pixels of an image depend only on its own seed and settings, never on the batch it ran in."""
        # 1. check inputs
        if not requests:
            return []
        first = requests[0]
        if any(r.batch_key() != first.batch_key() for r in requests):
            raise UsageError(
                "a batch must share steps, guidance, scale, size, scheduler, mode (ControlNet, img2img, inpainting) "
                "and its settings, and whether a negative prompt is given"
            )
        check_size(first.width, first.height)
        mode = control.check_requests(requests, len(self.controlnets))
        if first.scheduler is not None:
            self.set_scheduler(first.scheduler)
        pipe = self._modes.get(mode)  # diffusers' pipeline for the mode, over the same components
        device = pipe._execution_device  # honours CPU offload hooks
        # 2. text embeddings (CLIP, 77 tokens each)
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode_text(requests, device)
        # 3. context = [text ; reference tokens]; negative = [negative text ; uncond reference tokens]
        cond = torch.stack([r.ref_embeds.cond for r in requests]).to(device=device, dtype=prompt_embeds.dtype)
        uncond = torch.stack([r.ref_embeds.uncond for r in requests]).to(device=device, dtype=prompt_embeds.dtype)
        prompt_embeds = torch.cat([prompt_embeds, cond], dim=1)
        negative_embeds = torch.cat([negative_embeds, uncond], dim=1)
        # 4. adapter scale
        adapter_mod.set_scale(pipe.unet, first.scale)
        # 5. initial noise: one CPU generator per image, or the official call's stream
        generators, latents = self.prepare_noise(requests, device, prompt_embeds.dtype)

        def on_step_end(_pipe, step, _t, kwargs):  # img2img/inpainting run the last strength × steps only
            step_callback(step + 1, _pipe.num_timesteps if mode.init else first.steps)
            return kwargs

        callback = on_step_end if step_callback is not None else None

        # 6. denoise + decode (reference K/V computed once per image, not once per step)
        args = (prompt_embeds, negative_embeds, pooled, negative_pooled, first)
        kw = {"mode": mode, "requests": requests}
        try:
            with adapter_mod.reference_kv_cache(pipe.unet, enabled=not self.compiled["enabled"]):
                out = self._denoise(*args, generators, callback, latents, pipe=pipe, **kw)
        except Exception as exc:  # noqa: BLE001 - torch.compile fails lazily, on the first call
            from easyref_cli.batching import is_out_of_memory

            if not self.compiled["enabled"] or is_out_of_memory(exc):  # OOM: the caller retries smaller
                raise
            logger.warning("the compiled UNet failed (%s: %s); falling back to eager", type(exc).__name__, exc)
            self.sdxl.unet = getattr(self.sdxl.unet, "_orig_mod", self.sdxl.unet)
            pipe = self._modes.get(mode)  # the mode's pipeline takes the eager UNet too
            self.compiled = {"enabled": False, "reason": f"torch.compile failed at run time: {type(exc).__name__}"}
            generators, latents = self.prepare_noise(requests, device, prompt_embeds.dtype)
            with adapter_mod.reference_kv_cache(pipe.unet):
                out = self._denoise(*args, generators, callback, latents, pipe=pipe, **kw)
        images = [pipe.image_processor.numpy_to_pil(a[None])[0] if np.isfinite(a).all() else None for a in out.images]
        if any(im is None for im in images):
            raise NonFiniteImages(images, [r.seed for r, im in zip(requests, images, strict=True) if im is None])
        return images

    def encode_text(self, requests: Sequence[GenerationRequest], device=None):
        """CLIP text embeddings ``(prompt, negative, pooled, negative pooled)`` of a batch. Negative prompts
        are encoded as given, ``""`` included, as the official ``generate()`` does; ``zero_negative`` picks
        SDXL's zeroed negatives instead (``"empty"``: diffusers' rule, by the model's
        ``force_zeros_for_empty_prompt``, when every negative of the batch is empty; ``"always"``)."""
        mode = requests[0].zero_negative
        negatives = [r.negative_prompt for r in requests]
        embeds = self.sdxl.encode_prompt(
            [r.prompt for r in requests],
            device=device or self.sdxl._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None if mode == "empty" and not any(negatives) else negatives,
        )
        if mode == "always":
            prompt_embeds, negative_embeds, pooled, negative_pooled = embeds
            return prompt_embeds, torch.zeros_like(negative_embeds), pooled, torch.zeros_like(negative_pooled)
        return embeds

    def prepare_noise(self, requests: Sequence[GenerationRequest], device, dtype):
        """``(generators, latents)`` for a batch. ``seed_mode="cpu"``: a CPU generator per image, diffusers
        draws the latents. ``"official"``: each image's latents are its slice of the official call's
        ``randn((noise_samples, C, h/8, w/8), generator=torch.Generator(device).manual_seed(seed - noise_index))``,
        drawn in the text embeddings' dtype as diffusers does, so neither batching nor resuming changes them."""
        first = requests[0]
        if first.seed_mode == "cpu":
            return [torch.Generator("cpu").manual_seed(int(r.seed)) for r in requests], None
        if SCHEDULERS[self._scheduler_name].stochastic:
            raise UsageError(
                f"seed_mode 'official' cannot replay the per-step noise of the {self._scheduler_name} scheduler"
            )
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.sdxl
        shape = (
            pipe.unet.config.in_channels,
            first.height // pipe.vae_scale_factor,
            first.width // pipe.vae_scale_factor,
        )
        latents = []
        for r in requests:
            generator = torch.Generator(device).manual_seed(int(r.seed) - r.noise_index)
            stream = randn_tensor(
                (r.noise_samples, *shape), generator=generator, device=torch.device(device), dtype=dtype
            )
            latents.append(stream[r.noise_index])
        return None, torch.stack(latents)

    def _denoise(
        self, prompt_embeds, negative_embeds, pooled, negative_pooled, first, generators, callback, latents,
        *, pipe=None, mode: control.Mode | None = None, requests: Sequence[GenerationRequest] = (),
    ):  # fmt: skip
        """One call of diffusers' pipeline for ``mode`` (text-to-image on the base pipeline by default)
        over a batch of ``requests``, their mode's own inputs from :func:`control.mode_kwargs`."""
        import warnings

        pipe, mode = self.sdxl if pipe is None else pipe, mode or control.Mode()
        kwargs = control.mode_kwargs(pipe, mode, requests or [first])
        if mode.takes_size:  # diffusers' img2img takes the init image's size
            kwargs.update(width=first.width, height=first.height)
        if mode.takes_guidance_rescale:
            kwargs["guidance_rescale"] = first.guidance_rescale
        with warnings.catch_warnings():
            # diffusers' fp16 VAE upcast warns on every image; nothing for a user to act on
            warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
            return pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                generator=generators,
                latents=latents,
                output_type="np",
                callback_on_step_end=callback,
                **kwargs,
            )


class NonFiniteImages(JobError):
    """Some images of a batch came out NaN/inf; ``images`` holds the good ones (``None`` for the bad)."""

    def __init__(self, images: list, bad_seeds: list[int]):
        super().__init__(
            f"the image for seed(s) {bad_seeds} has NaN/inf pixels (numerical overflow; a float32 or bfloat16 dtype avoids it)"
        )
        self.images = images
        self.bad_seeds = bad_seeds


def place_pipeline(sdxl, device: str, offload: str) -> str:
    """Move SDXL to ``device``, or set up accelerate CPU offload for small GPUs. Returns what was done."""
    if offload not in OFFLOAD_CHOICES:
        raise UsageError(choice_error("offload", offload, OFFLOAD_CHOICES))
    if offload != "none" and str(device).startswith("cpu"):
        logger.warning("offload=%r has no effect on the CPU; ignoring it", offload)
        offload = "none"
    if offload == "model":
        sdxl.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        sdxl.enable_sequential_cpu_offload(device=device)
    else:
        sdxl.to(device)
    return offload


def compile_unet(sdxl, device: str) -> dict:
    """``torch.compile`` the UNet where it pays off (CUDA); elsewhere fall back to eager and say why.

    Shapes are static (``dynamic=False``): each new batch size compiles once more — with
    ``--batch-size auto`` the probe size 1, the size it settles on and any shorter last batch.
    """
    if not str(device).startswith("cuda"):
        logger.warning("compile is only used on CUDA devices; running the UNet eagerly on %s", device)
        return {"enabled": False, "reason": f"not supported on {device}"}
    try:
        sdxl.unet = torch.compile(sdxl.unet, mode="max-autotune-no-cudagraphs", fullgraph=False, dynamic=False)
    except Exception as exc:  # noqa: BLE001 - backend missing etc.
        logger.warning("torch.compile failed (%s); running eagerly", exc)
        return {"enabled": False, "reason": f"torch.compile failed: {type(exc).__name__}"}
    return {"enabled": True, "reason": "torch.compile (max-autotune-no-cudagraphs)"}


def _floats(values: float | Sequence[float]) -> tuple[float, ...]:
    return (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise UsageError(f"width and height must be positive multiples of 8, got {width}x{height}")


def load_sdxl(
    base_model: str | Path, dtype: torch.dtype, *, config: str | Path | None = None, vae: str | Path | None = None
):
    """SDXL from a diffusers folder or a single-file checkpoint (A1111/ComfyUI layout, its component configs
    from ``config`` — ``--base-config`` — else the cached default SDXL repo), offline; ``vae`` (a diffusers
    VAE folder, a folder holding ``vae/``, or a single file) replaces its VAE, config included: a
    ``force_upcast: false`` (fp16-safe) VAE is decoded in float16 by diffusers, without the fp32 upcast.
    Paths are local (hub ids were resolved by :mod:`easyref_cli.model.hub`)."""
    from diffusers import StableDiffusionXLPipeline

    from easyref_cli.model import single_file

    path = Path(base_model)
    folder = single_file.check_sdxl_sources(path, config=config, vae=vae)  # before loading anything
    compat.quiet_loading()
    compat.quiet_dtype_casts()
    replacement = single_file.load_vae(vae, dtype, folder) if vae is not None else None
    if path.is_file():
        pipe = single_file.load_single_file_sdxl(path, dtype, config=folder, vae=replacement)
    else:
        if config is not None:
            logger.warning("--base-config %s is only used with a single-file --base-model; ignoring it", config)
        components = {} if replacement is None else {"vae": replacement}
        try:
            pipe = compat.diffusers_from_pretrained(StableDiffusionXLPipeline, str(path), dtype, **components)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many types
            raise ModelError(f"cannot load the SDXL pipeline from {base_model}: {exc}") from exc
    if vae is not None:
        single_file.check_vae_fits(pipe, vae)
    return pipe


def _load_unet_weights(unet, checkpoint: EasyRefCheckpoint) -> None:
    expected = unet.state_dict()
    unknown = [k for k in checkpoint.unet_weights if k not in expected]
    if unknown:
        from easyref_cli.errors import CheckpointError

        raise CheckpointError(f"{checkpoint.source}: unet weights the base model does not have: {unknown[:8]}")
    logger.warning(
        "%s carries %d full UNet tensors (of %d): they replace the base model's",
        checkpoint.source, len(checkpoint.unet_weights), len(expected),
    )  # fmt: skip
    unet.load_state_dict(checkpoint.unet_weights, strict=False)
