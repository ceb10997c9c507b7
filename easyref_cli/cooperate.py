"""Which of its jobs a run makes when other runs share its output folder. Torch-free.

Each job is claimed (:mod:`easyref_cli.claims`) just before its batch. Then:

* the claim is ours and the output does not exist (or ``--overwrite``): this run makes it;
* the output appeared since planning: skipped if it is this job's image, else the job fails (never
  clobbered);
* another live run holds the claim for the *same* job: this run waits for it at the end of its own
  work (refreshing its claims meanwhile) and then counts the image as made by that run — or makes
  it itself when that run died or gave up without it, so a run that exits 0 has every image;
* another live run holds the claim for *another* job (other settings, same file): the job fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

from easyref_cli.claims import Claims
from easyref_cli.errors import JobError
from easyref_cli.jobs import Job
from easyref_cli.plan import Plan
from easyref_cli.resume import Existing
from easyref_cli.runlog import RunLog

logger = logging.getLogger(__name__)

#: Seconds between two looks at the claims this run waits on.
POLL_S = 2.0
_MAKE, _WAIT, _DONE = "make", "wait", "done"


class Cooperation:
    """The claim rules for one run's jobs (see the module docstring)."""

    def __init__(self, plan: Plan, claims: Claims, log: RunLog, done: Callable[[int], None] = lambda n: None):
        self.plan, self.claims, self.log, self.done = plan, claims, log, done
        self.existing = Existing(plan)
        self.waiting: dict[str, Job] = {}

    def first(self, jobs: Sequence[Job]) -> Iterator[Job]:
        """The jobs this run makes, claimed one at a time as the caller asks for them; jobs another
        run is making are set aside for :meth:`poll`."""
        for job in jobs:
            if self.log.stop.requested:
                return
            outcome = self._claim(job, waited=False)
            if outcome == _MAKE:
                yield job
            elif outcome == _WAIT:
                self.waiting[job.job_id] = job
        if self.waiting:
            logger.info("waiting for %d image(s) another run is making in %s", len(self.waiting), self.plan.out_dir)

    def poll(self) -> list[Job]:
        """After a pause, the set-aside jobs this run must make after all (their holder is gone without
        them), claimed; the others are settled (made by the holder, or failed) or still waited for. The
        caller makes the returned jobs before polling again: a run never waits holding a claim."""
        time.sleep(POLL_S)
        self.claims.heartbeat()
        make = []
        for job_id, job in list(self.waiting.items()):
            if self.log.stop.requested:
                break
            outcome = self._claim(job, waited=True)
            if outcome != _WAIT:
                del self.waiting[job_id]
            if outcome == _MAKE:
                make.append(job)
        return make

    def _claim(self, job: Job, *, waited: bool) -> str:
        path = self.plan.output_path(job)
        holder = self.claims.acquire(job.job_id, job.output)
        if holder is not None:
            if holder.job_id in (job.job_id, "?"):  # the same image (or a claim being written): wait for it
                return _WAIT
            return self._fail(job, f"{path} is being made by another run ({holder}) with other settings")
        if path.exists() and (waited or not self.plan.overwrite):
            record = self.existing.record(path, fresh=True)
            self.claims.release(job.output)
            if not self.existing.is_ours(job, record):
                return self._fail(job, f"{path} was just written by another run with other settings")
            if waited:
                self.log.elsewhere(job, "another run sharing the output folder")
            else:
                self.log.skipped(job)
            self.done(1)
            return _DONE
        return _MAKE

    def _fail(self, job: Job, message: str) -> str:
        self.log.fail(job, JobError(f"{message}; not overwritten (use another -o folder or --name-template)"))
        self.done(1)
        return _DONE
