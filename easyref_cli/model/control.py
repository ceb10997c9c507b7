"""ControlNet, img2img and inpainting for :class:`~easyref_cli.model.pipeline.EasyRefPipeline`.

As the official ``set_ip_adapter`` does, every attention module of a ControlNet gets a processor that
drops the last ``num_tokens`` tokens of the context (DESIGN §2 rule 7): the UNet reads
``[text ; reference tokens]``, the ControlNet the text tokens only (:class:`TextOnlyAttnProcessor`,
the official ``CNAttnProcessor2_0``).

Each mode runs diffusers' own SDXL pipeline for it, built with ``from_pipe`` over the base pipeline's
components (:class:`ModePipelines`): text-to-image, ControlNet, img2img, inpainting, ControlNet +
img2img, ControlNet + inpainting.

:func:`check_controlnet` reads config files only (no torch), so a run can check its ControlNets
before loading anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref_cli.errors import ModelError, UsageError
from easyref_cli.settings import per_net

logger = logging.getLogger(__name__)

__all__ = [
    "Mode",
    "ModePipelines",
    "TextOnlyAttnProcessor",
    "check_controlnet",
    "check_requests",
    "load_controlnets",
    "mode_of",
]

#: UNet config keys a ControlNet must share with the base model's UNet.
FIT_KEYS = ("cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim")


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """What a batch does: ``controls`` control images (one per ControlNet), an init image, a mask."""

    controls: int = 0
    init: bool = False
    mask: bool = False

    @property
    def key(self) -> tuple[bool, bool, bool]:
        return bool(self.controls), self.init, self.mask

    @property
    def pipeline_class(self) -> str:
        return _PIPELINES[self.key]

    @property
    def takes_size(self) -> bool:
        """diffusers' img2img pipeline has no width/height: the init image's size is the image's."""
        return self.key != (False, True, False)

    @property
    def takes_guidance_rescale(self) -> bool:
        """diffusers' ControlNet text-to-image and ControlNet img2img pipelines have no guidance_rescale."""
        return self.key not in {(True, False, False), (True, True, False)}

    @property
    def name(self) -> str:
        parts = (["ControlNet"] if self.controls else []) + (
            ["inpainting"] if self.mask else ["img2img"] if self.init else []
        )
        return " + ".join(parts) or "text-to-image"


_PIPELINES = {
    (False, False, False): "StableDiffusionXLPipeline",
    (True, False, False): "StableDiffusionXLControlNetPipeline",
    (False, True, False): "StableDiffusionXLImg2ImgPipeline",
    (False, True, True): "StableDiffusionXLInpaintPipeline",
    (True, True, False): "StableDiffusionXLControlNetImg2ImgPipeline",
    (True, True, True): "StableDiffusionXLControlNetInpaintPipeline",
}


def mode_of(request) -> Mode:
    return Mode(len(request.control_images), request.init_image is not None, request.mask_image is not None)


def check_requests(requests: Sequence, num_controlnets: int) -> Mode:
    """The mode of a batch (its requests share it: see ``GenerationRequest.batch_key``); a
    :class:`UsageError` for inputs that cannot run, before any work."""
    first = requests[0]
    mode = mode_of(first)
    if mode.mask and not mode.init:
        raise UsageError("an inpainting mask needs an init image (the image to repaint)")
    if mode.controls:
        _check_control(first, mode.controls, num_controlnets)
        if first.guidance_rescale and not mode.takes_guidance_rescale:
            raise UsageError(f"guidance_rescale is not available with {mode.name} (diffusers' pipeline has none)")
    if mode.init:
        _check_init(requests, mode)
    return mode


