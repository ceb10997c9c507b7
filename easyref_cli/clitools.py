"""Helpers every command shares: the one error → exit-code mapping, and logging setup."""

from __future__ import annotations

import functools
import logging
import os
import sys

import typer

from easyref_cli.errors import EasyRefError

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


class BarSafeHandler(logging.StreamHandler):
    """A stream handler that puts each record on its own line while tqdm progress bars are drawn.

    A bar's line has no newline until it closes, so a plain write would glue the message onto it;
    ``tqdm.write`` clears the bars, writes the message and draws them again (what
    ``tqdm.contrib.logging.logging_redirect_tqdm`` does inside a ``with`` block, here for the whole
    command). tqdm is not imported for it: no bar can be open until something else imported it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        std = sys.modules.get("tqdm.std")
        if std is None:
            super().emit(record)
            return
        try:
            std.tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging.StreamHandler.emit: report and go on
            self.handleError(record)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = BarSafeHandler(sys.stderr)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[handler], force=True)
    if level > logging.DEBUG:
        # transformers/diffusers configure their loggers on import, from these variables.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
