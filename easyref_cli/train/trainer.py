"""The training loop: SDXL + the EasyRef reference encoder on accelerate.

One optimiser step (DESIGN §2 computation, the official ``finetune_sdxl.py`` recipe):

1. VAE-encode the target in fp32, sample the latent, scale it;
2. noise (plus the optional offset noise) and a uniform timestep; noisy latents from a
   ``DDPMScheduler`` built from the base model's scheduler config;
3. text embeddings from both CLIP encoders (penultimate hidden states, concatenated) and the pooled
   projection of the second; micro-conditioning time ids (original size, crop top-left, target size);
4. reference tokens: vision tower (one call for the whole batch) → trunk → final layer over
   ``[trunk ; 64 reference tokens]`` → projector — the same computation ``easyref generate`` runs;
5. UNet on context ``[text (77) ; reference tokens (64)]`` with the trainable attention processors;
6. MSE between the prediction and the noise (or the velocity for v-prediction models).

Engineering: accelerate (DDP / DeepSpeed ZeRO-2, mixed precision, gradient accumulation), gradient
checkpointing, ``OUT/state`` (accelerate state: trainable weights, optimiser, LR scheduler, RNG,
sampler; plus our step counters) for ``--resume``, ``OUT/checkpoint-{step}.safetensors`` in the
official key layout, ``OUT/train_log.jsonl``, tqdm progress on stderr, optional TensorBoard.

The noise, timesteps and latent samples of a micro-batch come from a CPU generator seeded by
``(seed, step, micro-batch, process)``, and every data-side random choice from ``(seed, epoch,
item)``, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from easyref_cli.errors import CheckpointError, ModelError, UsageError
from easyref_cli.model import compat
from easyref_cli.model.checkpoint import EasyRefCheckpoint, load_checkpoint, read_folder_tensors, save_checkpoint
from easyref_cli.model.encoder import ImageBatch, ReferenceEncoder, ReferenceProjector
from easyref_cli.train import DEFAULT_LORA_RANK, TrainConfig, TrainResult
from easyref_cli.train import data as data_mod
from easyref_cli.train import lora as lora_mod

logger = logging.getLogger(__name__)

STATE_DIR = "state"
LOG_NAME = "train_log.jsonl"
RUN_CONFIG = "run_config.json"
TRAINER_STATE = "trainer_state.json"
MODEL_STATE_FILE = "model.safetensors"  # what accelerate's save_state writes for model 0


# --------------------------------------------------------------------------------------------
# Initial weights (alignment from scratch)
# --------------------------------------------------------------------------------------------


def initial_checkpoint(mllm_path: Path, unet: nn.Module, *, num_tokens: int = 64, seed: int = 0) -> EasyRefCheckpoint:
    """The official initialisation, as an :class:`EasyRefCheckpoint`.

    Final layer = a copy of the MLLM's last decoder layer and its final norm; reference tokens =
    ``0.1 · N(0, 1)``; projector = PyTorch's default init; ``to_k_ip``/``to_v_ip`` = copies of each
    ``attn2``'s ``to_k``/``to_v``.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(mllm_path)
    text = config.get_text_config()
    last = text.num_hidden_layers - 1
    layer_prefixes = (f"model.layers.{last}.", f"model.language_model.layers.{last}.")
    norm_names = ("model.norm.weight", "model.language_model.norm.weight")
    tensors = read_folder_tensors(mllm_path, lambda k: k.startswith(layer_prefixes) or k in norm_names)
    final_layer: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for prefix in layer_prefixes:
            if key.startswith(prefix):
                final_layer["layers.0." + key[len(prefix) :]] = value.float()
    norm = next((tensors[n] for n in norm_names if n in tensors), None)
    if norm is None or not final_layer:
        raise ModelError(f"{mllm_path}: cannot find decoder layer {last} and the final norm in the weights")
    final_layer["norm.weight"] = norm.float()
    generator = torch.Generator("cpu").manual_seed(seed)
    final_layer["reference_tokens"] = 0.1 * torch.randn(num_tokens, text.hidden_size, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = ReferenceProjector(text.hidden_size, unet.config.cross_attention_dim)
    ip = {}
    for path in lora_mod.attention_layers(unet):
        if path.endswith("attn2"):
            attn = unet.get_submodule(path)
            ip[path] = {
                "to_k_ip": attn.to_k.weight.detach().float().clone(),
                "to_v_ip": attn.to_v.weight.detach().float().clone(),
            }
    return EasyRefCheckpoint(
        source=f"initial weights ({mllm_path} last layer, UNet to_k/to_v)",
        sha256="",
        image_proj={k: v.detach().clone() for k, v in projector.state_dict().items()},
        final_layer=final_layer,
        ip=ip,
    )


# --------------------------------------------------------------------------------------------
# The trainable model
# --------------------------------------------------------------------------------------------


class EasyRefTrainModel(nn.Module):
    """Reference encoder + UNet with the trainable processors: one module for accelerate to wrap."""

    def __init__(self, encoder: ReferenceEncoder, unet: nn.Module, *, train_mllm: bool):
        super().__init__()
        self.encoder = encoder
        self.unet = unet
        self.train_mllm = train_mllm

    def encode_references(self, mllm: Mapping) -> torch.Tensor:
        """``(batch, num_tokens, cross_attention_dim)`` for a collated batch (see :func:`data.collate`).

        The vision tower runs once over every image of the batch; prompts of equal length share a trunk
        call. A frozen MLLM runs without autograd (only the final layer onwards needs gradients).
        """
        enc = self.encoder
        grad = contextlib.nullcontext() if self.train_mllm else torch.no_grad()
        with grad:
            images = ImageBatch(pixel_values=mllm["pixel_values"], grid_thw=mllm["grid_thw"], token_counts=())
            features = torch.split(enc.image_features(images), list(mllm["image_tokens"]))
            embeds = [enc.embed(ids, feats) for ids, feats in zip(mllm["input_ids"], features, strict=True)]
            groups: dict[int, list[int]] = {}
            for i, e in enumerate(embeds):
                groups.setdefault(e.shape[1], []).append(i)
            hidden: list[torch.Tensor | None] = [None] * len(embeds)
            for members in groups.values():
                out = enc.trunk(torch.cat([embeds[i] for i in members]))
                for j, i in enumerate(members):
                    hidden[i] = out[j : j + 1]
        tokens: list[torch.Tensor | None] = [None] * len(embeds)
        for members in groups.values():
            out = enc.final(torch.cat([hidden[i] for i in members]))
            for j, i in enumerate(members):
                tokens[i] = out[j : j + 1]
        return enc.projector(torch.cat(tokens))

    def forward(self, noisy_latents, timesteps, text_embeds, pooled_text_embeds, time_ids, mllm):
        refs = self.encode_references(mllm)
        context = torch.cat([text_embeds, refs.to(text_embeds.dtype)], dim=1)
        added = {"text_embeds": pooled_text_embeds, "time_ids": time_ids}
        return self.unet(noisy_latents, timesteps, context, added_cond_kwargs=added).sample


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class _StepWindow:
    """The micro-batch losses and samples since the last optimiser step, and when it began."""

    losses: list[torch.Tensor] = field(default_factory=list)
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.losses, self.samples, self.started = [], 0, time.perf_counter()


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: float) -> torch.Tensor:
    """The squared error weighted ``1 + weight·m`` per latent pixel, normalised by the weights' mean (so an
    all-zero or all-one mask gives the plain mean); ``m`` is the pixel-space ``mask`` (``B×1×H×W``, 0–1)
    averaged over each latent pixel."""
    m = F.interpolate(mask.to(prediction.device, torch.float32), size=prediction.shape[-2:], mode="area")
    w = 1 + weight * m
    return (w * (prediction.float() - target.float()) ** 2).mean() / w.mean()


