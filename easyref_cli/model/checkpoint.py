"""EasyRef checkpoints in the official key layout: load, validate strictly, save.

Official layouts (DESIGN §2 "Checkpoint formats to load"): one ``.safetensors`` with flat keys, or a
DeepSpeed ``.pt`` holding ``{"module": state_dict}``. Prefixes:

* ``image_proj_model.``  projector (``proj.0/2/3``)
* ``mllm_final_layer.``  ``layers.0.*``, ``norm.weight``, ``reference_tokens``
* ``multimodal_llm.``    optional fine-tuned Qwen2-VL in transformers-4.45 names
* ``unet.``              ``<attn>.processor.to_{k,v}_ip.weight`` adapters,
                         ``<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight`` LoRA,
                         and possibly full UNet weights
* ``adapter_modules.``   duplicates written by the training script: ignored.

Unlike the official loader (``strict=False`` everywhere, which silently produced broken models), we
require every ``to_k_ip``/``to_v_ip`` of every ``attn2`` and all-or-nothing LoRA, and name what is
missing or mis-shaped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from easyref_cli.errors import CheckpointError, ModelError

logger = logging.getLogger(__name__)

PREFIXES = ("image_proj_model.", "mllm_final_layer.", "multimodal_llm.", "unet.")
IGNORED_PREFIXES = ("adapter_modules.",)
LORA_KINDS = ("to_q", "to_k", "to_v", "to_out")
_IP_RE = re.compile(r"^(?P<attn>.+)\.processor\.(?P<kind>to_k_ip|to_v_ip)\.weight$")
_LORA_RE = re.compile(r"^(?P<attn>.+)\.processor\.(?P<kind>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")


@dataclass
class EasyRefCheckpoint:
    """An official-layout checkpoint split by role. Tensors stay on CPU in their stored dtype."""

    source: str
    sha256: str
    image_proj: dict[str, torch.Tensor]
    final_layer: dict[str, torch.Tensor]
    mllm: dict[str, torch.Tensor] = field(default_factory=dict)  # transformers 5.x names
    ip: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # attn path -> to_k_ip/to_v_ip
    lora: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)  # attn -> kind -> down/up
    unet_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # full UNet weights, if any

    # ---- shape facts ---------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return int(self.final_layer["reference_tokens"].shape[-2])

    @property
    def hidden_size(self) -> int:
        return int(self.final_layer["reference_tokens"].shape[-1])

    @property
    def cross_attention_dim(self) -> int:
        return int(self.image_proj["proj.2.weight"].shape[0])

    @property
    def has_lora(self) -> bool:
        return bool(self.lora)

    @property
    def lora_rank(self) -> int | None:
        for kinds in self.lora.values():
            for parts in kinds.values():
                if "down" in parts:
                    return int(parts["down"].shape[0])
        return None

    # ---- applying ------------------------------------------------------------------------------

    def apply_encoder(self, final_layer: nn.Module, projector: nn.Module) -> None:
        """Load ``mllm_final_layer.`` and ``image_proj_model.`` strictly into the encoder parts."""
        load_strict(final_layer, self.final_layer, prefix="mllm_final_layer.", source=self.source)
        load_strict(projector, self.image_proj, prefix="image_proj_model.", source=self.source)

    def apply_mllm(self, model: nn.Module) -> None:
        """Load the optional fine-tuned ``multimodal_llm.`` subset (a subset is fine; unknown keys are not)."""
        expected = model.state_dict()
        unknown = sorted(k for k in self.mllm if k not in expected)
        if unknown:
            raise CheckpointError(
                f"{self.source}: {len(unknown)} multimodal_llm keys do not exist in the Qwen2-VL model "
                f"(wrong MLLM?): {_preview(unknown)}"
            )
        bad = [
            f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in self.mllm.items()
            if tuple(v.shape) != tuple(expected[k].shape)
        ]
        if bad:
            raise CheckpointError(f"{self.source}: mis-shaped multimodal_llm tensors: {_preview(bad)}")
        missing = [k for k in expected if k not in self.mllm and not k.startswith("lm_head.")]
        if self.mllm and missing:
            logger.warning(
                "%s: its multimodal_llm section is partial (%d of %d Qwen2-VL tensors); the other %d, e.g. %s, "
                "come from the MLLM folder",
                self.source, len(self.mllm), len(self.mllm) + len(missing), len(missing), _preview(missing, 3),
            )  # fmt: skip
        model.load_state_dict(self.mllm, strict=False)

    def check_unet(self, unet: nn.Module) -> None:
        """Every ``attn2`` needs ``to_k_ip``/``to_v_ip``; LoRA is all-or-nothing over every attention layer."""
        attn_names = [n[: -len(".processor")] for n in unet.attn_processors]
        cross = [n for n in attn_names if n.endswith("attn2")]
        problems: list[str] = []
        missing = [
            f"unet.{n}.processor.{kind}.weight"
            for n in cross
            for kind in ("to_k_ip", "to_v_ip")
            if kind not in self.ip.get(n, {})
        ]
        if missing:
            problems.append(f"missing {len(missing)} adapter weights: {_preview(missing)}")
        unknown = sorted(set(self.ip) - set(cross))
        if unknown:
            problems.append(f"adapter weights for attention layers the UNet does not have: {_preview(unknown)}")
        for name in cross:
            attn = unet.get_submodule(name)
            for kind in ("to_k_ip", "to_v_ip"):
                w = self.ip.get(name, {}).get(kind)
                want = (attn.to_k.out_features, self.cross_attention_dim)
                if w is not None and tuple(w.shape) != want:
                    problems.append(f"unet.{name}.processor.{kind}.weight has shape {tuple(w.shape)}, expected {want}")
        if self.lora:
            problems += self._lora_problems(unet, attn_names)
        if problems:
            raise CheckpointError(f"{self.source} does not match the base model's UNet:\n  " + "\n  ".join(problems))

    def _lora_problems(self, unet: nn.Module, attn_names: list[str]) -> list[str]:
        problems: list[str] = []
        missing = [
            f"unet.{n}.processor.{kind}_lora.{part}.weight"
            for n in attn_names
            for kind in LORA_KINDS
            for part in ("down", "up")
            if part not in self.lora.get(n, {}).get(kind, {})
        ]
        if missing:
            problems.append(f"LoRA is partial (all-or-nothing): missing {len(missing)} tensors: {_preview(missing)}")
        unknown = sorted(set(self.lora) - set(attn_names))
        if unknown:
            problems.append(f"LoRA for attention layers the UNet does not have: {_preview(unknown)}")
        for n in attn_names:
            attn = unet.get_submodule(n)
            for kind, parts in self.lora.get(n, {}).items():
                linear = attn.to_out[0] if kind == "to_out" else getattr(attn, kind)
                down, up = parts.get("down"), parts.get("up")
                if down is None or up is None:
                    continue
                if (
                    down.shape[1] != linear.in_features
                    or up.shape[0] != linear.out_features
                    or up.shape[1] != down.shape[0]
                ):
                    problems.append(
                        f"unet.{n}.processor.{kind}_lora has down {tuple(down.shape)} / up {tuple(up.shape)} "
                        f"for a {linear.in_features}→{linear.out_features} layer"
                    )
        return problems

    # ---- saving --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict in the official key layout (round-trips through :func:`split_state_dict`)."""
        out: dict[str, torch.Tensor] = {}
        out.update({f"image_proj_model.{k}": v for k, v in self.image_proj.items()})
        out.update({f"mllm_final_layer.{k}": v for k, v in self.final_layer.items()})
        out.update({f"multimodal_llm.{k}": v for k, v in mllm_keys_5_to_445(self.mllm).items()})
        for name, kinds in self.ip.items():
            for kind, w in kinds.items():
                out[f"unet.{name}.processor.{kind}.weight"] = w
        for name, kinds in self.lora.items():
            for kind, parts in kinds.items():
                for part, w in parts.items():
                    out[f"unet.{name}.processor.{kind}_lora.{part}.weight"] = w
        out.update({f"unet.{k}": v for k, v in self.unet_weights.items()})
        return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, *, hash_memo: Path | None = None) -> EasyRefCheckpoint:
    """Read an official ``.safetensors`` or DeepSpeed ``.pt`` checkpoint (``weights_only=True``).

    ``hash_memo``: a JSON file remembering the checkpoint's sha256 between runs (see
    :func:`easyref_cli.files.sha256_file_memo`); ``None`` hashes the file every time.
    """
    from easyref_cli.files import sha256_file_memo

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter checkpoint {path} does not exist")
    flat = read_state_dict(path)
    return split_state_dict(flat, source=str(path), sha256=sha256_file_memo(path, hash_memo))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError / OSError / ValueError
            raise CheckpointError(f"cannot read {path} as safetensors ({exc}); is the download complete?") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors vary
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint with weights_only=True ({exc}); "
            "convert it to .safetensors or re-save plain tensors"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        obj = obj["module"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict (or a DeepSpeed {{'module': ...}} dict)")
    return dict(obj)


def read_folder_tensors(folder: Path, keep) -> dict[str, torch.Tensor]:
    """Tensors of a ``save_pretrained`` folder whose names pass ``keep`` (single file or sharded index)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        files = sorted({folder / name for key, name in weight_map.items() if keep(key)})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{folder} has no .safetensors weights (convert the model with save_pretrained(safe_serialization=True))"
        )
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if keep(key):
                    out[key] = handle.get_tensor(key)
    return out


def split_state_dict(
    flat: Mapping[str, torch.Tensor], *, source: str = "<state dict>", sha256: str = ""
) -> EasyRefCheckpoint:
    """Split official flat keys by role; raise :class:`CheckpointError` naming what is missing."""
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PREFIXES}
    strays: list[str] = []
    for key, value in flat.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        for prefix in PREFIXES:
            if key.startswith(prefix):
                groups[prefix][key[len(prefix) :]] = value
                break
        else:
            strays.append(key)
    if strays:
        logger.warning("%s: ignoring %d keys outside the EasyRef layout, e.g. %s", source, len(strays), strays[:3])

    image_proj = groups["image_proj_model."]
    final_layer = groups["mllm_final_layer."]
    required = [f"image_proj_model.proj.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")]
    required += ["mllm_final_layer.reference_tokens", "mllm_final_layer.norm.weight"]
    missing = [k for k in required if k.split(".", 1)[1] not in (image_proj if k.startswith("image") else final_layer)]
    if missing:
        kind = (
            "an EasyRef checkpoint"
            if (image_proj or final_layer)
            else "an EasyRef checkpoint at all (no image_proj_model./mllm_final_layer. keys)"
        )
        raise CheckpointError(f"{source} is not {kind}: missing {_preview(missing)}")
    tokens = final_layer["reference_tokens"]
    if tokens.ndim == 3 and tokens.shape[0] == 1:
        final_layer["reference_tokens"] = tokens = tokens[0]
    if tokens.ndim != 2:
        raise CheckpointError(
            f"{source}: mllm_final_layer.reference_tokens has shape {tuple(tokens.shape)}, expected (tokens, hidden)"
        )

    ip: dict[str, dict[str, torch.Tensor]] = {}
    lora: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    unet_weights: dict[str, torch.Tensor] = {}
    for key, value in groups["unet."].items():
        if m := _IP_RE.match(key):
            ip.setdefault(m["attn"], {})[m["kind"]] = value
        elif m := _LORA_RE.match(key):
            lora.setdefault(m["attn"], {}).setdefault(m["kind"], {})[m["part"]] = value
        else:
            unet_weights[key] = value
    if not ip:
        raise CheckpointError(f"{source} has no unet.*.processor.to_k_ip/to_v_ip adapter weights")

    return EasyRefCheckpoint(
        source=source,
        sha256=sha256,
        image_proj=image_proj,
        final_layer=final_layer,
        mllm=_without_lm_head(mllm_keys_445_to_5(groups["multimodal_llm."]), source),
        ip=ip,
        lora=lora,
        unet_weights=unet_weights,
    )


def _without_lm_head(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop ``lm_head.weight``: logits are never computed, and Qwen2-VL-2B ties it to ``embed_tokens``,
    so loading it would silently overwrite the input embeddings."""
    if sd.pop("lm_head.weight", None) is not None:
        logger.debug("%s: ignoring multimodal_llm.lm_head.weight (no logits are computed)", source)
    return sd


def mllm_keys_445_to_5(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-4.45 Qwen2-VL names → 5.x (``visual.*`` → ``model.visual.*``, ``model.*`` → ``model.language_model.*``)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("model.visual.", "model.language_model.")) or k == "lm_head.weight":
            out[k] = v
        elif k.startswith("visual."):
            out["model." + k] = v
        elif k.startswith("model."):
            out["model.language_model." + k[len("model.") :]] = v
        else:
            out[k] = v
    return out


def mllm_keys_5_to_445(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`mllm_keys_445_to_5`: we save in the official (4.45) names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.visual."):
            out[k[len("model.") :]] = v
        elif k.startswith("model.language_model."):
            out["model." + k[len("model.language_model.") :]] = v
        else:
            out[k] = v
    return out


def save_checkpoint(checkpoint: EasyRefCheckpoint | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write the official layout: ``.safetensors`` (flat) or ``.pt`` (``{"module": ...}``), atomically."""
    import os

    path = Path(path)
    flat = checkpoint.state_dict() if isinstance(checkpoint, EasyRefCheckpoint) else dict(checkpoint)
    flat = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(flat, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"module": flat}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], *, prefix: str, source: str) -> None:
    """``load_state_dict(strict=True)`` with messages that name every missing / extra / mis-shaped key."""
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in sd]
    extra = [prefix + k for k in sd if k not in expected]
    bad = [
        f"{prefix}{k} {tuple(sd[k].shape)} (model expects {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if bad:
        problems.append(f"mis-shaped {_preview(bad)}")
    if extra:
        problems.append(f"unexpected {_preview(extra)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems) + " (does the MLLM match the checkpoint?)")
    module.load_state_dict(dict(sd), strict=True)


def _preview(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")
