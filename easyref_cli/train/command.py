"""``easyref train``: option parsing for the training command (registered in ``cli.py``).

Top level imports only the standard library, Typer and the error/CLI helpers, so ``easyref --help``
stays instant; torch, diffusers, transformers and accelerate load inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from easyref_cli.clitools import setup_logging
from easyref_cli.errors import UsageError

_DATA = "Data"
_MODELS = "Models"
_OPT = "Optimisation"
_RUN = "Runtime"


def train_command(
    stage: Annotated[
        str,
        typer.Option(
            "--stage", help="align, single or multi (the paper's three stages, in order).", show_default=False
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Training data: the official JSON list (image_file, text, target[, face]).",
            rich_help_panel=_DATA,
            show_default=False,
        ),
    ],
    data_root: Annotated[
        Path,
        typer.Option(
            "--data-root", help="Folder the paths in --data are relative to.", rich_help_panel=_DATA, show_default=False
        ),
    ],
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model",
            help="SDXL diffusers folder (required to train).",
            rich_help_panel=_MODELS,
            show_default=False,
        ),
    ] = None,
    mllm: Annotated[
        Path | None,
        typer.Option(
            "--mllm",
            help="Qwen2-VL folder, e.g. Qwen2-VL-2B-Instruct (required to train).",
            rich_help_panel=_MODELS,
            show_default=False,
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            "-o",
            help="Where checkpoints, state and train_log.jsonl go (required to train).",
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from this EasyRef checkpoint (the previous stage's; official layout).",
            rich_help_panel=_MODELS,
        ),
    ] = None,
    max_steps: Annotated[
        int, typer.Option("--max-steps", help="Optimiser steps to train to.", rich_help_panel=_OPT)
    ] = 10_000,
    resolution: Annotated[
        int, typer.Option("--resolution", help="Training resolution (multiple of 64).", rich_help_panel=_DATA)
    ] = 1024,
    resize: Annotated[
        str | None,
        typer.Option(
            "--resize",
            help="crop: short side to --resolution + centre crop; aspect: keep the aspect ratio, ~resolution² pixels (needs --batch-size 1). Default: the official scripts' per stage (crop for align and single, aspect for multi).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Per-device batch. Default per stage: 8 / 4 / 1.", rich_help_panel=_OPT),
    ] = None,
    gradient_accumulation: Annotated[
        int | None,
        typer.Option(
            "--gradient-accumulation",
            help="Micro-batches per optimiser step. Default per stage: 1 / 2 / 4.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option(
            "--learning-rate", help="AdamW learning rate. Default per stage: 1e-4 / 4e-5 / 2e-5.", rich_help_panel=_OPT
        ),
    ] = None,
    lr_scheduler: Annotated[
        str,
        typer.Option(
            "--lr-scheduler",
            help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial.",
            rich_help_panel=_OPT,
        ),
    ] = "constant",
    lr_warmup_steps: Annotated[
        int, typer.Option("--lr-warmup-steps", help="Warm-up steps of the LR schedule.", rich_help_panel=_OPT)
    ] = 0,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay.", rich_help_panel=_OPT)
    ] = 0.0,
    max_grad_norm: Annotated[
        float | None,
        typer.Option(
            "--max-grad-norm",
            help="Clip the gradient norm (off by default, as the official code).",
            rich_help_panel=_OPT,
        ),
    ] = None,
    lora_rank: Annotated[
        int | None,
        typer.Option(
            "--lora-rank",
            help="LoRA rank for single/multi. Default: the --init checkpoint's, else 128.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    noise_offset: Annotated[
        float, typer.Option("--noise-offset", help="Offset-noise strength (0 = off).", rich_help_panel=_OPT)
    ] = 0.0,
    mask_weight: Annotated[
        float,
        typer.Option(
            "--mask-weight",
            help="Weight the loss 1 + W on each target's 'mask' (a greyscale image per data item, white = "
            "weighted), as kohya's --masked_loss does. 0 (default): the official plain loss.",
            rich_help_panel=_OPT,
        ),
    ] = 0.0,
    max_references: Annotated[
        int, typer.Option("--max-references", help="At most this many references per sample.", rich_help_panel=_DATA)
    ] = 28,
    save_steps: Annotated[
        int,
        typer.Option(
            "--save-steps",
            help="Save a checkpoint and the resumable state every N steps (and at the end).",
            rich_help_panel=_RUN,
        ),
    ] = 2000,
    mixed_precision: Annotated[
        str | None,
        typer.Option(
            "--mixed-precision",
            help="no, fp16 or bf16. Default: accelerate's config / `accelerate launch --mixed_precision`.",
            rich_help_panel=_RUN,
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Recompute activations in the backward pass (less memory, ~30% slower).",
            rich_help_panel=_RUN,
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --output-dir from its last saved step (same options).",
            rich_help_panel=_RUN,
        ),
    ] = False,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed for initialisation, data order, augmentation and noise.", rich_help_panel=_RUN
        ),
    ] = 0,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="cpu to force the CPU; otherwise accelerate's placement (pick GPUs with CUDA_VISIBLE_DEVICES).",
            rich_help_panel=_RUN,
        ),
    ] = None,
    num_workers: Annotated[
        int, typer.Option("--num-workers", help="Data-loader worker processes.", rich_help_panel=_RUN)
    ] = 2,
    report_to: Annotated[
        str,
        typer.Option(
            "--report-to",
            help="none or tensorboard (logs under OUT/logs; needs the tensorboard package).",
            rich_help_panel=_RUN,
        ),
    ] = "none",
    check_data: Annotated[
        bool,
        typer.Option(
            "--check-data", help="Only validate the data (decoding every image) and exit.", rich_help_panel=_DATA
        ),
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")] = False,
) -> None:
    """Train EasyRef: the paper's progressive three stages (align → single → multi).

    Runs as-is on one device or under `accelerate launch` (multi-GPU, multi-node, DeepSpeed ZeRO-2).
    Every file named by --data is checked first; problems are listed and nothing trains (exit 2).
    Writes OUT/checkpoint-STEP.safetensors (official layout: usable by `easyref generate --adapter`),
    OUT/state (for --resume) and OUT/train_log.jsonl.
    """
    setup_logging(verbose, quiet)
    from easyref_cli.train import TrainConfig
    from easyref_cli.train import data as data_mod

    if check_data:  # 1a. only the data: no models, no output folder needed
        _check_data_only(stage, data, data_root, quiet)
        return
    _require(base_model=base_model, mllm=mllm, output_dir=output_dir)

    config = TrainConfig(
        stage=stage,
        data=data,
        data_root=data_root,
        base_model=base_model,
        mllm=mllm,
        output_dir=output_dir,
        init=init,
        max_steps=max_steps,
        resolution=resolution,
        resize=resize,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        learning_rate=learning_rate,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        save_steps=save_steps,
        mixed_precision=mixed_precision,
        resume=resume,
        seed=seed,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        noise_offset=noise_offset,
        mask_weight=mask_weight,
        lora_rank=lora_rank,
        num_workers=num_workers,
        max_references=max_references,
        report_to=report_to,
        show_progress=not quiet,
    ).resolved()
    _check_paths(config)

    # 1b. data first: every file is fully decoded before any model loads (a truncated image must be
    # listed now, not crash a data-loader worker hours into training)
    items = data_mod.require_valid(data_mod.validate_data(config.data, config.data_root, decode=True), config.data)

    # 2. train
    _train(config, items, quiet)


def _train(config, items, quiet: bool) -> None:
    """Train, then (unless ``quiet``) say where the last checkpoint is, on the main process only."""
    from easyref_cli.train.trainer import Trainer

    result = Trainer(config, items).setup().run()
    if not quiet and result.main_process and result.checkpoints:
        loss = "" if result.last_loss is None else f", last loss {result.last_loss:.4f}"
        typer.echo(f"trained --stage {config.stage} to step {result.step}{loss}: {result.checkpoints[-1]}", err=True)


def _check_data_only(stage: str, data: Path, data_root: Path | None, quiet: bool) -> None:
    """``--check-data``: decode every file the data names, report, train nothing."""
    from easyref_cli.train import STAGES
    from easyref_cli.train import data as data_mod

    if stage not in STAGES:
        raise UsageError(f"--stage must be one of {', '.join(STAGES)}, not {stage!r}")
    report = data_mod.validate_data(data, data_root, decode=True)
    items = data_mod.require_valid(report, data)
    if not quiet:
        typer.echo(
            f"{data}: {len(items)} items, {report.files} files ok "
            f"({report.multi_reference_items} multi-reference, {report.face_items} face items)",
            err=True,
        )


def _require(**paths: Path | str | None) -> None:
    missing = ["--" + name.replace("_", "-") for name, value in paths.items() if value is None]
    if missing:
        raise UsageError(f"training needs {', '.join(missing)} (only --check-data runs without them)")


def _check_paths(config) -> None:
    """Fail before any work on paths that cannot be right, naming each."""
    problems = []
    if not config.data.is_file():
        problems.append(f"--data {config.data} does not exist")
    if not config.data_root.is_dir():
        problems.append(f"--data-root {config.data_root} is not a directory")
    if not (config.base_model / "model_index.json").is_file():
        problems.append(f"--base-model {config.base_model} is not an SDXL diffusers folder (no model_index.json)")
    if not (config.mllm / "config.json").is_file():
        problems.append(f"--mllm {config.mllm} is not a transformers model folder (no config.json)")
    if config.init is not None and not config.init.is_file():
        problems.append(f"--init {config.init} does not exist")
    if problems:
        raise UsageError("\n".join(problems))
