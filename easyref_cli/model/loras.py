"""Community SDXL LoRAs (kohya or diffusers format), fused into the SDXL weights.

Reading and key conversion are diffusers' own: ``StableDiffusionXLPipeline.lora_state_dict`` maps
kohya/sgm names (``lora_unet_input_blocks_4_1_…``, ``lora_te1_…``) to diffusers modules and returns
the kohya ``alpha`` values; it runs without peft. Fusing is done here: diffusers' ``load_lora_weights``
+ ``fuse_lora`` inject peft layers, and peft is not a dependency of this tool. The fusion is peft's
merge, layer by layer::

    W  +=  weight × scaling × (up @ down)        scaling = alpha / rank   (alpha / √rank with rsLoRA)

where ``alpha`` is the module's kohya ``alpha`` key, else the file's diffusers metadata (``lora_alpha``,
``alpha_pattern``), else ``rank`` (scaling 1, the diffusers convention for files without alphas). Kohya
conv LoRAs (LoCon: ``down`` k×k, ``up`` 1×1) fuse into Conv2d weights the same way. The product is
computed in float32 and cast back to the layer's dtype.

Only plain LoRA is supported: DoRA, LyCORIS (LoHa, LoKr, Tucker ``lora_mid``), OFT, full-weight
differences or LoRA biases raise :class:`ModelError` naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyref_cli.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = ["check_loras", "fuse_loras", "read_lora"]

#: the SDXL components a LoRA may touch, by their key prefix in diffusers format
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

#: raw key fragments of formats this module does not fuse → what to call them
_EXOTIC = {
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "hada_w": "LoHa (LyCORIS)",
    "lokr_w": "LoKr (LyCORIS)",
    ".lora_mid.": "Tucker-decomposed LoCon (LyCORIS lora_mid)",
    ".oft_": "OFT",
    ".diff": "full-weight difference",
    "lora_B.bias": "LoRA-with-bias",
    "lora_up.bias": "LoRA-with-bias",
}

#: a diffusers-format LoRA key → (module path, "down"|"up"). Forms: peft ``lora_A/lora_B``, diffusers'
#: kohya conversion ``lora.down``/``lora_linear_layer.down``, and the old attention-processor
#: ``to_q_lora.down`` (whose module is ``to_q`` … ``to_out.0`` in the UNet, ``q_proj`` … ``out_proj``
#: in CLIP). ``.processor.`` is dropped first, as diffusers does.
_KEY = re.compile(
    r"(?P<path>.+?)\.(?:lora_(?P<peft>[AB])|lora\.(?P<lora>down|up)|lora_linear_layer\.(?P<lin>down|up)"
    r"|(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<old>down|up))\.weight"
)
_OLD_PROJ = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


@dataclass(frozen=True)
class LoraLayer:
    """One layer of a LoRA: ``component`` (``unet``, ``text_encoder``, ``text_encoder_2``), the module path
    inside it, its ``down`` (rank, in[, k, k]) and ``up`` (out, rank[, 1, 1]) factors and ``scaling``."""

    component: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def read_lora(path: str | Path, unet_config: Any = None) -> list[LoraLayer]:
    """The layers of one LoRA file, in diffusers module names, with their scaling.

    ``unet_config`` (the base UNet's config) lets diffusers remap kohya's sgm block numbers; without it
    sgm-named files cannot be mapped. Raises :class:`ModelError` naming the file when it cannot be read,
    is of an unsupported kind, or holds keys of no SDXL component.
    """
    from diffusers import StableDiffusionXLPipeline

    from easyref_cli.model.checkpoint import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA {path} does not exist")
    try:
        raw = read_state_dict(path)
    except ModelError as exc:  # a broken or truncated file: the message names it
        raise ModelError(f"LoRA: {exc}") from exc
    if not raw:
        raise ModelError(f"LoRA {path} holds no tensors")
    config = _diffusers_metadata(path)
    for key in raw:
        kind = next((name for fragment, name in _EXOTIC.items() if fragment in key), None)
        if kind is not None:  # diffusers would silently drop DoRA scales; refuse instead
            raise ModelError(f"LoRA {path}: {kind} files are not supported (plain LoRA only; key {key})")
    if any(section.get("use_dora") for section in config.values()):
        raise ModelError(f"LoRA {path}: DoRA files are not supported (plain LoRA only)")
    try:
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(raw, unet_config=unet_config)
    except Exception as exc:  # noqa: BLE001 - diffusers' conversion raises ValueError/KeyError/IndexError
        raise ModelError(f"LoRA {path} is not a LoRA diffusers can read for SDXL ({exc})") from exc
    return _layers(path, state, alphas or {}, config)


def _diffusers_metadata(path: Path) -> dict[str, dict]:
    """The peft ``LoraConfig`` diffusers stores in a safetensors header, per component (``{}`` if none)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    try:
        flat = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ModelError(f"LoRA {path}: unreadable lora_adapter_metadata ({exc})") from exc
    if not isinstance(flat, dict):
        raise ModelError(f"LoRA {path}: lora_adapter_metadata is not a JSON object")
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _split(key: str) -> tuple[str, str, str] | None:
    """``component.…lora key`` → ``(component, module path, "down"|"up")``, or ``None`` if not a LoRA key."""
    component, _, rest = key.partition(".")
    match = _KEY.fullmatch(rest.replace(".processor.", "."))
    if component not in COMPONENTS or match is None:
        return None
    path = match["path"]
    if match["proj"]:
        path = f"{path}.{_OLD_PROJ['unet' if component == 'unet' else 'text'][match['proj']]}"
    side = {"A": "down", "B": "up"}.get(match["peft"] or "", "") or match["lora"] or match["lin"] or match["old"]
    return component, path, side


def _alpha_modules(alphas: Mapping[str, float]) -> dict[tuple[str, str], float]:
    """diffusers' ``network_alphas`` → ``{(component, module): alpha}``. Its keys are
    ``component.<module>.alpha`` or, for attention layers, ``component.<down key>.alpha``."""
    out: dict[tuple[str, str], float] = {}
    for key, alpha in alphas.items():
        stem = key.removesuffix(".alpha")
        split = _split(stem)
        if split is None:
            component, _, module = stem.partition(".")
            split = (component, module.replace(".processor.", "."), "down")
        out[split[:2]] = float(alpha)
    return out


def _pattern(patterns: Mapping[str, Any], module: str) -> Any:
    """peft's ``get_pattern_key``: the first pattern matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _scaling(rank: int, alpha: float | None, config: Mapping[str, Any], module: str) -> float:
    """peft's ``lora_alpha / r`` (``/ √r`` with rsLoRA): the kohya alpha if the file has one for this
    module, else the diffusers metadata (peft defaults ``lora_alpha=8``), else scaling 1."""
    if alpha is None and config:
        alpha = _pattern(config.get("alpha_pattern") or {}, module)
        alpha = float(config.get("lora_alpha", 8) if alpha is None else alpha)
    if alpha is None:
        return 1.0
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _layers(path: Path, state: Mapping[str, torch.Tensor], alphas, config) -> list[LoraLayer]:
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    strays = []
    for key, tensor in state.items():
        split = _split(key)
        if split is None:
            strays.append(key)
            continue
        pairs.setdefault(split[:2], {})[split[2]] = tensor
    if strays:
        raise ModelError(f"{path} is not an SDXL LoRA for this base (keys of no SDXL module: {', '.join(strays[:4])})")
    module_alphas = _alpha_modules(alphas)
    layers = []
    for (component, module), parts in pairs.items():
        if set(parts) != {"down", "up"}:
            raise ModelError(f"LoRA {path}: {component}.{module} has no {'up' if 'down' in parts else 'down'} weight")
        rank = int(parts["down"].shape[0])
        scaling = _scaling(rank, module_alphas.get((component, module)), config.get(component, {}), module)
        layers.append(LoraLayer(component, module, parts["down"], parts["up"], scaling))
    return layers


# ------------------------------------------------------------------------------------------------
# matching and fusing
# ------------------------------------------------------------------------------------------------


def _target(models: Mapping[str, nn.Module], layer: LoraLayer) -> nn.Module | None:
    """The Linear/Conv2d a layer adapts, or ``None``. A transformers-5 ``CLIPTextModel`` has no
    ``text_model`` level, so that prefix is dropped where the model lacks it (as diffusers does)."""
    model = models.get(layer.component)
    if model is None:
        return None
    name = layer.module
    if layer.component != "unet" and not hasattr(model, "text_model"):
        name = name.removeprefix("text_model.")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, (nn.Linear, nn.Conv2d)) else None


def _fits(module: nn.Module, layer: LoraLayer) -> bool:
    """Whether ``up @ down`` has the weight's shape: Linear (out, in); Conv2d (out, in, k, k) from a k×k
    ``down`` and a 1×1 ``up``."""
    out_dim, in_dim, *kernel = module.weight.shape
    down, up = layer.down, layer.up
    spatial = tuple(down.shape[2:])
    return (
        down.dim() in (2, 4)
        and up.dim() == down.dim()
        and up.shape[0] == out_dim
        and down.shape[1] == in_dim
        and up.shape[1] == down.shape[0]
        and tuple(up.shape[2:]) in ((), (1, 1))
        and (spatial == tuple(kernel) or (math.prod(kernel) == 1 and spatial in ((), (1, 1))))
    )


def match_layers(path: Path, layers: Sequence[LoraLayer], models: Mapping[str, nn.Module]) -> list[nn.Module]:
    """The module of each layer; :class:`ModelError` "FILE is not an SDXL LoRA for this base (…)" naming
    the first layers that have no such module or the wrong shape (an SD 1.5 LoRA: 768-wide cross-attention,
    other blocks)."""
    targets, missing, misfit = [], [], []
    for layer in layers:
        module = _target(models, layer)
        if module is None:
            missing.append(f"{layer.component}.{layer.module}")
        elif not _fits(module, layer):
            misfit.append(
                f"{layer.component}.{layer.module}: up {tuple(layer.up.shape)} @ down {tuple(layer.down.shape)}"
                f" vs weight {tuple(module.weight.shape)}"
            )
        targets.append(module)
    if missing or misfit:
        detail = "; ".join(
            ([f"no such layer: {', '.join(missing[:3])}"] if missing else [])
            + ([f"shape mismatch: {'; '.join(misfit[:2])}"] if misfit else [])
        )
        raise ModelError(f"{path} is not an SDXL LoRA for this base ({detail})")
    return targets


@torch.no_grad()
def fuse_layer(module: nn.Module, layer: LoraLayer, weight: float) -> None:
    """``W += weight × scaling × (up @ down)``, in float32, cast back to ``W``'s dtype."""
    w = module.weight.data
    up = layer.up.to(device=w.device, dtype=torch.float32).flatten(1)
    down = layer.down.to(device=w.device, dtype=torch.float32).flatten(1)
    delta = (up @ down).reshape(w.shape)
    w.copy_((w.to(torch.float32) + (weight * layer.scaling) * delta).to(w.dtype))


def fuse_loras(sdxl, loras: Sequence[tuple[str | Path, float]]) -> int:
    """Fuse each ``(file, weight)`` into ``sdxl``'s UNet and text encoders, in order. Every file is read
    and matched before the first is fused, so a bad file leaves the weights untouched. Returns the number
    of layers fused."""
    models = {name: getattr(sdxl, name, None) for name in COMPONENTS}
    plans = []
    for path, weight in loras:
        layers = read_lora(path, sdxl.unet.config)
        plans.append((layers, match_layers(Path(path), layers, models), float(weight)))
    fused = 0
    for layers, targets, weight in plans:
        for layer, module in zip(layers, targets, strict=True):
            fuse_layer(module, layer, weight)
            fused += 1
    return fused


# ------------------------------------------------------------------------------------------------
# the cheap check before encoding
# ------------------------------------------------------------------------------------------------


def check_loras(base_model: Path, base_config: Path | None, loras: Sequence[tuple[str | Path, float]]) -> None:
    """Each LoRA reads, is plain LoRA, and fits this base: checked against weightless skeletons (meta
    device) built from the configs in ``base_config`` (a single-file base) or the ``base_model`` folder.
    Raises :class:`ModelError` naming the file. Without readable configs only the files are checked."""
    models = base_skeletons(Path(base_config) if base_config is not None else Path(base_model))
    unet = models.get("unet")
    for path, _weight in loras:
        layers = read_lora(path, unet.config if unet is not None else None)
        if unet is not None:
            match_layers(Path(path), layers, models)


def base_skeletons(folder: Path) -> dict[str, nn.Module]:
    """The UNet and text encoders of an SDXL folder as meta-device modules (names and shapes, no
    weights); ``{}`` if the folder's configs cannot be read (the full load reports that later)."""
    import transformers
    from diffusers import UNet2DConditionModel

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        config = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
        models: dict[str, nn.Module] = {}
        with torch.device("meta"):
            models["unet"] = UNet2DConditionModel.from_config(config)
            for name in COMPONENTS[1:]:
                library, class_name = index.get(name) or (None, None)
                if library != "transformers" or not (folder / name / "config.json").is_file():
                    continue
                cls = getattr(transformers, class_name)
                models[name] = cls(cls.config_class.from_pretrained(str(folder / name)))
    except Exception as exc:  # noqa: BLE001 - missing/odd configs: the full load reports them properly later
        logger.debug("LoRA shape pre-check skipped: %s", exc)
        return {}
    return models
