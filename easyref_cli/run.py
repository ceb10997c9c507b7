"""Run a :class:`~easyref_cli.plan.Plan`: numbered phases, one process or sharded across several.

:func:`run_plan` reads like a diffusers ``__call__``:

1. resolve models — build the tiny family if asked, hub ids → local paths, the device, the adapter
   (checked against the base UNet's config before minutes of encoding);
2. encode — every condition the pending jobs need, each once (:mod:`easyref_cli.conditions`);
3. release the encoder — peak memory is max(MLLM, SDXL), not the sum;
4. generate — SDXL only, in batches of jobs whose pipeline requests share a batch key; one CPU
   generator per image, so batching never changes pixels;
5. summary — the run log's counts (merged over processes by :mod:`easyref_cli.distributed`).

Finished outputs are skipped (resume) unless ``plan.overwrite``; a run with nothing to do loads no
model. A failing job is recorded and the run goes on (``fail_fast`` stops it). SIGINT/SIGTERM
finish the image in flight, flush the manifest and stop; a second signal aborts at once. Nothing
partial is ever written.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from easyref_cli import distributed, files
from easyref_cli.batching import AutoBatch, is_out_of_memory, memo_path
from easyref_cli.claims import Claims
from easyref_cli.cooperate import Cooperation
from easyref_cli.errors import EasyRefError, JobError, StorageError
from easyref_cli.jobs import Job, job_models
from easyref_cli.plan import Plan
from easyref_cli.records import extras_record, job_record, relative_references, shareable
from easyref_cli.resolve import ResolvedModels, resolve_models
from easyref_cli.resume import check_existing_outputs
from easyref_cli.runlog import RunLog, RunSummary, Stop, job_error
from easyref_cli.settings import pipeline_values

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How to run (never what to generate: nothing here changes pixels)."""

    cache_dir: Path | None = None  # condition cache; None disables it
    compile: bool = False
    progress: bool = True
    json_out: IO[str] | None = None


def run_plan(plan: Plan, options: RunOptions | None = None) -> RunSummary:
    """Run ``plan`` here, or this process's share of it under ``accelerate launch``.

    Returns the summary whose ``exit_code`` the command uses.

    Raises:
        UsageError: outputs exist that other settings made; the device or models are unusable.
    """
    options = options or RunOptions()
    start = time.perf_counter()
    check_existing_outputs(plan)  # every process, before anything is written
    summary = distributed.run(plan, partial(execute, options=options), progress=options.progress)
    summary.seconds = time.perf_counter() - start
    return summary


def execute(plan: Plan, manifest: Path, *, options: RunOptions, progress: bool) -> RunSummary:
    """One process's run of ``plan``: skips logged, then the phases; signals handled."""
    stop = Stop()
    pending = plan.pending()
    pending_ids = {job.job_id for job in pending}
    log = RunLog(manifest, plan.out_dir, total=len(plan.jobs), json_out=options.json_out,
                 fail_fast=plan.fail_fast, stop=stop)  # fmt: skip
    try:
        with log, _graceful_signals(stop), Claims(plan.out_dir) as claims:
            claims.remove_orphan_temps(job.output for job in plan.jobs)
            for job in plan.jobs:
                if job.job_id not in pending_ids:
                    log.skipped(job)
            if pending:
                if progress:  # the first progress line, before seconds of torch/diffusers imports
                    done = len(plan.jobs) - len(pending)
                    print(f"{len(pending)} image(s) to make ({done} already there); loading models…", file=sys.stderr,
                          flush=True)  # fmt: skip
                _phases(plan, pending, options, log, progress, claims)
    except KeyboardInterrupt:
        log.summary.interrupted = True
    except StorageError as exc:  # full or read-only storage: stop now, what is finished stays intact
        logger.error("%s", exc)
        log.summary.stopped = str(exc)
    if stop.signum is not None:
        log.summary.interrupted = True
    return log.summary


