"""Execute a :class:`~easyref_cli.plan.Plan`: encode phase, generate phase, per-job error policy.

Data flows one way: plan → encode → generate → write.

* Finished outputs are skipped (resume) unless ``plan.overwrite``; a run with nothing left to do
  loads no model at all.
* Phase 1 encodes every condition the pending jobs need — each (group, caption, instruction)
  once — then releases the MLLM, so peak memory is max(MLLM, SDXL), not the sum.
* Phase 2 generates in batches of jobs that share size/steps/guidance/scale/scheduler; each image
  has its own CPU generator, so batching never changes pixels.
* A job that fails (unreadable reference, NaNs, out of memory) is recorded in the manifest and the
  run goes on (``fail_fast`` stops it). SIGINT/SIGTERM finish the image in flight, flush the
  manifest and stop; a second signal aborts at once. Nothing partial is ever written.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from easyref_cli import __version__, files
from easyref_cli.errors import EasyRefError, InputError, JobError, ModelError, UsageError
from easyref_cli.plan import Job, Plan, job_record, reference_entries

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    total: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    worker: bool = False  # a non-main process of a distributed run: the main one reports for all

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.worker:  # a non-zero worker exit would make the launcher kill the others mid-run
            return 0
        return 1 if self.failed else 0

    def line(self) -> str:
        rate = self.ok / self.seconds if self.seconds > 0 and self.ok else 0.0
        text = f"{self.ok} done, {self.skipped} skipped, {self.failed} failed in {self.seconds:.1f}s ({rate:.2f} images/s)"
        return text + (" — interrupted; rerun the same command to finish" if self.interrupted else "")


class _Stop:
    """Set by SIGINT/SIGTERM: the runner stops after the image in flight."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None


@contextmanager
def _graceful_signals(stop: _Stop) -> Iterator[None]:
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


def _batch_key(job: Job) -> tuple:
    """What jobs in one batch share (see ``GenerationRequest.batch_key``) plus the scheduler."""
    return (job.steps, job.guidance, job.scale, job.width, job.height, bool(job.negative_prompt), job.scheduler)


def _batches(jobs: Sequence[Job], size: int) -> Iterator[list[Job]]:
    """Consecutive jobs sharing everything a batch must share, at most ``size`` at a time."""
    batch: list[Job] = []
    for job in jobs:
        if batch and (len(batch) >= size or _batch_key(job) != _batch_key(batch[0])):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


#: Bump when the encoder's computation changes, so old cache entries are never served.
CONDITION_CACHE_VERSION = 1
#: In the condition cache folder: checkpoint sha256s by real path, size, mtime and inode.
HASH_MEMO = "file-hashes.json"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"easyref-cli": __version__}
    for name in ("torch", "diffusers", "transformers", "accelerate", "xformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class ResolvedModels:
    base_model: Path
    mllm: Path
    adapter: Path


def resolve_models(plan: Plan) -> ResolvedModels:
    """Model ids → local paths (Hugging Face cache for hub ids). Raises ModelError with guidance."""
    from easyref_cli.model import hub

    return ResolvedModels(
        base_model=hub.resolve_folder(plan.base_model, "--base-model"),
        mllm=hub.resolve_folder(plan.mllm, "--mllm"),
        adapter=hub.resolve_checkpoint(plan.adapter),
    )


def check_existing_outputs(plan: Plan) -> None:
    """Resume skips an output only if it is *this* job's image: a file made with other settings (or
    not by easyref) under the same name is a usage error, never silently kept or clobbered."""
    if plan.overwrite:
        return
    clashes = []
    for job in plan.jobs:
        path = plan.output_path(job)
        if not path.exists():
            continue
        try:
            found = files.read_png_record(path).get("job_id")
        except InputError:
            found = None
        if found != job.job_id:
            clashes.append(str(path))
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" … and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise UsageError(
            f"{len(clashes)} output file(s) already exist but were made with other settings (or not by "
            f"easyref): {shown}. Use another -o folder or --name-template, or --overwrite to replace them."
        )


