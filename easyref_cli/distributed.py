"""Scale-out on accelerate: shard a plan by group across processes, merge manifest shards.

``accelerate launch [--multi_gpu] --num_processes N -m easyref_cli generate …`` (or ``easyref generate
--num-processes N …``, which runs exactly that) starts N copies of the command. Each builds the
same plan, takes its share of the *groups* (so each group is encoded once, on one process;
shares balanced by job count), writes its images and its own manifest shard, and the main
process merges the shards into ``OUT/manifest.jsonl`` at the end, in plan order. Seeds and
outputs do not depend on the process count: every image has its own CPU generator.

Torch-free at import; accelerate is imported only when a distributed run is detected.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from easyref_cli import files
from easyref_cli.jobs import Job
from easyref_cli.plan import Plan
from easyref_cli.runlog import RunSummary

logger = logging.getLogger(__name__)

SHARD_GLOB = files.SHARD_GLOB
BARRIER_TIMEOUT_HOURS = 72
STATUS_ENV = "EASYREF_STATUS_FILE"


def _manifest_shard(out_dir: Path, name: str) -> Path:
    """``OUT/.manifest.NAME.HOST-PID.jsonl``: unique to this process, so runs sharing OUT never share one."""
    import socket

    return Path(out_dir) / f".manifest.{name}.{socket.gethostname()}-{os.getpid()}.jsonl"


def shard_path(out_dir: Path, index: int) -> Path:
    """Process ``index``'s manifest shard in a distributed run."""
    return _manifest_shard(out_dir, f"rank{index}")


def share_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    """The manifest shard of a ``--shard K/N`` run."""
    return _manifest_shard(out_dir, f"shard-{shard[0]}-of-{shard[1]}")


def is_distributed() -> bool:
    """True inside a multi-process launch (torchrun/accelerate/MPI set these)."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


@dataclass
class Processes:
    """This process's place in the run. ``count == 1`` outside a distributed launch."""

    index: int = 0
    count: int = 1
    device: str | None = None
    _state: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def close(self) -> None:
        if self._state is not None:
            self._state.destroy_process_group()  # without it gloo aborts the process at exit
            self._state = None


def current(device: str | None) -> Processes:
    """Join the distributed run if there is one (``accelerate.PartialState``), else a single process."""
    if not is_distributed():
        return Processes()
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    # Processes meet at two barriers only (start, end); a fast one may wait hours for the slowest,
    # far beyond torch's default 10/30-minute collective timeout.
    state = PartialState(cpu=cpu, timeout=timedelta(hours=BARRIER_TIMEOUT_HOURS))
    chosen = "cpu" if cpu else str(state.device)  # one GPU per process, whatever --device index says
    if device not in (None, "cpu", "cuda") and device != chosen:
        logger.warning(
            "--device %s ignored in a %d-process run: process %d uses %s",
            device,
            state.num_processes,
            state.process_index,
            chosen,
        )
    return Processes(index=state.process_index, count=state.num_processes, device=chosen, _state=state)


def shard_jobs(jobs: Sequence[Job], count: int, index: int) -> list[Job]:
    """This process's jobs: whole groups, balanced by job count (largest group first to the
    least-loaded process; ties by process index), deterministic for a given plan and count."""
    if count <= 1:
        return list(jobs)
    by_group: dict[str, list[Job]] = {}
    for job in jobs:
        by_group.setdefault(job.group.name, []).append(job)
    loads = [0] * count
    owner: dict[str, int] = {}
    for name in sorted(by_group, key=lambda n: (-len(by_group[n]), list(by_group).index(n))):
        target = min(range(count), key=lambda r: (loads[r], r))
        owner[name] = target
        loads[target] += len(by_group[name])
    return [job for job in jobs if owner[job.group.name] == index]


def share_of(plan: Plan) -> Plan:
    """The ``--shard K/N`` share of ``plan``: whole groups of the *plan* (not of what is pending), so a
    share is the same whenever it starts."""
    k, n = plan.shard
    return replace(plan, jobs=tuple(shard_jobs(plan.jobs, n, k - 1)))


#: Runs one process's plan, writing its manifest at the given path.
Execute = Callable[..., RunSummary]


