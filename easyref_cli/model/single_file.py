"""Single-file SDXL checkpoints (the A1111 / ComfyUI / SGM layout) and replacement VAEs (``--vae``).

A single file holds weights only: ``StableDiffusionXLPipeline.from_single_file`` builds every component
from the configs of a diffusers SDXL folder — ``--base-config``, else the default SDXL repo
(:data:`~easyref_cli.constants.DEFAULT_BASE_MODEL`) if the Hugging Face cache has it — and is always
called with ``local_files_only=True``, so it never reaches the hub (without a local config it would try
to download one). A miss is a :class:`ModelError` that says what to pass.

The checks here read only a ``.safetensors`` header (8-byte length + JSON) and config files, never a
tensor, and are torch-free: :func:`check_sdxl_sources` lets phase 1 refuse a bad file before any
encoding. Loading (:func:`load_single_file_sdxl`, :func:`load_vae`) imports torch/diffusers lazily.

``force_upcast``: in float16, SDXL's ``__call__`` decodes in float32 (casting the VAE up and back per
batch) when ``vae.config.force_upcast`` is true, as SDXL's own VAE needs. An fp16-safe VAE (e.g.
madebyollin/sdxl-vae-fp16-fix) says ``force_upcast: false`` in its config and is decoded in float16:
:func:`load_vae` keeps the given VAE's config as it is, and nothing else in this package casts the VAE.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from easyref_cli.constants import DEFAULT_BASE_MODEL
from easyref_cli.errors import ModelError

logger = logging.getLogger(__name__)

#: Single-file checkpoint suffixes: safetensors, or a pickled (zip) torch checkpoint.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
#: The width of each text encoder: diffusers tells the two apart by it (see :func:`_text_widths`).
CLIP_WIDTH_KEY = CLIP_PREFIX + "text_model.embeddings.position_embedding.weight"
OPEN_CLIP_WIDTH_KEY = OPEN_CLIP_PREFIX + "positional_embedding"
#: What ``from_single_file`` reads from the config folder (no weights).
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit


# ----------------------------------------------------------------------------------------------
# Torch-free checks (headers and configs only)
# ----------------------------------------------------------------------------------------------


def safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor name → shape, from a ``.safetensors`` header alone (no tensor is read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < size <= _MAX_HEADER:
                raise ValueError(f"bad header length {size}")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from None
    return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def sdxl_layout_problem(shapes: dict[str, Any], *, need_vae: bool = True) -> str | None:
    """What keeps a single file's tensors (name → shape) from being an SDXL base checkpoint in the
    original layout, or ``None``. Without ``need_vae`` (a ``--vae`` is given) the file may lack a VAE."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has("cond_stage_model."):
        return "a Stable Diffusion 1.x/2.x checkpoint (EasyRef needs SDXL)"
    if has("conditioner.embedders.0.model."):
        return "an SDXL refiner checkpoint (EasyRef needs an SDXL base model)"
    parts = {
        "UNet": UNET_PREFIX,
        "CLIP ViT-L text encoder": CLIP_PREFIX,
        "OpenCLIP bigG text encoder": OPEN_CLIP_PREFIX,
    }
    missing = [name for name, prefix in parts.items() if not has(prefix)]
    if len(missing) == len(parts):
        return (
            f"not an SDXL checkpoint in the A1111/ComfyUI single-file layout: none of its {len(shapes)} tensors is "
            f"under {UNET_PREFIX}*, conditioner.embedders.0/1.* or first_stage_model.*{_looks_like(shapes)}"
        )
    if need_vae and not any(has(p) for p in VAE_PREFIXES):
        missing.append("VAE (or pass --vae)")
    if missing:
        return f"an incomplete SDXL checkpoint: no {', no '.join(missing)} weights"
    if UNET_PREFIX + "label_emb.0.0.weight" not in shapes:
        return "its UNet is not SDXL's (no label_emb size/crop conditioning)"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight") or []
    if len(conv_in) == 4 and conv_in[1] != 4:
        return f"an SDXL inpainting or edit checkpoint (its UNet takes {conv_in[1]} input channels, not 4)"
    return None


def _looks_like(shapes: dict[str, Any]) -> str:
    if any("lora" in k.lower() for k in shapes):
        return " (it looks like a LoRA: use --lora)"
    if any(k.startswith(("decoder.", *(p + "decoder." for p in VAE_PREFIXES))) for k in shapes):
        return " (it looks like a VAE: use --vae)"
    if any(k.startswith(("down_blocks.", "text_model.")) for k in shapes):
        return " (it looks like one diffusers component: pass its diffusers folder instead)"
    return ""