def _check_control(first, controls: int, num_controlnets: int) -> None:
    if not num_controlnets:
        raise UsageError("control images were given but no ControlNet is loaded")
    if controls != num_controlnets:
        raise UsageError(
            f"{controls} control image(s) for {num_controlnets} ControlNet(s): give one per ControlNet, in load order"
        )
    from easyref_cli.settings import PER_NET_KEYS

    for name in (k for k in PER_NET_KEYS if hasattr(first, k)):  # the request's one-or-each fields
        if len(getattr(first, name)) not in (1, num_controlnets):
            raise UsageError(
                f"{name} takes one value or one per ControlNet ({num_controlnets}), got {len(getattr(first, name))}"
            )
    starts = per_net(first.control_start, num_controlnets)
    ends = per_net(first.control_end, num_controlnets)
    for start, end in zip(starts, ends, strict=True):
        if not 0.0 <= start < end <= 1.0:
            raise UsageError(f"control_start and control_end need 0 <= start < end <= 1, got {start} and {end}")


def _check_init(requests: Sequence, mode: Mode) -> None:
    first = requests[0]
    if first.seed_mode == "official":
        raise UsageError("seed_mode official replays text-to-image and ControlNet calls only")
    if not 0.0 < first.strength <= 1.0:
        raise UsageError(f"strength must be in (0, 1], got {first.strength}")
    if int(first.steps * first.strength) < 1:
        raise UsageError(f"strength {first.strength} of {first.steps} steps leaves no denoising step")
    size = (first.width, first.height)
    for r in requests:
        for what, image in (("init image", r.init_image), ("mask", r.mask_image)):
            if image is not None and tuple(image.size) != size:
                raise UsageError(f"the {what} is {image.size[0]}x{image.size[1]}, the image {size[0]}x{size[1]}")


# --------------------------------------------------------------------------------------------
# ControlNet models
# --------------------------------------------------------------------------------------------


