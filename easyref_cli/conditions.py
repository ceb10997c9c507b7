"""Reference conditions: the on-disk cache, and the encode phase of a run.

The encode phase computes every condition the pending jobs need, each (group, caption,
instruction) once: from the cache, else with the MLLM, which is loaded on the first miss only
(a fully cached run loads no MLLM) and released by the caller before SDXL loads. It returns one
typed :class:`Conditions` object.

Cache entries are keyed by what determines the tokens: group content hash, instruction, caption,
the MLLM folder's fingerprint, the adapter's sha256, the final-layer mode and the encoder dtype,
and written atomically, so a shared ``--cache-dir`` is safe across processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from easyref_cli import files
from easyref_cli.env import package_versions
from easyref_cli.errors import InputError, ModelError
from easyref_cli.jobs import Job
from easyref_cli.model.pipeline import RefEmbeds
from easyref_cli.records import reference_entries
from easyref_cli.runlog import RunLog, job_error

logger = logging.getLogger(__name__)

#: Bump when the encoder's computation changes, so old cache entries are never served.
CONDITION_CACHE_VERSION = 1
#: In the condition cache folder: checkpoint sha256s by real path, size, mtime and inode.
HASH_MEMO = "file-hashes.json"
#: (group name, caption, instruction, exif orientation): what one condition depends on within a run.
ConditionId = tuple[str, str, str, str]


def condition_id(job: Job) -> ConditionId:
    return (job.group.name, job.caption, job.settings.instruction, job.settings.exif_orientation)


def condition_key(**fields: str) -> str:
    payload = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ConditionCache:
    """``root/<key[:2]>/<key>.safetensors`` holding one ``tokens`` tensor. ``root=None`` disables it."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if self.root is None:
            return None
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        from safetensors.torch import load_file

        try:
            tokens = load_file(str(path))["tokens"]
        except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss, not a failure
            logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return tokens

    def put(self, key: str, tokens: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
        if self.root is None:
            return
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # unique across hosts sharing the folder
        try:
            save_file({"tokens": tokens.detach().cpu().contiguous()}, str(tmp), metadata=metadata or {})
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not write cache entry %s (%s)", path, exc)
        finally:
            tmp.unlink(missing_ok=True)


@dataclass
class Conditions:
    """What the encode phase gives the generate phase: each job's reference tokens, how long they
    took, each group's reference entries (path + sha256, for the records), and the jobs that are
    ready (their condition exists; the others failed)."""

    embeds: dict[ConditionId, RefEmbeds] = field(default_factory=dict)
    seconds: dict[ConditionId, float] = field(default_factory=dict)
    references: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    ready: list[Job] = field(default_factory=list)

    def of(self, job: Job) -> RefEmbeds:
        return self.embeds[condition_id(job)]

    def encode_seconds(self, job: Job) -> float:
        return self.seconds.get(condition_id(job), 0.0)


class LazyEncoder:
    """The reference encoder, loaded on first use; :meth:`release` frees it for real."""

    def __init__(self, mllm: Path, checkpoint, *, device: str, dtype: torch.dtype, bidirectional_final: bool = False):
        self.mllm, self.checkpoint = mllm, checkpoint
        self.device, self.dtype, self.bidirectional_final = device, dtype, bidirectional_final
        self._encoder = None

    @property
    def final_mode(self) -> str:
        """How the final MLLM layer runs: part of every cache key."""
        return "bidirectional" if self.bidirectional_final else "causal"

    def get(self):
        if self._encoder is None:
            from easyref_cli.model.encoder import ReferenceEncoder

            self._encoder = ReferenceEncoder.from_pretrained(
                self.mllm, self.checkpoint, device=self.device, dtype=self.dtype,
                bidirectional_final=self.bidirectional_final,
            )  # fmt: skip
        return self._encoder

    def release(self) -> None:
        self._encoder = None
        free_memory()


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_key(mllm: Path, checkpoint, encoder: LazyEncoder) -> dict[str, Any]:
    """The model part of every cache key."""
    from easyref_cli.model.hub import folder_fingerprint

    return {
        "version": CONDITION_CACHE_VERSION,
        "mllm": folder_fingerprint(mllm),
        "adapter": checkpoint.sha256,
        "final": encoder.final_mode,
        "dtype": str(encoder.dtype),
        "device_type": str(encoder.device).split(":")[0],
        "transformers": package_versions().get("transformers", "?"),
    }


@dataclass
class _Group:
    """One group's encoding state: its content hash, images and prefix states, loaded lazily."""

    group: files.Group
    hash: str
    images: dict[str, list] = field(default_factory=dict)
    prefixes: dict[tuple[str, str], Any] = field(default_factory=dict)


class EncodePhase:
    """Every condition the jobs need, each once: from the cache, else prefix-reusing encodes."""

    def __init__(self, encoder: LazyEncoder, cache: ConditionCache, key: dict[str, Any], log: RunLog):
        self.encoder, self.cache, self.key, self.log = encoder, cache, key, log
        self.conditions = Conditions()
        self._uncond: dict[str, torch.Tensor] = {}

    def run(self, jobs: list[Job], *, progress: bool) -> Conditions:
        from tqdm.auto import tqdm

        by_group: dict[str, list[Job]] = {}
        for job in jobs:
            by_group.setdefault(job.group.name, []).append(job)
        bar = tqdm(total=len(by_group), desc="encoding groups", unit="group", disable=not progress, file=sys.stderr)
        try:
            for group_jobs in by_group.values():
                if self.log.stop.requested:
                    break
                self._encode_group(group_jobs)
                bar.update(1)
        finally:
            bar.close()
        logger.info("condition cache: %d hits, %d misses", self.cache.hits, self.cache.misses)
        return self.conditions

    def _encode_group(self, jobs: list[Job]) -> None:
        group = jobs[0].group
        try:
            refs = reference_entries(group)
        except InputError as exc:
            for job in jobs:
                self.log.fail(job, exc)
            return
        self.conditions.references[group.name] = refs
        state = _Group(group, files.group_content_hash(group, [r["sha256"] for r in refs]))
        for job in jobs:
            if self.log.stop.requested:
                break
            try:
                self._encode_job(job, state)
            except ModelError:
                raise  # the MLLM/adapter itself is unusable: a usage-level error (exit 2), not per job
            except InputError as exc:  # the group's images are unusable: fail its remaining jobs
                done = {j.job_id for j in self.conditions.ready}
                for other in jobs:
                    if other.job_id not in done:
                        self.log.fail(other, exc)
                break
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - OOM and the like: this job fails, the run goes on
                self.log.fail(job, job_error(exc))

    def _encode_job(self, job: Job, state: _Group) -> None:
        cid = condition_id(job)
        if cid not in self.conditions.embeds:
            t0 = time.perf_counter()
            instruction, exif = job.settings.instruction, job.settings.exif_orientation
            extra = {} if exif == "apply" else {"exif": exif}  # entries made before the option keep their keys
            key = condition_key(
                kind="cond", group=state.hash, caption=job.caption, instruction=instruction, **extra, **self.key
            )
            cond = self.cache.get(key)
            if cond is None:
                cond = self._encode_fresh(job, state)
                self.cache.put(key, cond, {"kind": "cond", "group": state.group.name, "caption": job.caption})
            self.conditions.embeds[cid] = RefEmbeds(cond=cond, uncond=self._uncond_for(instruction))
            self.conditions.seconds[cid] = time.perf_counter() - t0
        self.conditions.ready.append(job)

    def _encode_fresh(self, job: Job, state: _Group) -> torch.Tensor:
        """The MLLM: the group's prefix once per (instruction, EXIF handling), then this caption."""
        instruction, exif = job.settings.instruction, job.settings.exif_orientation
        if exif not in state.images:  # InputError names the file
            state.images[exif] = files.load_group_images(state.group, exif_orientation=exif == "apply")
        if (instruction, exif) not in state.prefixes:
            state.prefixes[instruction, exif] = self.encoder.get().encode_prefix(state.images[exif], instruction)
        return self.encoder.get().encode_caption(state.prefixes[instruction, exif], job.caption)

    def _uncond_for(self, instruction: str) -> torch.Tensor:
        if instruction not in self._uncond:
            key = condition_key(kind="uncond", instruction=instruction, **self.key)
            tokens = self.cache.get(key)
            if tokens is None:
                tokens = self.encoder.get().encode_uncond(instruction)
                self.cache.put(key, tokens, {"kind": "uncond", "instruction": instruction})
            self._uncond[instruction] = tokens
        return self._uncond[instruction]
