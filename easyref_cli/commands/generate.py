"""``easyref generate``: build the plan, then list it (``--dry-run``), relaunch it on N processes,
or run it. Torch-free at import (``--dry-run`` never imports torch)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from easyref_cli.env import easyref_home
from easyref_cli.errors import UsageError
from easyref_cli.models import MODEL_NOTICES
from easyref_cli.plan import Plan, build_plan
from easyref_cli.resume import check_existing_outputs


def _describe(plan: Plan, json_lines: bool, stdout: IO[str]) -> None:
    if not json_lines:
        stdout.write(plan.describe() + "\n")
        return
    for job in plan.jobs:
        entry = job.to_dict()
        entry["exists"] = plan.output_path(job).exists()
        stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _relaunch(num_processes: int, argv: list[str] | None) -> int:
    from easyref_cli import distributed

    if distributed.is_distributed():
        raise UsageError(
            "--num-processes is for a plain `easyref generate`; under accelerate launch, give accelerate --num_processes"
        )
    args = distributed.strip_option(sys.argv[1:] if argv is None else argv, "--num-processes")
    return distributed.relaunch(num_processes, args)


def generate(
    *,
    settings: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    json_lines: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    no_cache: bool = False,
    compile: bool = False,
    num_processes: int | None = None,
    argv: list[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    **plan_kwargs: Any,
) -> int:
    """Plan (every usage error raised there), then describe, relaunch or run. Returns the exit code.

    ``settings`` are the generation settings given on the command line (``None`` = not given);
    ``plan_kwargs`` go to :func:`easyref_cli.plan.build_plan`.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    plan = build_plan(cli=settings, **plan_kwargs)
    if plan.model_family in MODEL_NOTICES and progress:
        print(MODEL_NOTICES[plan.model_family], file=stderr)
    if dry_run:
        check_existing_outputs(plan)  # what the run would refuse, the dry run refuses too
        _describe(plan, json_lines, stdout)
        return 0
    if num_processes is not None and num_processes > 1:
        return _relaunch(num_processes, argv)

    from easyref_cli import distributed
    from easyref_cli.run import RunOptions, run_plan

    options = RunOptions(
        cache_dir=None if no_cache else (cache_dir or easyref_home() / "conditions"),
        compile=compile,
        progress=progress,
        json_out=stdout if json_lines else None,
    )
    summary = run_plan(plan, options)
    if summary.worker:
        return summary.exit_code
    if progress or summary.failed or summary.interrupted:
        print(summary.line(), file=stderr)
        for err in summary.errors[:20]:
            print(f"  failed: {err}", file=stderr)
    if distributed.report_status(summary.exit_code):
        return 0
    return summary.exit_code