def check_single_file(path: str | Path, *, need_vae: bool = True) -> dict[str, list[int]] | None:
    """Refuse (:class:`ModelError` naming the file) a single file that is not an SDXL base checkpoint.

    Torch-free: a ``.safetensors`` is checked by its header and its shapes returned; a pickled ``.ckpt``
    cannot be read without torch and is checked when loaded (``None``)."""
    path = Path(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelError(
            f"--base-model {path}: a single-file base model must be {'/'.join(SINGLE_FILE_SUFFIXES)}, "
            "otherwise pass a diffusers SDXL folder"
        )
    if path.suffix.lower() != ".safetensors":
        return None
    shapes = safetensors_shapes(path)
    problem = sdxl_layout_problem(shapes, need_vae=need_vae)
    if problem:
        raise ModelError(f"--base-model {path}: {problem}")
    return shapes


def _config_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return "not a folder"
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    return f"no {', '.join(missing)}" if missing else None


def _cached_default_config() -> Path | None:
    """The default SDXL repo's snapshot in the Hugging Face cache (configs suffice), or ``None``."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(DEFAULT_BASE_MODEL, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and friends)
        return None
    return folder if _config_problem(folder) is None else None


def config_folder(base_file: str | Path, config: str | Path | None) -> Path:
    """The local diffusers SDXL folder whose configs a single-file ``base_file`` is built with:
    ``config`` (``--base-config``), else the cached default SDXL repo."""
    if config is not None:
        problem = _config_problem(Path(config))
        if problem:
            raise ModelError(
                f"--base-config {config}: {problem}; it must be a diffusers SDXL folder (model_index.json and the "
                "unet, vae, text_encoder(_2), tokenizer(_2) and scheduler configs; weights are not needed)"
            )
        return Path(config)
    cached = _cached_default_config()
    if cached is not None:
        return cached
    raise ModelError(
        f"--base-model {base_file}: a single-file SDXL checkpoint takes its component configs from a diffusers "
        f"SDXL folder, and {DEFAULT_BASE_MODEL} is not in the Hugging Face cache: pass --base-config DIR, a "
        f"diffusers SDXL folder (e.g. {DEFAULT_BASE_MODEL}; its configs alone are enough: `hf download "
        f"{DEFAULT_BASE_MODEL} --include '*.json' '*.txt' --local-dir DIR` on a connected machine) whose configs "
        "match this checkpoint"
    )


def _vae_class(config: Path) -> str | None:
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def check_vae_source(vae: str | Path) -> None:
    """Refuse (:class:`ModelError` naming ``--vae``) what cannot be an SDXL VAE: a folder without an
    ``AutoencoderKL`` config (itself or ``vae/``), a file of another suffix, a safetensors without
    decoder weights. Torch-free."""
    path = Path(vae)
    if path.is_dir():
        for config in (path / "config.json", path / "vae" / "config.json"):
            if config.is_file():
                cls = _vae_class(config)
                if cls != "AutoencoderKL":
                    raise ModelError(f"--vae {vae}: {config} is a {cls} config, not an AutoencoderKL (SDXL VAE) one")
                return
        raise ModelError(f"--vae {vae}: neither config.json nor vae/config.json: not a diffusers VAE folder")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"--vae {vae}: a VAE file must be {'/'.join(SINGLE_FILE_SUFFIXES)}, or pass its folder")
    if path.suffix.lower() == ".safetensors":
        shapes = safetensors_shapes(path)
        if not any(k.endswith("decoder.conv_out.weight") for k in shapes):
            raise ModelError(f"--vae {vae}: no decoder.conv_out weights: not a VAE{_looks_like(shapes)}")


def check_sdxl_sources(
    base_model: str | Path, *, config: str | Path | None = None, vae: str | Path | None = None
) -> Path:
    """Phase-1 check of what :func:`easyref_cli.model.pipeline.load_sdxl` will load, before any encoding
    (torch-free: headers and configs only). Returns the folder the SDXL components take their configs
    from: ``base_model`` itself, or for a single file ``--base-config`` / the cached default repo (its
    ``unet/config.json`` is the one to check an adapter against)."""
    base = Path(base_model)
    if base.is_file():
        check_single_file(base, need_vae=vae is None)
        folder = config_folder(base, config)
    else:
        if not (base / "model_index.json").is_file():
            raise ModelError(
                f"--base-model {base_model}: not an SDXL pipeline folder (no model_index.json) nor a single-file "
                "checkpoint (.safetensors/.ckpt)"
            )
        folder = base
    if vae is not None:
        check_vae_source(vae)
    return folder


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def check_loaded(modules: dict[str, Any], what: str) -> None:
    """Every parameter of ``modules`` holds weights: diffusers leaves what a single file lacks on the
    meta device (it is built empty and filled from the file), which would fail only at the first step."""
    for name, module in modules.items():
        empty = [k for k, t in (*module.named_parameters(), *module.named_buffers()) if t.device.type == "meta"]
        if empty:
            raise ModelError(
                f"{what}: no weights for {name} in it ({', '.join(empty[:4])}{', …' if empty[4:] else ''})"
            )


def _ckpt_shapes(path: Path, *, need_vae: bool) -> dict[str, list[int]]:
    """A pickled checkpoint's tensor shapes, checked as :func:`check_single_file` checks a safetensors header
    (its tensors are memory-mapped by diffusers' loader, not read)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    shapes = {k: list(v.shape) for k, v in checkpoint.items() if hasattr(v, "shape")}
    problem = sdxl_layout_problem(shapes, need_vae=need_vae)
    if problem:
        raise ModelError(f"--base-model {path}: {problem}")
    return shapes


def _open_clip_text_encoder(path: Path, folder: Path, dtype):
    """``text_encoder_2`` from the file's ``conditioner.embedders.1.model.*`` (diffusers' own conversion).

    diffusers picks each text encoder's weights by width (CLIP ViT-L 768, OpenCLIP bigG 1280): with two
    encoders of one width, as in small test models, ``text_encoder_2`` would get the first encoder's
    weights and no ``text_projection``. Loading it by prefix is what diffusers does for real SDXL."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, load_single_file_checkpoint
    from transformers import CLIPTextModelWithProjection

    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(OPEN_CLIP_PREFIX)}  # noqa: SIM118
    else:
        tensors = load_single_file_checkpoint(str(path), local_files_only=True)
    config = CLIPTextModelWithProjection.config_class.from_pretrained(
        str(folder), subfolder="text_encoder_2", local_files_only=True
    )
    with init_empty_weights():
        model = CLIPTextModelWithProjection(config)
    state = convert_open_clip_checkpoint(model, tensors, prefix=OPEN_CLIP_PREFIX)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def load_single_file_sdxl(path: str | Path, dtype, *, config: str | Path | None = None, vae=None):
    """An SDXL pipeline from a single-file checkpoint, offline, its components built with the configs of
    :func:`config_folder`; ``vae`` (a loaded ``AutoencoderKL``) replaces the file's own."""
    from diffusers import StableDiffusionXLPipeline

    from easyref_cli.model import compat

    path = Path(path)
    shapes = check_single_file(path, need_vae=vae is None)
    folder = config_folder(path, config)
    components: dict[str, Any] = {} if vae is None else {"vae": vae}
    try:
        shapes = shapes if shapes is not None else _ckpt_shapes(path, need_vae=vae is None)
        width = shapes.get(CLIP_WIDTH_KEY, [])[-1:]
        if width and width == shapes.get(OPEN_CLIP_WIDTH_KEY, [])[-1:]:  # see _open_clip_text_encoder
            components["text_encoder_2"] = _open_clip_text_encoder(path, folder, dtype)
        pipe = compat.diffusers_from_single_file(StableDiffusionXLPipeline, str(path), dtype, config=str(folder),
                                                 **components)  # fmt: skip
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers/transformers raise many types (shapes, keys, files)
        raise ModelError(
            f"cannot load the single-file SDXL checkpoint {path} with the configs of {folder} "
            f"({type(exc).__name__}: {exc}); --base-config must be a diffusers SDXL folder whose configs match it"
        ) from exc
    check_loaded(
        {k: pipe.components[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2")}, f"--base-model {path}"
    )
    return pipe


def _vae_file_config(path: Path, folder: Path) -> tuple[Path, str | None]:
    """Where a single-file VAE's config comes from: an AutoencoderKL ``config.json`` beside it (a hub VAE
    repo's layout, which carries its ``force_upcast``), else the base model's ``vae/config.json``."""
    beside = path.parent / "config.json"
    if beside.is_file() and _vae_class(beside) == "AutoencoderKL":
        return path.parent, None
    return folder, "vae"


def load_vae(vae: str | Path, dtype, folder: str | Path):
    """``--vae`` as an ``AutoencoderKL`` in ``dtype``: a diffusers VAE folder, a folder holding ``vae/``, or a
    single file (diffusers or original layout) configured by :func:`_vae_file_config` (``folder``: the base
    model's config folder). Its config is kept as given — ``force_upcast: false`` (an fp16-safe VAE) makes
    SDXL decode in float16 instead of upcasting to float32."""
    from diffusers import AutoencoderKL

    from easyref_cli.model import compat

    check_vae_source(vae)
    path = Path(vae)
    try:
        if path.is_dir():
            sub = {} if (path / "config.json").is_file() else {"subfolder": "vae"}
            model = compat.diffusers_from_pretrained(AutoencoderKL, str(path), dtype, **sub)
        else:
            config, subfolder = _vae_file_config(path, Path(folder))
            model = compat.diffusers_from_single_file(AutoencoderKL, str(path), dtype, config=str(config),
                                                      subfolder=subfolder)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types
        raise ModelError(f"--vae {vae}: cannot load it as an SDXL VAE ({type(exc).__name__}: {exc})") from exc
    check_loaded({"the VAE": model}, f"--vae {vae}")
    return model


def check_vae_fits(pipe, vae: str | Path) -> None:
    """The replacement VAE's latents are the UNet's (an SD3/Flux VAE has 16 channels, SDXL's 4)."""
    channels, unet_channels = pipe.vae.config.latent_channels, pipe.unet.config.in_channels
    if channels != unet_channels:
        raise ModelError(
            f"--vae {vae}: its latents have {channels} channels, the base model's UNet takes {unet_channels}: "
            "not an SDXL VAE"
        )