def check_device(device: str | None) -> None:
    """A device torch can use here, or a UsageError (instead of a traceback after loading models)."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda, cuda:N, mps…") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (see `easyref doctor`)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")


def check_adapter_matches(base_model: Path, checkpoint) -> None:
    """Validate the adapter against the base UNet's *config* (a weightless skeleton on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(str(base_model), subfolder="unet")
        with torch.device("meta"):
            skeleton = UNet2DConditionModel.from_config(config)
    except Exception as exc:  # noqa: BLE001 - missing/odd config: the full load reports it properly later
        logger.debug("adapter pre-check skipped: %s", exc)
        return
    checkpoint.check_unet(skeleton)


def load_pipeline(plan: Plan, models: ResolvedModels, checkpoint, options: "RunOptions"):
    """Phase 2's model: SDXL with the adapter installed and LoRA merged (the MLLM is not loaded)."""
    from easyref_cli.model.pipeline import EasyRefPipeline

    return EasyRefPipeline.from_pretrained(
        models.base_model,
        models.mllm,
        checkpoint,
        device=plan.device,
        dtype=plan.dtype,
        attention=plan.attention,
        compile=options.compile,
        offload=options.offload,
    )


def load_encoder(plan: Plan, models: ResolvedModels, checkpoint):
    """Phase 1's model: the reference encoder (Qwen2-VL trunk + final layer + projector)."""
    from easyref_cli.model.encoder import ReferenceEncoder
    from easyref_cli.model.pipeline import default_device, resolve_dtypes

    device = plan.device or default_device()
    return ReferenceEncoder.from_pretrained(models.mllm, checkpoint, device=device, dtype=resolve_dtypes(plan.dtype, device)[1])


@dataclass(frozen=True)
class RunOptions:
    """How to run (never what to generate: nothing here changes pixels)."""

    cache_dir: Path | None = None  # condition cache; None disables it
    compile: bool = False
    offload: str = "none"


