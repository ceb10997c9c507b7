"""Typer commands ``easyref eval`` and ``easyref report``: parse, call the library, print.

Registered in ``cli.py`` as ``app.command("eval")(handle_errors(eval_command))`` and
``app.command("report")(handle_errors(report_command))``. Only stdlib, typer and the error /
logging helpers are imported at module level, so ``easyref --help`` stays instant; the work lives
in :mod:`easyref_cli.eval.metrics` and :mod:`easyref_cli.eval.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from easyref_cli.clitools import setup_logging

OutArg = Annotated[
    Path,
    typer.Argument(
        metavar="OUT", help="Output folder written by `easyref generate` (holds manifest.jsonl).", show_default=False
    ),
]
ClipModelOpt = Annotated[
    str | None,
    typer.Option(
        "--clip-model",
        help="CLIP folder or hub id, for CLIP-I and CLIP-T (default openai/clip-vit-large-patch14).",
        rich_help_panel="Models",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="'tiny': tiny random CLIP + DINOv2 built locally, for an offline smoke run (meaningless numbers).",
        rich_help_panel="Models",
    ),
]
DinoModelOpt = Annotated[
    str | None,
    typer.Option(
        "--dino-model",
        help="DINOv2 or DINO ViT folder or hub id, for DINO-I (default facebook/dinov2-small; facebook/dino-vits16 works too).",
        rich_help_panel="Models",
    ),
]
TargetsOpt = Annotated[
    Path | None,
    typer.Option(
        "--targets",
        help="Held-out targets (MRBench): DIR/<group>/<prompt_id>_<seed>.<ext>, DIR/<group>/<prompt_id>.<ext> or DIR/<group>.<ext>, first found wins. Adds clip_i_target and dino_i_target.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="torch device: cpu, cuda, cuda:1, mps … (default: cuda if available).",
        rich_help_panel="Runtime",
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Images per model call. Default: 16.", rich_help_panel="Runtime"),
]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging; -vv debug.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or file notices; errors only.")]


def eval_command(
    out: OutArg,
    clip_model: ClipModelOpt = None,
    dino_model: DinoModelOpt = None,
    targets: TargetsOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Score the images of OUT against their references: CLIP-I, CLIP-T and DINO-I (MRBench style).

    CLIP-I: mean cosine similarity of CLIP image embeddings between each image and its reference images. CLIP-T: cosine between the image and its prompt. DINO-I: as CLIP-I with DINO CLS embeddings. With --targets, the same image metrics against a held-out target.

    Writes OUT/eval/per_image.jsonl and OUT/eval/metrics.json (overall and per group) and prints a markdown table. Models load from local folders or hub ids (through the Hugging Face cache); --model tiny builds tiny random ones for an offline smoke run.

    Exit codes: 0 ok, 2 usage/input/model error (missing manifest, missing references, weights not found).
    """
    setup_logging(verbose, quiet)
    from easyref_cli.eval import manifest_path
    from easyref_cli.eval.metrics import TINY_NOTICE, evaluate, markdown_table, model_specs

    manifest_path(out)  # a wrong OUT fails before any model is built or loaded
    clip_spec, dino_spec = model_specs(model, clip_model, dino_model)
    if model == "tiny" and not quiet:
        typer.echo(TINY_NOTICE, err=True)
    result = evaluate(
        out,
        clip_model=clip_spec,
        dino_model=dino_spec,
        targets=targets,
        device=device,
        batch_size=batch_size,
        progress=not quiet,
    )
    typer.echo(markdown_table(result.metrics))
    if not quiet:
        typer.echo(f"wrote {result.per_image_path} and {result.metrics_path}", err=True)


def report_command(
    out: OutArg,
    thumb_size: Annotated[
        int | None, typer.Option("--thumb-size", min=32, help="Thumbnail size in pixels. Default: 192.")
    ] = None,
    columns: Annotated[int | None, typer.Option("--columns", min=1, help="Images per sheet row. Default: 6.")] = None,
    max_images: Annotated[
        int | None, typer.Option("--max-images", min=1, help="Generated images drawn per sheet at most. Default: 120.")
    ] = None,
    show_paths: Annotated[
        bool, typer.Option("--show-paths", help="Show the output folder's absolute path in index.html (off: its name).")
    ] = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Draw a contact sheet per group (references, then the generated images with prompt and seed) and a static index page.

    Writes OUT/report/<group>.png and OUT/report/index.html (no network, relative links), with the metrics table when `easyref eval` has run.
    """
    setup_logging(verbose, quiet)
    from easyref_cli.eval.report import build_report

    result = build_report(out, thumb=thumb_size, columns=columns, max_images=max_images, show_paths=show_paths)
    typer.echo(str(result.index))
    if not quiet:
        typer.echo(f"wrote {len(result.sheets)} contact sheet(s) under {result.index.parent}", err=True)
