"""``easyref generate``: build the plan, then list it (``--dry-run``), relaunch it on N processes,
or run it. Torch-free at import (``--dry-run`` never imports torch)."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from easyref_cli import prompts
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


def _stdin_prompts_argv(argv: list[str], path: Path) -> list[str]:
    """``argv`` with ``--prompts -`` (or ``--prompts=-``) reading ``path`` instead."""
    out: list[str] = []
    after_option = False
    for arg in argv:
        if after_option and arg == prompts.STDIN:
            arg = str(path)
        elif arg == f"--prompts={prompts.STDIN}":
            arg = f"--prompts={path}"
        after_option = arg == "--prompts"
        out.append(arg)
    return out


def _write_stdin_prompts(source: prompts.PromptText, folder: Path) -> Path:
    """Standard input's prompt file as a file in ``folder``, its extension that of the format its content
    was read as, so the launched processes read it exactly as this one did."""
    path = Path(folder) / f"stdin-prompts{source.suffix}"
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(source.text)
    return path


def _relaunch(num_processes: int, argv: list[str] | None, prompts_file: Any = None) -> int:
    """The same command under accelerate on ``num_processes`` processes. They cannot read this
    process's standard input: for ``--prompts -`` (read here already, ``prompts_file``) they get a copy
    of it in a temporary folder that lives until the launcher returns."""
    from easyref_cli import distributed

    if distributed.is_distributed():
        raise UsageError(
            "--num-processes is for a plain `easyref generate`; under accelerate launch, give accelerate --num_processes"
        )
    args = distributed.strip_option(sys.argv[1:] if argv is None else argv, "--num-processes")
    if not isinstance(prompts_file, prompts.PromptText):
        return distributed.relaunch(num_processes, args)
    with tempfile.TemporaryDirectory(prefix="easyref-prompts-") as tmp:
        path = _write_stdin_prompts(prompts_file, Path(tmp))
        return distributed.relaunch(num_processes, _stdin_prompts_argv(args, path))


def _merge_manifest(plan: Plan, stderr: IO[str]) -> int:
    """``--merge-manifest``: fold finished shards, then say how much of the plan exists (0: all)."""
    from easyref_cli import distributed

    check_existing_outputs(plan)
    merged = distributed.merge_shards(plan.out_dir, [j.job_id for j in plan.jobs])
    done = sum(plan.output_path(job).exists() for job in plan.jobs)
    live = sorted(p.name for p in plan.out_dir.glob(distributed.SHARD_GLOB))
    print(f"merged {len(merged)} manifest line(s); {done} of {len(plan.jobs)} images exist", file=stderr)
    if live:
        print(f"still running (locked): {', '.join(live)}", file=stderr)
    return 0 if done == len(plan.jobs) else 1


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
    merge_manifest: bool = False,
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
    if prompts.is_stdin(plan_kwargs.get("prompts_file")):  # read once: for the plan and any relaunched processes
        plan_kwargs["prompts_file"] = prompts.read_stdin()
    plan = build_plan(cli=settings, **plan_kwargs)
    if plan.model_family in MODEL_NOTICES and progress:
        print(MODEL_NOTICES[plan.model_family], file=stderr)
    if dry_run:
        check_existing_outputs(plan)  # what the run would refuse, the dry run refuses too
        if plan.shard is not None:
            from easyref_cli.distributed import share_of

            plan = share_of(plan)
        _describe(plan, json_lines, stdout)
        return 0
    if merge_manifest:
        return _merge_manifest(plan, stderr)
    if plan.shard is not None:
        from easyref_cli.distributed import is_distributed

        if is_distributed() or (num_processes or 1) > 1:
            raise UsageError(
                "--shard splits work between separate runs; give it or --num-processes/accelerate, not both"
            )
    if num_processes is not None and num_processes > 1:
        return _relaunch(num_processes, argv, plan_kwargs.get("prompts_file"))

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
