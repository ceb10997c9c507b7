"""The ``easyref`` command line. Thin: parse, call the library, map typed errors to exit codes.

Heavy imports (torch, diffusers, transformers) happen inside command bodies so ``easyref --help``
and ``--dry-run`` stay instant.

Exit codes: 0 ok, 1 some jobs failed, 2 usage/config/model error before work, 130 interrupted.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from easyref_cli import __version__
from easyref_cli.errors import EasyRefError
from easyref_cli.options import (
    AdapterOpt,
    BidirectionalOpt,
    DeviceOpt,
    DtypeOpt,
    InstructionOpt,
    MllmOpt,
    OutFileOpt,
)

app = typer.Typer(
    name="easyref",
    help="Multi-reference image generation with EasyRef (SDXL + Qwen2-VL reference tokens).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_JOBS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _debug() -> bool:
    return os.environ.get("EASYREF_DEBUG", "").lower() in {"1", "true", "yes"}


def handle_errors(func):
    """The one place that turns exceptions into messages and exit codes (``EASYREF_DEBUG=1`` re-raises)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EasyRefError as exc:
            if _debug():
                raise
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(code=EXIT_INTERRUPTED) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"easyref-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv for debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")] = False,
) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"verbose": verbose, "quiet": quiet}


@app.command()
@handle_errors
def encode(
    group_dir: Annotated[Path, typer.Argument(help="Folder of reference images (one group).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Caption given to the MLLM after the instruction.")] = "",
    mllm: MllmOpt = None,
    adapter: AdapterOpt = None,
    out: OutFileOpt = Path("conditions.safetensors"),
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    instruction: InstructionOpt = None,
    bidirectional_final: BidirectionalOpt = False,
) -> None:
    """Encode one reference group into EasyRef condition tokens.

    Writes tensors ``cond`` and ``uncond`` of shape (64, cross_attention_dim) to a safetensors
    file, with model ids, hashes, instruction and caption in its metadata.
    """
    from easyref_cli.encode import encode_group

    result = encode_group(
        group_dir,
        caption=prompt,
        mllm=mllm,
        adapter=adapter,
        out=out,
        dtype=dtype,
        device=device,
        instruction=instruction,
        bidirectional_final=bidirectional_final,
    )
    typer.echo(f"wrote {result.path}: cond {tuple(result.cond_shape)}, uncond {tuple(result.uncond_shape)}", err=True)


def main() -> None:
    app()