def _phases(plan: Plan, pending: list[Job], options: RunOptions, log: RunLog, progress: bool, claims: Claims) -> None:
    from easyref_cli.conditions import ConditionCache, EncodePhase, LazyEncoder, model_key

    # 1. resolve models
    models = resolve_models(plan)
    # 2. encode
    encoder_dtype = models.dtypes[1]
    encoder = LazyEncoder(models.mllm, models.checkpoint, device=models.device, dtype=encoder_dtype)
    try:
        key = model_key(models.mllm, models.checkpoint, encoder)
        conditions = EncodePhase(encoder, ConditionCache(options.cache_dir), key, log).run(pending, progress=progress)
    finally:
        # 3. release the encoder (and every MLLM output) before SDXL loads
        encoder.release()
    if not conditions.ready or log.stop.requested:
        return
    # 4. generate
    GeneratePhase(plan, models, options, log, progress, claims).run(conditions)
    # 5. summary: the log's counts, returned by execute()


# ----------------------------------------------------------------------------------------------
# 4. Generate
# ----------------------------------------------------------------------------------------------


def batches(jobs: Iterable[Job], key: Callable[[Job], Any], size: int | Callable[[Job], int]) -> Iterator[list[Job]]:
    """Consecutive jobs with the same ``key``, at most ``size`` at a time (a number, or a function of a
    batch's first job, asked when that job arrives: after the previous batch was made)."""
    limit = size if callable(size) else (lambda _job: size)
    batch: list[Job] = []
    cap = 0
    for job in jobs:
        if batch and key(job) != key(batch[0]):
            yield batch
            batch = []
        if not batch:
            cap = limit(job)
        batch.append(job)
        if len(batch) >= cap:  # full: made now, not when the next job (and its claim) arrives
            yield batch
            batch = []
    if batch:
        yield batch