def run(plan: Plan, execute: Execute, *, progress: bool = True) -> RunSummary:
    """``execute(plan, manifest_path, progress=...)`` here, or on this process's share of the plan.

    Scale-out: whole groups of the *pending* jobs per process (balanced on what is left to do), a
    manifest shard each, merged by the main process, which also logs the skips and reports for all.
    Every process reads the filesystem before the first barrier, i.e. before anyone writes.
    """
    procs = current(plan.device)
    try:
        if procs.count == 1 and plan.shard is not None:
            share = share_of(plan)
            merge_shards(plan.out_dir)  # finished shards of earlier runs; live ones are locked and stay
            summary = execute(share, share_path(plan.out_dir, plan.shard), progress=progress)
            merge_shards(plan.out_dir, [j.job_id for j in plan.jobs])  # its own, and any other that finished
            return summary
        if procs.count == 1:
            merge_shards(plan.out_dir)  # left behind by a crashed distributed run
            return execute(plan, plan.out_dir / files.MANIFEST_NAME, progress=progress)
        pending_ids = {j.job_id for j in plan.pending()}
        mine = {
            j.job_id for j in shard_jobs([j for j in plan.jobs if j.job_id in pending_ids], procs.count, procs.index)
        }
        jobs = [j for j in plan.jobs if j.job_id in mine or (procs.is_main and j.job_id not in pending_ids)]
        if procs.is_main:
            merge_shards(plan.out_dir)  # left behind by a crashed run
        procs.wait()
        share = replace(plan, jobs=tuple(jobs), device=procs.device)
        summary = execute(share, shard_path(plan.out_dir, procs.index), progress=progress and procs.is_main)
        procs.wait()
        if not procs.is_main:
            summary.worker = True
            return summary
        merged = merge_shards(plan.out_dir, [j.job_id for j in plan.jobs])
        ours = {j.job_id for j in plan.jobs}  # another run's finished shards may be folded in too
        total = RunSummary.of([e for e in merged if e.get("job_id") in ours], total=len(plan.jobs),
                              interrupted=summary.interrupted)  # fmt: skip
        total.stopped = summary.stopped
        return total
    finally:
        procs.close()


def merge_shards(out_dir: Path, job_order: Sequence[str] = ()) -> list[dict]:
    """Append every finished manifest shard's lines to ``manifest.jsonl`` (plan order), then delete
    those shards. Returns the merged entries.

    Also picks up shards a crashed run left behind. A shard is taken only under its own exclusive
    lock: a live writer holds it (its shard stays), and of two runs merging at once each shard goes
    to one of them (the other finds it locked, or already unlinked).
    """
    out_dir = Path(out_dir)
    order = {job_id: i for i, job_id in enumerate(job_order)}
    entries: list[tuple[int, int, int, dict]] = []
    taken: list[tuple[Path, int]] = []
    try:
        for rank, shard in enumerate(sorted(out_dir.glob(SHARD_GLOB))):
            try:
                fd = os.open(shard, os.O_RDWR)  # NFS locks exclusively only what is open for writing
            except OSError:
                continue
            if not files.try_lock(fd) or os.fstat(fd).st_nlink == 0:  # live, or merged a moment ago
                os.close(fd)
                continue
            taken.append((shard, fd))
            for line, entry in enumerate(files.read_manifest(shard)):
                entries.append((order.get(str(entry.get("job_id")), len(order)), rank, line, entry))
        if not taken:
            return []
        entries.sort(key=lambda e: e[:3])
        merged = [e[3] for e in entries]
        with files.ManifestWriter(out_dir / files.MANIFEST_NAME) as manifest:
            for entry in merged:
                manifest.write(entry)
        for shard, _ in taken:
            shard.unlink(missing_ok=True)
        return merged
    finally:
        for _, fd in taken:
            os.close(fd)


def relaunch(num_processes: int, argv: Sequence[str]) -> int:
    """``easyref generate --num-processes N …`` → the same command under ``accelerate launch`` on this node.

    ``--multi_gpu`` selects torchrun's launcher, which also starts N CPU processes on a machine
    without GPUs (accelerate's ``--cpu`` launcher needs MPI for that).
    """
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "easyref_cli",
        *argv,
    ]
    import signal
    import tempfile

    logger.info("launching: %s", " ".join(cmd))
    with tempfile.TemporaryDirectory() as tmp:
        status_file = Path(tmp) / "status"
        proc = subprocess.Popen(cmd, env={**os.environ, STATUS_ENV: str(status_file)})

        def forward(signum, _frame):  # a `kill` of this process must reach the launcher and its workers
            proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # The launcher folds every worker failure into 1; the main process's own verdict is exact.
        if status_file.is_file():
            return int(status_file.read_text().strip() or code)
        return code


def report_status(code: int) -> bool:
    """Main process of a ``--num-processes`` run: leave the exit code for :func:`relaunch` to return
    (the process itself then exits 0, so the launcher does not print a worker-failure traceback)."""
    path = os.environ.get(STATUS_ENV)
    if not path or not is_distributed():
        return False
    Path(path).write_text(str(code))
    return True


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out
