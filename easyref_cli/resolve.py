"""Phase 1 of a run: the models resolved — the tiny family built if asked, hub ids → local paths, the
device checked, the adapter loaded and checked against the base UNet's config, the ecosystem models
(``--vae``, ``--base-config``, ``--lora``, ``--controlnet``) located and the LoRAs and ControlNets checked — all before minutes of encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref_cli.errors import UsageError
from easyref_cli.models import FAMILY_CONTROLNETS, ensure_built, family_controlnet_path
from easyref_cli.plan import Plan

logger = logging.getLogger(__name__)

#: What ``--base-config`` needs of a hub repo: its configs and tokenizers, not its weights.
CONFIG_FILES = ["*.json", "*.txt", "tokenizer*/*"]


@dataclass(frozen=True)
class ResolvedModels:
    """Local model paths, the loaded adapter checkpoint, the device and ``(sdxl, encoder)`` dtypes."""

    base_model: Path
    mllm: Path
    adapter: Path
    checkpoint: Any
    device: str
    dtypes: tuple[Any, Any]
    vae: Path | None = None
    base_config: Path | None = None
    loras: tuple[tuple[Path, float], ...] = ()
    controlnets: tuple[Path, ...] = ()


def check_device(device: str | None) -> None:
    """A device torch can use here, or a UsageError (instead of a traceback after loading models)."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda, cuda:N, mps…") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (see `easyref doctor`)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")


def check_adapter_matches(base_model: Path, checkpoint) -> None:
    """Validate the adapter against the base UNet's *config* (a weightless skeleton on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(str(base_model), subfolder="unet")
        with torch.device("meta"):
            skeleton = UNet2DConditionModel.from_config(config)
    except Exception as exc:  # noqa: BLE001 - missing/odd config: the full load reports it properly later
        logger.debug("adapter pre-check skipped: %s", exc)
        return
    checkpoint.check_unet(skeleton)


def resolve_models(plan: Plan) -> ResolvedModels:
    """Phase 1. The adapter's sha256 keys the condition cache; it is remembered where planning keeps
    file hashes (:func:`easyref_cli.identity.hash_memo`: real path, size, mtime, inode), so a multi-GB
    checkpoint is hashed once, not on every run."""
    from easyref_cli.env import default_device
    from easyref_cli.identity import hash_memo
    from easyref_cli.model import hub
    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.pipeline import resolve_dtypes
    from easyref_cli.model.single_file import check_sdxl_sources

    ensure_built(plan.model_family, controlnet="tiny" in plan.models.controlnets)
    check_device(plan.device)
    m = plan.models
    base_model = hub.resolve_model(m.base_model, "--base-model")  # a folder, or a single file
    mllm = hub.resolve_folder(m.mllm, "--mllm")
    adapter = hub.resolve_checkpoint(m.adapter)
    vae = hub.resolve_model(m.vae, "--vae") if m.vae is not None else None
    base_config = (
        hub.resolve_folder(m.base_config, "--base-config", CONFIG_FILES) if m.base_config is not None else None
    )
    loras = tuple((hub.resolve_checkpoint(spec, "--lora"), weight) for spec, weight in m.loras)
    controlnets = tuple(
        family_controlnet_path(spec) if spec in FAMILY_CONTROLNETS else hub.resolve_folder(spec, "--controlnet")
        for spec in m.controlnets
    )
    # before minutes of encoding, not after: the SDXL sources (single file, VAE), the adapter against
    # the base UNet's config, each LoRA against the base's layers
    configs = check_sdxl_sources(base_model, config=base_config, vae=vae)
    checkpoint = load_checkpoint(adapter, hash_memo=hash_memo())
    check_adapter_matches(configs, checkpoint)
    if loras:
        from easyref_cli.model.loras import check_loras

        check_loras(configs, None, loras)  # an SD1.5 or broken LoRA: exit 2 (configs: the folder SDXL takes them from)
    for controlnet in controlnets:
        from easyref_cli.model.control import check_controlnet

        check_controlnet(controlnet, configs)  # a ControlNet for another base: exit 2
    device = plan.device or default_device()
    return ResolvedModels(base_model, mllm, adapter, checkpoint, device, resolve_dtypes(plan.dtype, device), vae,
                          base_config, loras, controlnets)  # fmt: skip