class GeneratePhase:
    """SDXL with the adapter; each ready job's request built from its settings (the schema's
    ``pipeline`` fields), batched by the request's batch key, written with its record.

    Each job's output is claimed just before its batch (:mod:`easyref_cli.claims`): a job another
    live run holds is left to it (the same job) or fails (another job for the same file), and an
    output another run finished meanwhile is skipped (this job's) or fails (not this job's)."""

    def __init__(self, plan: Plan, models: ResolvedModels, options: RunOptions, log: RunLog, progress: bool,
                 claims: Claims):  # fmt: skip
        self.plan, self.models, self.options, self.log, self.progress = plan, models, options, log, progress
        self.claims = claims
        self.signer = None
        if plan.c2pa_cert is not None:
            from easyref_cli import credentials

            self.signer = credentials.load_signer(plan.c2pa_cert, plan.c2pa_key)

    def run(self, conditions) -> None:
        from tqdm.auto import tqdm

        from easyref_cli.model.pipeline import GenerationRequest

        pipe = self._load_pipeline()
        m = self.plan
        self.sizes = AutoBatch(
            fixed=None if m.batch_size == "auto" else int(m.batch_size), device=device_label(pipe.device),
            model=str(m.model_identity.get("base_model", "")), memo=memo_path(), torch_device=pipe.device,
            context=f"{_dtype_name(pipe.sdxl_dtype)} {pipe.attention.backend} offload={pipe.offload} "
            f"compile={pipe.compiled['enabled']}",
        )  # fmt: skip
        requests = {
            j.job_id: GenerationRequest(
                prompt=j.prompt,
                ref_embeds=conditions.of(j),
                **pipeline_values(j.settings),
                noise_index=j.index,
                noise_samples=j.settings.images_per_prompt,
                **_pending_inputs(j),  # the images are loaded when their batch is made
            )  # fmt: skip
            for j in conditions.ready
        }
        bar = tqdm(total=len(conditions.ready), desc="images", unit="img", disable=not self.progress, file=sys.stderr)
        self._steps = tqdm(total=0, desc="steps", unit="step", leave=False, disable=not self.progress,
                           file=sys.stderr, position=1)  # fmt: skip
        try:
            cooperation = Cooperation(self.plan, self.claims, self.log, bar.update)
            self._make(pipe, cooperation.first(conditions.ready), requests, conditions, bar)
            while cooperation.waiting and not self.log.stop.requested:  # images other runs are making
                self._make(pipe, cooperation.poll(), requests, conditions, bar)
        finally:
            self._steps.close()
            bar.close()

    def _make(self, pipe, jobs: Iterable[Job], requests: dict, conditions, bar) -> None:
        """Batches of ``jobs`` (each claimed; sizes from :class:`~easyref_cli.batching.AutoBatch`), their
        input images loaded (the requests hold placeholders until then: the batch key has the mode),
        generated and written, their claims released."""

        def key(job: Job):
            return requests[job.job_id].batch_key()

        for batch in batches(jobs, key, lambda job: self.sizes.size(key(job), requests[job.job_id])):
            if self.log.stop.requested:
                break
            try:
                ready, loaded = self._with_inputs(batch, [requests[j.job_id] for j in batch])
                if ready:
                    self._batch(pipe, ready, loaded, conditions, key(ready[0]))
            finally:
                for job in batch:
                    self.claims.release(job.output)
            bar.update(len(batch))

    def _with_inputs(self, batch: list[Job], requests: list) -> tuple[list[Job], list]:
        """The batch's requests with their control/init/mask images; a job whose file is broken fails alone."""
        from dataclasses import replace

        from easyref_cli.inputs import load_inputs

        ready, loaded = [], []
        for job, request in zip(batch, requests, strict=True):
            if job.inputs is not None:
                try:
                    request = replace(request, **load_inputs(job.inputs, job.settings))
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - a broken or huge input fails its job, the run goes on
                    self.log.fail(job, job_error(exc))
                    continue
            ready.append(job)
            loaded.append(request)
        return ready, loaded

    def _load_pipeline(self):
        from easyref_cli.env import package_versions
        from easyref_cli.model.pipeline import EasyRefPipeline

        m, plan = self.models, self.plan
        pipe = EasyRefPipeline.from_pretrained(
            m.base_model, m.mllm, m.checkpoint, device=plan.device, dtype=plan.dtype, attention=plan.attention,
            compile=self.options.compile, offload=plan.offload, vae=m.vae, base_config=m.base_config, loras=m.loras,
            controlnets=m.controlnets,
        )  # fmt: skip
        attention = pipe.attention
        self.run_record = {
            "adapter_sha256": m.checkpoint.sha256,
            "versions": package_versions(),
            "attention": {"backend": attention.backend, "requested": attention.requested, "reason": attention.reason},
            "device": str(pipe.device).split(":")[0],  # type only: records must not depend on which GPU/process
            "dtype": {"sdxl": _dtype_name(pipe.sdxl_dtype), "mllm": _dtype_name(pipe.encoder_dtype)},
            "compile": pipe.compiled,
        }
        return pipe

    def _on_step(self, step: int, total: int) -> None:
        if step == 1 or self._steps.total != total:
            self._steps.reset(total=total)  # per image, so the rate shown is this image's
        self._steps.n = step
        self._steps.refresh()
        self.claims.heartbeat()

    def _batch(self, pipe, batch: list[Job], requests: list, conditions, key) -> None:
        from easyref_cli.model.pipeline import NonFiniteImages

        self.sizes.before(key, requests[0])
        t0 = time.perf_counter()
        failure: EasyRefError | None = None
        try:
            images = pipe.generate(requests, step_callback=self._on_step)
        except KeyboardInterrupt:
            raise
        except NonFiniteImages as exc:  # keep the batch's healthy images
            images, failure = exc.images, exc
        except Exception as exc:  # noqa: BLE001 - OOM, anything: recorded per job, the run goes on
            if not (is_out_of_memory(exc) and len(batch) > 1):
                for job in batch:
                    self.log.fail(job, job_error(exc))
                return
            images = None  # out of memory: retried below, once the failed batch's tensors are free
        if images is None:
            self._retry_in_halves(pipe, batch, requests, conditions, key)
            return
        elapsed = time.perf_counter() - t0
        self.sizes.observe(key, requests[0], len(batch), elapsed)
        per_image = elapsed / len(batch)
        for job, image in zip(batch, images, strict=True):
            if image is None:
                self.log.fail(job, JobError(f"seed {job.seed}: {failure}"))
                continue
            self._write(job, image, conditions, per_image, len(batch))

    def _retry_in_halves(self, pipe, batch: list[Job], requests: list, conditions, key) -> None:
        """A batch ran out of memory: a smaller size from now on, and this batch in two halves (called
        outside the ``except`` block, so the failed batch's tensors are no longer referenced)."""
        from easyref_cli.conditions import free_memory

        logger.warning("a batch of %d ran out of memory; retrying in halves", len(batch))
        self.sizes.out_of_memory(key, requests[0], len(batch))
        free_memory()
        half = len(batch) // 2
        self._batch(pipe, batch[:half], requests[:half], conditions, key)
        self._batch(pipe, batch[half:], requests[half:], conditions, key)

    def _write(self, job: Job, image, conditions, per_image: float, batch_size: int) -> None:
        # The PNG record holds no wall-clock times, so the same job always gives the same bytes;
        # timings go to the manifest line, which also keeps the full record (absolute paths) whatever
        # the PNG carries (--metadata, --record-paths).
        record = job_record(job, self.plan.models.as_dict(), references=conditions.references[job.group.name])
        record.update(self.run_record)
        identity = job_models(self.plan.model_identity, job.inputs)  # the models by content, as the job id has them
        record.update(extras_record(self.plan.models, identity))  # --vae, --base-config, --lora, --controlnet
        record["model_identity"] = identity
        if self.plan.model_family is not None:
            record["model"] = self.plan.model_family  # so a replay finds the models without their paths
        shared = shareable(record) if self.plan.record_paths == "relative" else record
        try:
            files.write_png_atomic(
                self.plan.output_path(job), image, record=shared, metadata=self.plan.metadata,
                sign=self._signer(shared) if self.signer is not None else None,
            )  # fmt: skip
        except StorageError:
            raise  # the storage is full or read-only: every next image would fail too
        except EasyRefError as exc:
            self.log.fail(job, exc)
            return
        self.log.ok(job, encode_s=conditions.encode_seconds(job), generate_s=per_image, batch_size=batch_size,
                    record=record)  # fmt: skip

    def _signer(self, record: dict):
        """C2PA: created by easyref-cli, the references as ingredients by (shareable) name and hash."""
        from easyref_cli import credentials

        ingredients = relative_references(record)  # never absolute paths in a public manifest
        generator = f"easyref-cli {record.get('version')}"
        return lambda png: credentials.sign_png(
            png, self.signer, title=record["output"], generator=generator, ingredients=ingredients
        )


#: stands for an input image in a request until its batch loads it (``GeneratePhase._with_inputs``)
PENDING = object()


def _pending_inputs(job: Job) -> dict[str, Any]:
    """A request's input images as placeholders: the mode (and so the batch key) without the pixels."""
    if job.inputs is None:
        return {}
    controls, init, mask = job.inputs.mode()
    return {"control_images": (PENDING,) * controls, "init_image": PENDING if init else None,
            "mask_image": PENDING if mask else None}  # fmt: skip


def device_label(device) -> str:
    """What batch sizes are remembered for: the GPU model, or the CPU thread count."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return f"{kind}:{torch.get_num_threads()}"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextmanager
def _graceful_signals(stop: Stop) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, _frame):
        if stop.requested:  # second signal: abort now (the in-flight image is discarded)
            raise KeyboardInterrupt
        stop.requested, stop.signum = True, signum
        logger.warning("stopping after the current image (signal again to abort now)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