class Trainer:
    """``Trainer(config, items).setup()`` then ``.run()``; ``train_step``/``compute_loss`` for one batch."""

    def __init__(self, config: TrainConfig, items: Sequence[data_mod.TrainItem]):
        self.config = config.resolved()
        self.items = list(items)
        if self.config.mask_weight:
            data_mod.require_masks(self.items, self.config.data)
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # of the current epoch, at the last optimiser step
        self.resumed_from: int | None = None
        self.checkpoints: list[Path] = []
        self.last_loss: float | None = None
        self._last_saved = -1
        self._stop = False

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        cfg = self.config
        self._check_output_dir()
        if cfg.report_to == "tensorboard" and not any(
            importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
        ):
            raise UsageError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        self.accelerator = self._make_accelerator()
        self._check_accumulation()
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self._load_models()
        self._build_data()
        self._build_optimizer()
        acc = self.accelerator
        self.model, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(
            self.model, self.optimizer, self.loader, self.lr_scheduler
        )
        self._check_accumulation()  # DeepSpeed's config may have replaced it during prepare
        acc.register_save_state_pre_hook(self._trim_saved_weights)
        if cfg.resume:
            self._load_state()
        elif acc.is_main_process:
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            (cfg.output_dir / RUN_CONFIG).write_text(json.dumps(cfg.run_record(), indent=2) + "\n")
            stale = cfg.output_dir / LOG_NAME
            if stale.exists():  # a run that stopped before its first save: nothing to resume
                logger.warning("%s has no saved state; starting over (replacing %s)", cfg.output_dir, stale.name)
                stale.unlink()
        if cfg.report_to == "tensorboard":
            record = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.run_record().items()}
            acc.init_trackers("easyref-train", config=record)
        return self

    def _check_output_dir(self) -> None:
        cfg = self.config
        out = cfg.output_dir
        state = out / STATE_DIR
        if cfg.resume:
            if not (state / TRAINER_STATE).is_file():
                raise UsageError(
                    f"--resume: {out} has no saved training state ({state}); run without --resume to start"
                )
            try:
                recorded = json.loads((out / RUN_CONFIG).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UsageError(f"--resume: cannot read {out / RUN_CONFIG}: {exc}") from None
            current = json.loads(json.dumps(cfg.run_record()))
            diffs = [
                f"{k}: was {recorded.get(k)!r}, now {current.get(k)!r}"
                for k in sorted(set(recorded) | set(current))
                if recorded.get(k) != current.get(k)
            ]
            if diffs:
                raise UsageError(
                    "--resume needs the options of the original run (only --max-steps, --save-steps and runtime "
                    "options may change):\n  " + "\n  ".join(diffs)
                )
        elif state.exists():
            raise UsageError(
                f"{out} already holds a training run; pass --resume to continue it, or choose another --output-dir"
            )

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        cfg = self.config
        device = (cfg.device or "auto").lower()
        try:
            acc = Accelerator(
                mixed_precision=cfg.mixed_precision,
                gradient_accumulation_steps=cfg.gradient_accumulation,
                cpu=device == "cpu",
                log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
                project_config=ProjectConfiguration(
                    project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs")
                ),
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            )
        except ValueError as exc:  # e.g. fp16 on a CPU, a state already initialised differently
            raise UsageError(f"cannot set up accelerate: {exc}") from None
        if device not in ("auto", "cpu"):
            want = torch.device(device)
            if want.type != acc.device.type or (want.index is not None and want.index != acc.device.index):
                raise UsageError(
                    f"--device {cfg.device}: accelerate placed this process on {acc.device}; "
                    "choose GPUs with CUDA_VISIBLE_DEVICES or `accelerate launch --gpu_ids`"
                )
        return acc

    def _check_accumulation(self) -> None:
        """`accelerate launch --gradient_accumulation_steps` / a DeepSpeed config can override ours: refuse a silent change."""
        actual = self.accelerator.gradient_accumulation_steps
        if actual != self.config.gradient_accumulation:
            raise UsageError(
                f"accelerate uses gradient accumulation {actual} (from `accelerate launch` or the DeepSpeed config) but "
                f"--gradient-accumulation is {self.config.gradient_accumulation}; make them equal"
            )

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    def _load_models(self) -> None:
        """The frozen SDXL parts, the starting weights, the trainable processors and the reference
        encoder, assembled into ``self.model`` (on the accelerator's device for the frozen parts)."""
        cfg = self.config
        unet = self._load_sdxl()
        # 1. starting weights: --init (official layout, strict) or the official initialisation
        ckpt = self._starting_checkpoint(unet)
        # 2. LoRA: trained in single/multi (fresh, or continued from --init); carried frozen in align
        self.lora_rank = self._resolve_lora_rank(ckpt, unet)
        # 3. frozen UNet base in the compute dtype; trainable processors stay fp32 masters
        self._install_processors(unet, ckpt)
        # 4. reference encoder: final layer, reference tokens, projector always train; the MLLM in single/multi
        encoder = self._load_encoder(ckpt)

        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if cfg.trains_mllm:
                compat.enable_activation_checkpointing(encoder.language_model)
                compat.enable_activation_checkpointing(encoder.visual)

        self.model = EasyRefTrainModel(encoder, unet, train_mllm=cfg.trains_mllm).train()
        device = self.accelerator.device
        self.vae.to(device)  # loaded in fp32 and kept there: SDXL's VAE overflows in fp16
        for text_encoder in (self.text_encoder, self.text_encoder_2):
            text_encoder.to(device, dtype=self.weight_dtype)

    def _load_sdxl(self) -> nn.Module:
        """Load the base model in fp32: keep its frozen VAE, text encoders, tokenizers and a DDPM
        scheduler on ``self``; return its UNet."""
        from diffusers import DDPMScheduler

        from easyref_cli.model.pipeline import load_sdxl

        sdxl = load_sdxl(self.config.base_model, torch.float32)
        unet = sdxl.unet
        self.noise_scheduler = DDPMScheduler.from_config(sdxl.scheduler.config)
        self.vae = sdxl.vae.requires_grad_(False).eval()
        self.text_encoder = sdxl.text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = sdxl.text_encoder_2.requires_grad_(False).eval()
        self.tokenizers = (sdxl.tokenizer, sdxl.tokenizer_2)
        del sdxl
        return unet

    def _starting_checkpoint(self, unet: nn.Module) -> EasyRefCheckpoint:
        """``--init`` (official layout, strict) or the official initialisation, checked against
        ``unet`` (its extra UNet weights loaded into it); kept as ``self.init_checkpoint``."""
        cfg = self.config
        if cfg.init is not None:
            ckpt = load_checkpoint(cfg.init)
        else:
            if cfg.stage != "align":
                logger.warning(
                    "--stage %s without --init starts from untrained adapters; the recipe runs align first", cfg.stage
                )
            ckpt = initial_checkpoint(cfg.mllm, unet, seed=cfg.seed)
        ckpt.check_unet(unet)
        self.init_checkpoint = ckpt
        if ckpt.unet_weights:
            unknown = [k for k in ckpt.unet_weights if k not in unet.state_dict()]
            if unknown:
                raise CheckpointError(f"{ckpt.source}: unet weights the base model does not have: {unknown[:8]}")
            unet.load_state_dict(ckpt.unet_weights, strict=False)
        return ckpt

    def _resolve_lora_rank(self, ckpt: EasyRefCheckpoint, unet: nn.Module) -> int | None:
        """The LoRA rank: ``--init``'s, else ``--lora-rank`` (default 128) when LoRA trains; ``None``
        when there is no LoRA at all."""
        cfg = self.config
        if cfg.trains_lora:
            rank = ckpt.lora_rank if ckpt.has_lora else (cfg.lora_rank or DEFAULT_LORA_RANK)
            if ckpt.has_lora and cfg.lora_rank not in (None, rank):
                raise UsageError(f"--lora-rank {cfg.lora_rank} differs from the rank-{rank} LoRA in {cfg.init}")
            lora_mod.check_lora_rank(unet, rank)
        else:
            rank = ckpt.lora_rank if ckpt.has_lora else None
            if cfg.lora_rank is not None:
                logger.warning("--lora-rank is ignored by --stage align (no LoRA trains)")
        return rank

    def _install_processors(self, unet: nn.Module, ckpt: EasyRefCheckpoint) -> None:
        """Freeze ``unet`` (in the compute dtype) and install the trainable attention processors
        (``self.processors``): ``to_k_ip``/``to_v_ip`` always train, LoRA when the stage trains it."""
        cfg = self.config
        unet.requires_grad_(False)
        if self.weight_dtype != torch.float32:
            unet.to(self.weight_dtype)
        self.processors = lora_mod.install_train_processors(
            unet,
            ip_weights=ckpt.ip,
            lora_rank=self.lora_rank,
            lora_weights=ckpt.lora or None,
            num_tokens=ckpt.num_tokens,
            cross_attention_dim=ckpt.cross_attention_dim,
        )
        for proc in self.processors.values():
            if proc is not None:
                for name, p in proc.named_parameters():
                    p.requires_grad_(
                        name.startswith(("to_k_ip.", "to_v_ip.")) or (cfg.trains_lora and "_lora." in name)
                    )

    def _load_encoder(self, ckpt: EasyRefCheckpoint) -> ReferenceEncoder:
        """The reference encoder from ``--mllm`` and ``ckpt``, with its trainable parts unfrozen; a
        frozen MLLM runs in bf16 under bf16 mixed precision."""
        cfg = self.config
        encoder = ReferenceEncoder.from_pretrained(cfg.mllm, ckpt, device="cpu", dtype=torch.float32)
        encoder.final_layer.requires_grad_(True)
        encoder.projector.requires_grad_(True)
        if cfg.trains_mllm:
            encoder.visual.requires_grad_(True)
            encoder.language_model.requires_grad_(True)
        elif self.weight_dtype == torch.bfloat16:  # frozen: bf16 as the official code (fp16 risks overflow)
            encoder.visual.to(torch.bfloat16)
            encoder.language_model.to(torch.bfloat16)
        return encoder

    def _build_data(self) -> None:
        from torch.utils.data import DataLoader

        cfg = self.config
        if cfg.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.preprocessor = data_mod.MllmPreprocessor.from_encoder(self.model.encoder)
        self.dataset = data_mod.TrainDataset(
            self.items,
            cfg.data_root,
            mllm=self.preprocessor,
            clip_tokenizers=self.tokenizers,
            resolution=cfg.resolution,
            resize=cfg.resize,
            seed=cfg.seed,
            truncate_rate=cfg.truncate_rate,
            max_references=cfg.max_references,
            image_drop_rate=cfg.image_drop_rate,
            text_drop_rate=cfg.text_drop_rate,
            both_drop_rate=cfg.both_drop_rate,
            masks=cfg.mask_weight > 0,
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=data_mod.collate,
            num_workers=cfg.num_workers,
        )

    def _build_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg = self.config
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # accelerate steps a prepared scheduler once per process per optimiser step (the official script scaled the same way)
        n = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * n,
            num_training_steps=cfg.max_steps * n,
        )

    # ---- state ---------------------------------------------------------------------------------

    @property
    def unwrapped(self) -> EasyRefTrainModel:
        return self.accelerator.unwrap_model(self.model)

    def _trainable_names(self) -> set[str]:
        return set(trainable_parameter_names(self.unwrapped))

    def _trim_saved_weights(self, models, weights, output_dir) -> None:
        """accelerate save hook: keep only trainable tensors (the frozen rest is rebuilt from the models on resume)."""
        keep = self._trainable_names()
        for i, sd in enumerate(weights):
            weights[i] = {k: v for k, v in sd.items() if _strip_wrappers(k) in keep}

    def _load_state(self) -> None:
        from accelerate.utils import DistributedType

        acc = self.accelerator
        state = self.config.output_dir / STATE_DIR
        kwargs = {}
        if acc.distributed_type != DistributedType.DEEPSPEED:
            from safetensors import safe_open

            try:
                with safe_open(str(state / MODEL_STATE_FILE), framework="pt") as f:
                    saved = {_strip_wrappers(k) for k in f.keys()}
            except Exception as exc:  # noqa: BLE001 - missing, corrupt, or saved by a DeepSpeed run
                raise CheckpointError(
                    f"cannot resume from {state}: {type(exc).__name__}: {exc} (a state saved under DeepSpeed "
                    "resumes only under the same accelerate config)"
                ) from None
            missing = sorted(self._trainable_names() - saved)
            if missing:
                raise CheckpointError(
                    f"{state} does not hold {len(missing)} trainable tensors of this run (e.g. {missing[:3]}); "
                    "was it saved by another stage?"
                )
            kwargs["strict"] = False
        acc.load_state(str(state), **kwargs)
        try:
            progress = json.loads((state / TRAINER_STATE).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot resume from {state}: {TRAINER_STATE} is missing or unreadable ({exc})"
            ) from None
        self.step, self.epoch, self.batches_in_epoch = progress["step"], progress["epoch"], progress["batches_in_epoch"]
        self.resumed_from = self._last_saved = self.step
        log = self.config.output_dir / LOG_NAME
        if acc.is_main_process and log.is_file():  # steps logged after the last save are trained again
            lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= self.step]
            if len(kept) != len(lines):
                log.write_text("".join(kept), encoding="utf-8")
        logger.info("resumed from step %d (epoch %d, batch %d)", self.step, self.epoch, self.batches_in_epoch)

    def checkpoint(self) -> EasyRefCheckpoint:
        """The current weights as an official-layout checkpoint (CPU copies)."""
        model = self.unwrapped
        enc = model.encoder

        def cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}

        mllm: dict[str, torch.Tensor] = {}
        if self.config.trains_mllm or self.init_checkpoint.mllm:
            mllm.update({f"model.visual.{k}": v for k, v in cpu(enc.visual.state_dict()).items()})
            mllm.update({f"model.language_model.{k}": v for k, v in cpu(enc.language_model.state_dict()).items()})
            mllm["lm_head.weight"] = self._lm_head(enc)
        ip, lora = lora_mod.processor_weights(self.processors)
        return EasyRefCheckpoint(
            source=f"easyref train --stage {self.config.stage} step {self.step}",
            sha256="",
            image_proj=cpu(enc.projector.state_dict()),
            final_layer=cpu(enc.final_layer.state_dict()),
            mllm=mllm,
            ip=ip,
            lora=lora,
            unet_weights=dict(self.init_checkpoint.unet_weights),
        )

    def _lm_head(self, enc: ReferenceEncoder) -> torch.Tensor:
        """``lm_head.weight`` for the official loader's strict ``load_state_dict`` (never used for inference)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.config.mllm)
        if getattr(config, "tie_word_embeddings", False) or getattr(
            config.get_text_config(), "tie_word_embeddings", False
        ):
            return enc.language_model.embed_tokens.weight.detach().to("cpu", copy=True).contiguous()
        head = read_folder_tensors(self.config.mllm, lambda k: k == "lm_head.weight")
        if "lm_head.weight" not in head:
            raise ModelError(f"{self.config.mllm}: no lm_head.weight to store with the fine-tuned MLLM")
        return head["lm_head.weight"].contiguous()

    def save(self) -> Path:
        """``OUT/checkpoint-{step}.safetensors`` and ``OUT/state`` (replaced atomically)."""
        acc = self.accelerator
        out = self.config.output_dir
        path = out / f"checkpoint-{self.step}.safetensors"
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(self.checkpoint(), path)
            shutil.rmtree(out / f"{STATE_DIR}.tmp", ignore_errors=True)
        acc.wait_for_everyone()
        tmp, old, state = out / f"{STATE_DIR}.tmp", out / f"{STATE_DIR}.old", out / STATE_DIR
        acc.save_state(str(tmp))
        if acc.is_main_process:
            progress = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}
            (tmp / TRAINER_STATE).write_text(json.dumps(progress) + "\n")
            shutil.rmtree(old, ignore_errors=True)
            if state.exists():
                os.replace(state, old)
            os.replace(tmp, state)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self._last_saved = self.step
        self.checkpoints.append(path)
        if acc.is_main_process:
            logger.info("step %d: saved %s and %s", self.step, path, state)
        return path

    # ---- one step --------------------------------------------------------------------------------

    def noise_generator(self, micro_index: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.config.seed, self.step, micro_index, self.accelerator.process_index])
        return torch.Generator("cpu").manual_seed(int(seed.generate_state(1)[0]))

    @torch.no_grad()
    def encode_text(self, clip_ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL text conditioning: penultimate hidden states of both CLIP encoders + the second's pooled projection."""
        device = self.accelerator.device
        out_1 = self.text_encoder(clip_ids[0].to(device), output_hidden_states=True)
        out_2 = self.text_encoder_2(clip_ids[1].to(device), output_hidden_states=True)
        text = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return text, out_2[0]

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE encode in fp32 and sample the latent (scaled as the UNet expects)."""
        pixels = pixel_values.to(self.accelerator.device, dtype=torch.float32)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def compute_loss(
        self,
        batch: Mapping,
        *,
        micro_index: int = 0,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The diffusion loss of one micro-batch; ``latents``/``noise``/``timesteps`` may be fixed by the caller."""
        cfg = self.config
        device, dtype = self.accelerator.device, self.weight_dtype
        generator = self.noise_generator(micro_index)
        if latents is None:
            latents = self.encode_latents(batch["pixel_values"], generator)
        latents = latents.to(device, dtype=dtype)
        b, c = latents.shape[:2]
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn((b, c, 1, 1), generator=generator)
        noise = noise.to(device, dtype=dtype)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text, pooled = self.encode_text(batch["clip_ids"])
        time_ids = batch["time_ids"].to(device, dtype=dtype)
        prediction = self.model(noisy, timesteps, text, pooled, time_ids, batch["mllm"])
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if not cfg.mask_weight:
            return F.mse_loss(prediction.float(), target.float(), reduction="mean")
        return masked_mse(prediction, target, batch["loss_mask"], cfg.mask_weight)

    def train_step(self, batch: Mapping, *, micro_index: int = 0, **fixed) -> torch.Tensor:
        """Forward, backward and (at the end of an accumulation window) one optimiser + LR step."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss = self.compute_loss(batch, micro_index=micro_index, **fixed)
            acc.backward(loss)
            if acc.sync_gradients and self.config.max_grad_norm:
                acc.clip_grad_norm_(self.trainable_params, self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to ``max_steps``, saving every ``save_steps``. Ctrl-C stops at the next step, saves, then raises."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        main = acc.is_main_process
        if self.step >= cfg.max_steps:
            logger.warning("already at step %d of --max-steps %d: nothing to train", self.step, cfg.max_steps)
            return self._result()
        log = open(cfg.output_dir / LOG_NAME, "a", encoding="utf-8") if main else None  # noqa: SIM115
        progress = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {cfg.stage}",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (acc.is_local_main_process and cfg.show_progress),
        )
        restore = self._install_interrupt_handler()
        try:
            window = _StepWindow()
            while self.step < cfg.max_steps:
                if self._train_epoch(window, log, progress):
                    self.epoch += 1
                    self.batches_in_epoch = 0
        finally:
            restore()
            progress.close()
            if log is not None:
                log.close()
            if cfg.report_to != "none":
                acc.end_training()
        return self._result()

    def _epoch_loader(self):
        """The data loader of the current epoch, past the batches it already trained on (resume)."""
        loader = self.loader
        if self.batches_in_epoch:
            loader = self.accelerator.skip_first_batches(self.loader, self.batches_in_epoch)
        loader.set_epoch(self.epoch)  # data order
        self.dataset.set_epoch(self.epoch)  # augmentation (accelerate skips this for a skipping loader)
        return loader

    def _train_epoch(self, window: _StepWindow, log, progress) -> bool:
        """Train through the rest of the current epoch, logging and saving after each optimiser step.

        Returns whether the epoch ran to its end (``False`` when ``max_steps`` came first).
        """
        cfg, acc = self.config, self.accelerator
        micro = 0
        for batch in self._epoch_loader():
            window.losses.append(self.train_step(batch, micro_index=micro))
            window.samples += len(batch["captions"])
            micro += 1
            if not acc.sync_gradients:
                continue
            self.step += 1
            self.batches_in_epoch += micro
            micro = 0
            self._log_step(window, log, progress)
            window.reset()
            stop = self._stop_requested()
            if self.step % cfg.save_steps == 0 or self.step >= cfg.max_steps or stop:
                self.save()
            if stop:
                raise KeyboardInterrupt
            if self.step >= cfg.max_steps:
                return False
        return True

    def _log_step(self, window: _StepWindow, log, progress) -> None:
        """One ``train_log.jsonl`` record (loss and throughput over all processes), the trackers and the bar."""
        cfg, acc = self.config, self.accelerator
        loss = acc.gather(torch.stack(window.losses).mean().reshape(1)).mean().item()
        seen = int(acc.gather(torch.tensor([window.samples], device=acc.device)).sum().item())
        elapsed = time.perf_counter() - window.started
        self.last_loss = loss
        lr = self.lr_scheduler.get_last_lr()[0]
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss,
            "lr": lr,
            "samples_per_s": round(seen / elapsed, 4) if elapsed > 0 else None,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if cfg.report_to != "none":
            acc.log({"loss": loss, "lr": lr, "samples_per_s": record["samples_per_s"] or 0.0}, step=self.step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def _result(self) -> TrainResult:
        return TrainResult(
            output_dir=self.config.output_dir,
            step=self.step,
            checkpoints=list(self.checkpoints),
            last_loss=self.last_loss,
            resumed_from=self.resumed_from,
            main_process=self.accelerator.is_main_process,
        )

    def _install_interrupt_handler(self):
        """First Ctrl-C: finish the current step, save, exit 130. Second Ctrl-C: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self._stop = True
            logger.warning("interrupted: saving after the current step (Ctrl-C again to stop now)")

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def _stop_requested(self) -> bool:
        """Whether any process was interrupted (all processes agree, so they save at the same step)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line is dropped


def _strip_wrappers(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def train(config: TrainConfig, items: Sequence[data_mod.TrainItem]) -> TrainResult:
    """Set up and run one training stage."""
    return Trainer(config, items).setup().run()
