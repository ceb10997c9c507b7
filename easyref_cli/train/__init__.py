"""``easyref train``: the paper's progressive three-stage training, on accelerate.

Stages (what trains; everything else is frozen):

=========  ==========================================================================================
``align``  final MLLM layer + its norm, the 64 reference tokens, the projector, ``to_k_ip``/``to_v_ip``
           (initialised from the UNet's ``to_k``/``to_v`` when there is no ``--init``)
``single`` all of ``align`` + the MLLM (vision tower and trunk layers) + LoRA on ``to_q/to_k/to_v/
           to_out.0`` of every UNet attention layer (rank 128 by default)
``multi``  the same parameters as ``single``, on multi-reference data: references shuffled and, with
           probability 0.4, truncated to a random count ≥ 2
=========  ==========================================================================================

This module is torch-free: the configuration is validated (and ``--check-data`` runs) without
importing torch. The loop lives in :mod:`easyref_cli.train.trainer`, the data in
:mod:`easyref_cli.train.data`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from easyref_cli.errors import UsageError

STAGES = ("align", "single", "multi")
MIXED_PRECISION = ("no", "fp16", "bf16")
RESIZE_MODES = ("crop", "aspect")
REPORT_TO = ("none", "tensorboard")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

#: The official scripts' per-stage settings (scripts/*.sh of TempleX98/EasyRef): batch size per
#: device, gradient accumulation, learning rate, truncation rate, and the resize: `--random_crop`
#: (our "crop") in the align and single scripts, the aspect-keeping `adaptive_resize` in multi.
#: Used when an option is not given.
STAGE_DEFAULTS: dict[str, dict[str, float | int | str]] = {
    "align": {
        "batch_size": 8,
        "gradient_accumulation": 1,
        "learning_rate": 1e-4,
        "truncate_rate": 0.0,
        "resize": "crop",
    },
    "single": {
        "batch_size": 4,
        "gradient_accumulation": 2,
        "learning_rate": 4e-5,
        "truncate_rate": 0.0,
        "resize": "crop",
    },
    "multi": {
        "batch_size": 1,
        "gradient_accumulation": 4,
        "learning_rate": 2e-5,
        "truncate_rate": 0.4,
        "resize": "aspect",
    },
}
DEFAULT_LORA_RANK = 128


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. ``None`` means "the stage default" until :meth:`resolved`."""

    stage: str
    data: Path
    data_root: Path
    base_model: Path
    mllm: Path
    output_dir: Path
    init: Path | None = None
    max_steps: int = 10_000
    resolution: int = 1024
    resize: str | None = None
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    save_steps: int = 2000
    mixed_precision: str | None = None  # None: whatever `accelerate launch` / accelerate config says
    resume: bool = False
    seed: int = 0
    device: str | None = None
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    mask_weight: float = 0.0  # loss weight 1 + W·mask per latent pixel (the items' 'mask'); 0: the official loss
    lora_rank: int | None = None  # None: the --init checkpoint's rank, else 128
    num_workers: int = 2
    max_references: int = 28
    truncate_rate: float | None = None
    image_drop_rate: float = 0.05
    text_drop_rate: float = 0.05
    both_drop_rate: float = 0.05
    report_to: str = "none"
    show_progress: bool = True

    @property
    def trains_mllm(self) -> bool:
        return self.stage in ("single", "multi")

    @property
    def trains_lora(self) -> bool:
        return self.stage in ("single", "multi")

    def resolved(self) -> TrainConfig:
        """A copy with the stage defaults filled in; raises :class:`UsageError` listing every bad value."""
        if self.stage not in STAGES:
            raise UsageError(f"--stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        cfg = self._with_stage_defaults()
        problems = cfg._problems()
        if problems:
            raise UsageError("invalid training options:\n  " + "\n  ".join(problems))
        return cfg

    def _with_stage_defaults(self) -> TrainConfig:
        """A copy with the stage's defaults for the options left ``None`` and every path a ``Path``."""
        defaults = STAGE_DEFAULTS[self.stage]
        filled = {
            name: defaults[name] if getattr(self, name) is None else getattr(self, name)
            for name in ("batch_size", "gradient_accumulation", "learning_rate", "truncate_rate", "resize")
        }
        return dataclasses.replace(
            self,
            batch_size=int(filled["batch_size"]),
            gradient_accumulation=int(filled["gradient_accumulation"]),
            learning_rate=float(filled["learning_rate"]),
            truncate_rate=float(filled["truncate_rate"]),
            resize=str(filled["resize"]),
            data=Path(self.data),
            data_root=Path(self.data_root),
            base_model=Path(self.base_model),
            mllm=Path(self.mllm),
            output_dir=Path(self.output_dir),
            init=None if self.init is None else Path(self.init),
        )

    def _problems(self) -> list[str]:
        """Every invalid value of this (resolved) configuration, as messages naming the option."""
        problems: list[str] = []
        for name, flag in (
            ("max_steps", "--max-steps"),
            ("batch_size", "--batch-size"),
            ("gradient_accumulation", "--gradient-accumulation"),
            ("save_steps", "--save-steps"),
            ("max_references", "--max-references"),
        ):
            if getattr(self, name) < 1:
                problems.append(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.resolution < 64 or self.resolution % 64:
            problems.append(f"--resolution must be a positive multiple of 64, got {self.resolution}")
        if self.resize not in RESIZE_MODES:
            problems.append(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
        elif self.resize == "aspect" and self.batch_size != 1:
            problems.append(
                "--resize aspect gives every image its own size, so it needs --batch-size 1 "
                "(use --gradient-accumulation for larger effective batches)"
            )
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            problems.append(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}"
            )
        if self.report_to not in REPORT_TO:
            problems.append(f"--report-to must be one of {', '.join(REPORT_TO)}, not {self.report_to!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {self.lr_scheduler!r}")
        if not self.learning_rate > 0:
            problems.append(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.lr_warmup_steps < 0 or self.num_workers < 0 or self.noise_offset < 0 or self.weight_decay < 0:
            problems.append("--lr-warmup-steps, --num-workers, --noise-offset and --weight-decay cannot be negative")
        if not self.mask_weight >= 0:
            problems.append(f"--mask-weight cannot be negative, got {self.mask_weight}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.lora_rank is not None and self.lora_rank < 1:
            problems.append(f"--lora-rank must be at least 1, got {self.lora_rank}")
        rates = (self.image_drop_rate, self.text_drop_rate, self.both_drop_rate, self.truncate_rate)
        if any(not 0 <= r <= 1 for r in rates) or sum(rates[:3]) > 1:
            problems.append("drop and truncation rates must lie in [0, 1] and the three drop rates sum to at most 1")
        return problems

    def run_record(self) -> dict:
        """The settings a resumed run must share with the original (checked by ``--resume``)."""
        keys = (
            "stage",
            "data",
            "data_root",
            "base_model",
            "mllm",
            "init",
            "resolution",
            "resize",
            "batch_size",
            "gradient_accumulation",
            "learning_rate",
            "lr_scheduler",
            "lr_warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "seed",
            "noise_offset",
            "lora_rank",
            "max_references",
            "truncate_rate",
            "image_drop_rate",
            "text_drop_rate",
            "both_drop_rate",
        )
        record = {k: (str(getattr(self, k)) if isinstance(getattr(self, k), Path) else getattr(self, k)) for k in keys}
        if self.mask_weight:  # only when set: runs recorded before the option existed still resume
            record["mask_weight"] = self.mask_weight
        return record


@dataclass
class TrainResult:
    """What a finished (or stopped) run did."""

    output_dir: Path
    step: int
    checkpoints: list[Path] = field(default_factory=list)
    last_loss: float | None = None
    resumed_from: int | None = None
    main_process: bool = True  # False on the other processes of a distributed run (they print nothing)


__all__ = ["STAGES", "STAGE_DEFAULTS", "DEFAULT_LORA_RANK", "TrainConfig", "TrainResult"]