class TextOnlyAttnProcessor:
    """The official ``CNAttnProcessor2_0``: drop the last ``num_tokens`` tokens (the reference tokens)
    of the context, then attend as diffusers' stock processor does. Self-attention is unchanged."""

    def __init__(self, num_tokens: int, backend: str = "sdpa"):
        from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

        self.num_tokens = num_tokens
        self.backend = backend
        self.inner = XFormersAttnProcessor() if backend == "xformers" else AttnProcessor2_0()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states[:, : encoder_hidden_states.shape[1] - self.num_tokens]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _read_json(path: Path, folder: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a diffusers ControlNet folder: it has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{folder}: cannot read {path.name}: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{folder}: {path.name} is not a JSON object")
    return value


def check_controlnet(controlnet: Path, base_model: Path | None) -> None:
    """UsageError naming the folder when ``controlnet`` is not a diffusers ControlNet folder (no config.json,
    _class_name not ControlNetModel, unreadable JSON) or does not fit the base model: cross_attention_dim,
    addition_embed_type ('text_time' for SDXL) or projection_class_embeddings_input_dim differ from
    base_model/unet/config.json (skip the base comparison when base_model is None or not a folder)."""
    folder = Path(controlnet)
    if not folder.is_dir():
        raise UsageError(f"ControlNet {folder} is not a folder (a diffusers ControlNet folder is expected)")
    config = _read_json(folder / "config.json", folder)
    if config.get("_class_name") != "ControlNetModel":
        raise UsageError(
            f"{folder} is not a diffusers ControlNet folder: its config.json names "
            f"{config.get('_class_name')!r}, not 'ControlNetModel'"
        )
    if base_model is None or not Path(base_model).is_dir():
        return
    unet_config = Path(base_model) / "unet" / "config.json"
    if unet_config.is_file():
        check_fit(config, _read_json(unet_config, Path(base_model)), folder)


def check_fit(controlnet_config, unet_config, folder: Path | str) -> None:
    """UsageError when the ControlNet's :data:`FIT_KEYS` differ from the base UNet's."""
    for key in FIT_KEYS:
        ours, base = controlnet_config.get(key), unet_config.get(key)
        if ours != base:
            raise UsageError(
                f"ControlNet {folder} does not fit the base model: its {key} is {ours!r}, the base UNet's {base!r}"
                " (an SDXL ControlNet is needed)"
            )


def load_controlnets(paths: Sequence[str | Path], *, base_model, unet, dtype, num_tokens: int, backend: str) -> list:
    """Each local ControlNet folder, checked against the base model, loaded in ``dtype``, with a
    :class:`TextOnlyAttnProcessor` on every attention module."""
    import warnings

    from diffusers import ControlNetModel

    controlnets = []
    for path in paths:
        check_controlnet(Path(path), Path(base_model) if base_model is not None else None)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                model = ControlNetModel.from_pretrained(str(path), torch_dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many types
            raise ModelError(f"cannot load the ControlNet from {path}: {exc}") from exc
        check_fit(model.config, unet.config, path)  # a single-file base model has no folder to read before
        model.set_attn_processor(TextOnlyAttnProcessor(num_tokens, backend))
        controlnets.append(model.eval())
    return controlnets


# --------------------------------------------------------------------------------------------
# diffusers pipelines per mode
# --------------------------------------------------------------------------------------------


class ModePipelines:
    """diffusers' SDXL pipeline for each mode, built once with ``from_pipe`` over the base pipeline's
    components (same UNet, VAE, text encoders and scheduler objects) plus the ControlNets.

    :meth:`get` keeps a derived pipeline in step with the base one (the scheduler that
    ``set_scheduler`` replaced, the UNet a compile fallback replaced) and, with CPU offload, moves the
    accelerate hooks over to the pipeline about to run: ``enable_*_cpu_offload`` first removes the
    hooks of every component, shared ones included, then hooks the components of its own pipeline,
    the ControlNet too (with model offload, each pipeline call re-hooks its own components at its end).
    """

    def __init__(self, sdxl, controlnets: Sequence, *, dtype, device: str, offload: str = "none"):
        self.sdxl = sdxl
        self.controlnets = list(controlnets)
        self.dtype = dtype
        self.device = device
        self.offload = offload
        self._cache: dict[tuple, Any] = {}
        self._hooked = sdxl  # place_pipeline set up the base pipeline's offload

    def get(self, mode: Mode):
        if not any(mode.key):
            pipe = self.sdxl
        else:
            pipe = self._cache.get(mode.key)
            if pipe is None:
                pipe = self._cache[mode.key] = self._build(mode)
            if pipe.unet is not self.sdxl.unet:
                pipe.unet = self.sdxl.unet
            if pipe.scheduler is not self.sdxl.scheduler:
                pipe.scheduler = self.sdxl.scheduler
        if self.offload != "none" and self._hooked is not pipe:
            getattr(pipe, f"enable_{self.offload}_cpu_offload")(device=self.device)
            self._hooked = pipe
        return pipe

    def _build(self, mode: Mode):
        import warnings

        import diffusers

        extra = {}
        if mode.controls:
            extra["controlnet"] = self.controlnets[0] if len(self.controlnets) == 1 else list(self.controlnets)
        cls = getattr(diffusers, mode.pipeline_class)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.from_pipe(
                self.sdxl, unet=self.sdxl.unet, scheduler=self.sdxl.scheduler, torch_dtype=self.dtype, **extra
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def mode_kwargs(pipe, mode: Mode, requests: Sequence) -> dict[str, Any]:
    """The mode's own arguments of the diffusers call: control images and ControlNet settings, init
    image and strength, mask."""
    first = requests[0]
    kwargs: dict[str, Any] = {}
    if mode.controls:
        n = mode.controls
        scale, start, end = ([float(x) for x in per_net(v, n)] for v in (first.control_scale, first.control_start,
                                                                          first.control_end))  # fmt: skip
        if n == 1:  # a single ControlNet takes floats and one image per prompt
            images: Any = [r.control_images[0] for r in requests]
            scale, start, end = scale[0], start[0], end[0]
        else:  # several: one entry per net; a batch tensor per net (a nested list is refused)
            images = [
                pipe.control_image_processor.preprocess(
                    [r.control_images[k] for r in requests], height=first.height, width=first.width
                )
                for k in range(n)
            ]
        kwargs["control_image" if mode.init else "image"] = images
        kwargs.update(controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end)
    if mode.init:
        kwargs.update(image=[r.init_image for r in requests], strength=float(first.strength))
    if mode.mask:
        kwargs["mask_image"] = [r.mask_image for r in requests]
    return kwargs