class Runner:
    def __init__(
        self,
        plan: Plan,
        *,
        progress: bool = True,
        json_out: IO[str] | None = None,
        options: RunOptions | None = None,
    ):
        self.plan = plan
        self.progress = progress
        self.json_out = json_out
        self.options = options or RunOptions()
        self.summary = RunSummary(total=len(plan.jobs))
        self.stop = _Stop()
        self._manifest: files.ManifestWriter | None = None

    # ---- manifest ------------------------------------------------------------------------------

    def _log(self, job: Job, status: str, **extra: Any) -> None:
        entry = {
            "job_id": job.job_id,
            "status": status,
            "path": str(self.plan.output_path(job)),
            "group": job.group.name,
            "prompt_id": job.prompt_id,
            "seed": job.seed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        assert self._manifest is not None
        self._manifest.write(entry)
        if self.json_out is not None:
            self.json_out.write(json.dumps(entry, ensure_ascii=False, sort_keys=True, default=str) + "\n")
            self.json_out.flush()
        if status == "ok":
            self.summary.ok += 1
        elif status == "skipped":
            self.summary.skipped += 1
        elif status == "error":
            self.summary.failed += 1
            self.summary.errors.append(f"{job.group.name}/{job.prompt_id} seed {job.seed}: {extra.get('error')}")

    def _fail(self, job: Job, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, EasyRefError) else f"{type(exc).__name__}: {exc}"
        logger.error("job %s (%s/%s seed %s) failed: %s", job.job_id, job.group.name, job.prompt_id, job.seed, message)
        self._log(job, "error", error=message)
        if self.plan.fail_fast:
            self.stop.requested = True

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        from easyref_cli import distributed

        start = time.perf_counter()
        full_plan = self.plan
        procs = distributed.current(self.plan.device)
        try:
            check_existing_outputs(self.plan)  # every process, before anything is written
            if procs.count == 1:
                distributed.merge_shards(self.plan.out_dir)  # left behind by a crashed distributed run
                self._run(self.plan, self.plan.out_dir / files.MANIFEST_NAME)
                return self.summary
            # Scale-out: whole groups of the *pending* jobs per process (balanced on what is left to do),
            # a manifest shard each, merged by the main process; the main one also logs the skips.
            # Every process reads the filesystem before the first barrier, i.e. before anyone writes.
            pending = self.plan.pending()
            pending_ids = {j.job_id for j in pending}
            mine = {j.job_id for j in distributed.shard_jobs(pending, procs.count, procs.index)}
            jobs = [j for j in self.plan.jobs if j.job_id in mine or (procs.is_main and j.job_id not in pending_ids)]
            plan = replace(self.plan, jobs=tuple(jobs), device=procs.device)
            self.progress = self.progress and procs.is_main
            if procs.is_main:
                distributed.merge_shards(plan.out_dir)  # left behind by a crashed run
            procs.wait()
            self._run(plan, distributed.shard_path(plan.out_dir, procs.index))
            procs.wait()
            if procs.is_main:
                merged = distributed.merge_shards(plan.out_dir, [j.job_id for j in full_plan.jobs])
                self._summarise(merged, total=len(full_plan.jobs))
            else:
                self.summary.worker = True
            return self.summary
        finally:
            procs.close()
            self.summary.seconds = time.perf_counter() - start

    def _summarise(self, entries: list[dict], total: int) -> None:
        """The main process's summary covers every process's jobs (from the merged shards)."""
        summary = RunSummary(total=total, interrupted=self.summary.interrupted)
        for entry in entries:
            status = entry.get("status")
            if status == "ok":
                summary.ok += 1
            elif status == "skipped":
                summary.skipped += 1
            elif status == "error":
                summary.failed += 1
                summary.errors.append(f"{entry.get('group')}/{entry.get('prompt_id')} seed {entry.get('seed')}: {entry.get('error')}")
        self.summary = summary

    def _run(self, plan: Plan, manifest_path: Path) -> None:
        pending = plan.pending()
        pending_ids = {j.job_id for j in pending}
        self.plan = plan
        try:
            with files.ManifestWriter(manifest_path) as manifest, _graceful_signals(self.stop):
                self._manifest = manifest
                for job in plan.jobs:
                    if job.job_id not in pending_ids:
                        self._log(job, "skipped", reason="output exists")
                if pending:
                    self._run_pending(pending)
        except KeyboardInterrupt:
            self.summary.interrupted = True
        finally:
            self._manifest = None
        if self.stop.requested and self.stop.signum is not None:
            self.summary.interrupted = True

    def _run_pending(self, pending: list[Job]) -> None:
        from tqdm.auto import tqdm

        from easyref_cli.model.checkpoint import load_checkpoint

        check_device(self.plan.device)
        models = resolve_models(self.plan)
        # the adapter's sha256 keys the condition cache; remembered beside it so a multi-GB
        # checkpoint is hashed once, not on every (resumed) run
        memo = self.options.cache_dir / HASH_MEMO if self.options.cache_dir is not None else None
        checkpoint = load_checkpoint(models.adapter, hash_memo=memo)
        check_adapter_matches(models.base_model, checkpoint)  # before minutes of encoding, not after
        # Phase 1: every condition the pending jobs need (cache, else the MLLM; released afterwards).
        conditions, encode_seconds, references, ready = self._encode_phase(pending, models, checkpoint, tqdm)
        if not ready or self.stop.requested:
            return
        # Phase 2: SDXL only.
        pipe = load_pipeline(self.plan, models, checkpoint, self.options)
        base_record = {
            "adapter_sha256": checkpoint.sha256,
            "versions": package_versions(),
            "attention": {"backend": pipe.attention.backend, "requested": pipe.attention.requested, "reason": pipe.attention.reason},
            "device": str(pipe.device).split(":")[0],  # type only: records must not depend on which GPU/process
            "dtype": {"sdxl": str(pipe.sdxl_dtype).removeprefix("torch."), "mllm": str(pipe.encoder_dtype).removeprefix("torch.")},
            "compile": pipe.compiled,
        }
        bar = tqdm(total=len(ready), desc="images", unit="img", disable=not self.progress, file=sys.stderr)
        step_bar = tqdm(total=0, desc="steps", unit="step", leave=False, disable=not self.progress, file=sys.stderr, position=1)
        try:
            for batch in _batches(ready, self.plan.batch_size):
                if self.stop.requested:
                    break
                self._generate_batch(pipe, batch, conditions, encode_seconds, references, base_record, step_bar)
                bar.update(len(batch))
        finally:
            step_bar.close()
            bar.close()

    def _encode_phase(self, pending: list[Job], models: ResolvedModels, checkpoint, tqdm):
        """Each (group, caption, instruction) once: from the condition cache, else prefix-reusing encodes.

        The MLLM is loaded only on the first cache miss and released before returning.
        """
        from easyref_cli.conditions import ConditionCache, condition_key
        from easyref_cli.model.hub import folder_fingerprint
        from easyref_cli.model.pipeline import RefEmbeds, default_device, resolve_dtypes

        plan = self.plan
        device = plan.device or default_device()
        encoder_dtype = resolve_dtypes(plan.dtype, device)[1]
        cache = ConditionCache(self.options.cache_dir)
        model_key = {
            "version": CONDITION_CACHE_VERSION,
            "mllm": folder_fingerprint(models.mllm),
            "adapter": checkpoint.sha256,
            "final": "causal",  # load_encoder builds the default (causal) encoder
            "dtype": str(encoder_dtype),
            "device_type": str(device).split(":")[0],
            "transformers": package_versions().get("transformers", "?"),
        }
        encoder = None

        def get_encoder():
            nonlocal encoder
            if encoder is None:
                encoder = load_encoder(plan, models, checkpoint)
            return encoder

        uncond: dict[str, Any] = {}

        def uncond_for(instruction: str):
            if instruction not in uncond:
                key = condition_key(kind="uncond", instruction=instruction, **model_key)
                tokens = cache.get(key)
                if tokens is None:
                    tokens = get_encoder().encode_uncond(instruction)
                    cache.put(key, tokens, {"kind": "uncond", "instruction": instruction})
                uncond[instruction] = tokens
            return uncond[instruction]

        conditions: dict[tuple, Any] = {}
        encode_seconds: dict[tuple, float] = {}
        references: dict[str, list[dict[str, str]]] = {}
        ready: list[Job] = []
        by_group: dict[str, list[Job]] = {}
        for job in pending:
            by_group.setdefault(job.group.name, []).append(job)
        bar = tqdm(total=len(by_group), desc="encoding groups", unit="group", disable=not self.progress, file=sys.stderr)
        try:
            for name, jobs in by_group.items():
                if self.stop.requested:
                    break
                group = jobs[0].group
                try:
                    references[name] = reference_entries(group)
                except InputError as exc:
                    for job in jobs:
                        self._fail(job, exc)
                    continue
                group_hash = files.group_content_hash(group, [r["sha256"] for r in references[name]])
                images, prefixes = None, {}
                for job in jobs:
                    if self.stop.requested:
                        break
                    key = (name, job.caption, job.instruction)
                    if key in conditions:
                        ready.append(job)
                        continue
                    try:
                        t0 = time.perf_counter()
                        disk_key = condition_key(kind="cond", group=group_hash, caption=job.caption, instruction=job.instruction, **model_key)
                        cond = cache.get(disk_key)
                        if cond is None:
                            if images is None:
                                images = files.load_group_images(group)  # InputError names the file
                            if job.instruction not in prefixes:
                                prefixes[job.instruction] = get_encoder().encode_prefix(images, job.instruction)
                            cond = get_encoder().encode_caption(prefixes[job.instruction], job.caption)
                            cache.put(disk_key, cond, {"kind": "cond", "group": name, "caption": job.caption})
                        conditions[key] = RefEmbeds(cond=cond, uncond=uncond_for(job.instruction))
                        encode_seconds[key] = time.perf_counter() - t0
                        ready.append(job)
                    except ModelError:
                        raise  # the MLLM/adapter itself is unusable: a usage-level error (exit 2), not per job
                    except InputError as exc:  # the group's images are unusable: fail its remaining jobs
                        done = {j.job_id for j in ready}
                        for other in jobs:
                            if other.job_id not in done:
                                self._fail(other, exc)
                        break
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:  # noqa: BLE001 - OOM and the like: this job fails, the run goes on
                        self._fail(job, _job_error(exc))
                bar.update(1)
        finally:
            bar.close()
            prefixes = images = None  # noqa: F841 - drop every reference to MLLM outputs ...
            encoder = None  # ... and to the MLLM, so its memory really is released before SDXL loads
            _free_memory()
        logger.info("condition cache: %d hits, %d misses", cache.hits, cache.misses)
        return conditions, encode_seconds, references, ready

    def _generate_batch(self, pipe, batch, conditions, encode_seconds, references, base_record, step_bar) -> None:
        from easyref_cli.model.pipeline import GenerationRequest

        requests = [
            GenerationRequest(
                prompt=j.prompt,
                ref_embeds=conditions[(j.group.name, j.caption, j.instruction)],
                seed=j.seed,
                negative_prompt=j.negative_prompt,
                steps=j.steps,
                guidance=j.guidance,
                scale=j.scale,
                width=j.width,
                height=j.height,
            )
            for j in batch
        ]

        def on_step(step: int, total: int) -> None:
            if step == 1 or step_bar.total != total:
                step_bar.reset(total=total)  # per image, so the rate shown is this image's
            step_bar.n = step
            step_bar.refresh()

        from easyref_cli.model.pipeline import NonFiniteImages

        t0 = time.perf_counter()
        failure: EasyRefError | None = None
        try:
            pipe.set_scheduler(batch[0].scheduler)
            images = pipe.generate(requests, step_callback=on_step)
        except KeyboardInterrupt:
            raise
        except NonFiniteImages as exc:  # keep the batch's healthy images
            images, failure = exc.images, exc
        except Exception as exc:  # noqa: BLE001 - OOM, anything: recorded per job, the run goes on
            for job in batch:
                self._fail(job, _job_error(exc))
            return
        per_image = (time.perf_counter() - t0) / len(batch)
        for job, image in zip(batch, images, strict=True):
            if image is None:
                self._fail(job, JobError(f"seed {job.seed}: {failure}"))
                continue
            # The PNG record holds no wall-clock times, so the same job always gives the same bytes;
            # timings go to the manifest line.
            record = job_record(job, self.plan, references=references[job.group.name])
            record.update(base_record)
            try:
                files.write_png_atomic(self.plan.output_path(job), image, record=record)
            except EasyRefError as exc:
                self._fail(job, exc)
                continue
            self._log(
                job,
                "ok",
                timings={
                    "encode_s": round(encode_seconds.get((job.group.name, job.caption, job.instruction), 0.0), 4),
                    "generate_s": round(per_image, 4),
                    "batch_size": len(batch),
                },
            )


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _job_error(exc: BaseException) -> JobError:
    if isinstance(exc, JobError):
        return exc
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "out of memory" in text.lower():
        return JobError(f"out of memory: {text} (try --batch-size 1, a smaller size or --dtype float16)")
    return JobError(f"{type(exc).__name__}: {text}")


def run_plan(plan: Plan, **kwargs: Any) -> RunSummary:  # noqa: D103
    """Run ``plan`` (see :class:`Runner`); returns a summary whose ``exit_code`` the CLI uses."""
    return Runner(plan, **kwargs).run()
