"""What a run reports: the manifest lines, the ``--json`` stream and the summary counts. Torch-free.

Every job outcome goes through :meth:`RunLog.write` (one manifest line, one ``--json`` line, one
count), so the three can never disagree; :meth:`RunSummary.count` is the one counting rule, also
used for the merged manifest of a distributed run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from easyref_cli.errors import EasyRefError, JobError
from easyref_cli.files import MANIFEST_NAME, ManifestWriter

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    total: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    elsewhere: int = 0  # left to another live run that holds their claims (same jobs)
    interrupted: bool = False
    stopped: str | None = None  # why the run stopped at once (a StorageError's message)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    worker: bool = False  # a non-main process of a distributed run: the main one reports for all

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.worker:  # a non-zero worker exit would make the launcher kill the others mid-run
            return 0
        return 1 if self.failed or self.stopped else 0

    def count(self, entry: Mapping[str, Any]) -> None:
        """Count one manifest entry."""
        status = entry.get("status")
        if status == "ok":
            self.ok += 1
        elif status == "skipped":
            self.skipped += 1
        elif status == "error":
            self.failed += 1
            self.errors.append(
                f"{entry.get('group')}/{entry.get('prompt_id')} seed {entry.get('seed')}: {entry.get('error')}"
            )

    @classmethod
    def of(cls, entries: Iterable[Mapping[str, Any]], *, total: int, interrupted: bool = False) -> RunSummary:
        """The summary of manifest entries (a distributed run's merged shards)."""
        summary = cls(total=total, interrupted=interrupted)
        for entry in entries:
            summary.count(entry)
        return summary

    def line(self) -> str:
        rate = self.ok / self.seconds if self.seconds > 0 and self.ok else 0.0
        text = f"{self.ok} done, {self.skipped} skipped, {self.failed} failed"
        if self.elsewhere:
            text += f", {self.elsewhere} made by another run sharing the output folder"
        text += f" in {self.seconds:.1f}s ({rate:.2f} images/s)"
        if self.stopped:
            return text + f" — stopped: {self.stopped}"
        return text + (" — interrupted; rerun the same command to finish" if self.interrupted else "")


def job_error(exc: BaseException) -> EasyRefError:
    """Any exception of one job as a typed error with a one-line message (OOM with advice)."""
    if isinstance(exc, EasyRefError):
        return exc
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "out of memory" in text.lower():
        return JobError(f"out of memory: {text} (try --batch-size 1, a smaller size or --dtype float16)")
    return JobError(f"{type(exc).__name__}: {text}")


@dataclass
class Stop:
    """Set by SIGINT/SIGTERM (``signum``) or a ``--fail-fast`` failure: the run stops after the
    image in flight."""

    requested: bool = False
    signum: int | None = None


class RunLog:
    """The manifest (file), the ``--json`` stream and the counts of one process's run.

    ``fail`` applies the per-job error policy: log it, record it, and with ``fail_fast`` ask the
    run to stop.
    """

    def __init__(self, manifest: Path, out_dir: Path, *, total: int, json_out: IO[str] | None = None,
                 fail_fast: bool = False, stop: Stop | None = None):  # fmt: skip
        self.summary = RunSummary(total=total)
        self.out_dir = Path(out_dir)
        self.json_out = json_out
        self.fail_fast = fail_fast
        self.stop = stop if stop is not None else Stop()
        # A shard (``.manifest.rankN.jsonl``) has one writer, which holds its lock for the whole run.
        self._writer = ManifestWriter(manifest, exclusive=Path(manifest).name != MANIFEST_NAME)

    def __enter__(self) -> RunLog:
        self._writer.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()

    def write(self, job, status: str, **extra: Any) -> None:
        entry = {
            "job_id": job.job_id,
            "status": status,
            "path": str(self.out_dir / job.output),
            "group": job.group.name,
            "prompt_id": job.prompt_id,
            "seed": job.seed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        self._writer.write(entry)
        if self.json_out is not None:
            self.json_out.write(json.dumps(entry, ensure_ascii=False, sort_keys=True, default=str) + "\n")
            self.json_out.flush()
        self.summary.count(entry)

    def skipped(self, job) -> None:
        self.write(job, "skipped", reason="output exists")

    def ok(self, job, *, encode_s: float, generate_s: float, batch_size: int, record: dict | None = None) -> None:
        timings = {"encode_s": round(encode_s, 4), "generate_s": round(generate_s, 4), "batch_size": batch_size}
        self.write(job, "ok", timings=timings, **({"record": record} if record is not None else {}))

    def elsewhere(self, job, holder) -> None:
        """Another live run holds this job's claim and makes the same image: no manifest line (the
        holder writes it), a ``--json`` line and a count."""
        logger.info("%s: made by another run (%s)", job.output, holder)
        self.summary.elsewhere += 1
        if self.json_out is not None:
            entry = {"job_id": job.job_id, "status": "elsewhere", "path": str(self.out_dir / job.output),
                     "holder": str(holder)}  # fmt: skip
            self.json_out.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
            self.json_out.flush()

    def fail(self, job, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, EasyRefError) else f"{type(exc).__name__}: {exc}"
        logger.error("job %s (%s/%s seed %s) failed: %s", job.job_id, job.group.name, job.prompt_id, job.seed, message)
        self.write(job, "error", error=message)
        if self.fail_fast:
            self.stop.requested = True
