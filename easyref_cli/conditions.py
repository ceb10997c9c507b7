"""Reference conditions: the on-disk cache, and the encode phase of a run.

The encode phase computes every condition the pending jobs need, each (group, caption,
instruction) once: from the cache, else with the MLLM, which is loaded on the first miss only
(a fully cached run loads no MLLM) and released by the caller before SDXL loads. It returns one
typed :class:`Conditions` object.

Cache entries are keyed by what determines the tokens: group content hash, instruction, caption,
the MLLM folder's fingerprint, the adapter's sha256, the final-layer mode and the encoder dtype,
and written atomically, so a shared ``--cache-dir`` is safe across processes. Each entry records the
sha256, shape and dtype of its tokens and is served only when they check out; a cache folder that
cannot be used (a file, read-only, not ours) is skipped with one warning, never failing the run.
"""

from __future__ import annotations

import contextlib
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
#: Safetensors metadata of a verified entry: the format marker (entries of format 1, before
#: checksums, have none), the sha256 of the tokens' raw bytes, their shape (JSON list) and dtype.
CACHE_FORMAT_KEY = "easyref_cache_format"
CACHE_FORMAT = "2"
CACHE_SHA256_KEY = "tokens_sha256"
CACHE_SHAPE_KEY = "tokens_shape"
CACHE_DTYPE_KEY = "tokens_dtype"
#: Condition tokens are ``(num_tokens, cross_attention_dim)``.
TOKENS_NDIM = 2
#: (group name, caption, instruction, exif orientation): what one condition depends on within a run.
ConditionId = tuple[str, str, str, str]


def condition_id(job: Job) -> ConditionId:
    return (job.group.name, job.caption, job.settings.instruction, job.settings.exif_orientation)


def condition_key(**fields: str) -> str:
    payload = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CacheEntryError(Exception):
    """Why one cache entry cannot be served (internal: it becomes a miss)."""


class _LegacyEntry(CacheEntryError):
    """An entry written before entries carried a checksum."""


def tensor_sha256(tokens: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (C order, the bytes safetensors stores)."""
    flat = tokens.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def entry_metadata(tokens: torch.Tensor) -> dict[str, str]:
    """The metadata that makes an entry verifiable: format marker, sha256, shape and dtype."""
    return {
        CACHE_FORMAT_KEY: CACHE_FORMAT,
        CACHE_SHA256_KEY: tensor_sha256(tokens),
        CACHE_SHAPE_KEY: json.dumps(list(tokens.shape)),
        CACHE_DTYPE_KEY: _dtype_name(tokens.dtype),
    }


def verify_entry(data: bytes, expect_shape: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """The ``tokens`` of one cache file's bytes, or :class:`CacheEntryError` saying why they cannot
    be trusted: not safetensors, no checksum (an older version's entry: :class:`_LegacyEntry`), no
    ``tokens``, shape or dtype other than recorded, a shape other than ``expect_shape`` (``None``
    entries match any size; without it: any ``TOKENS_NDIM``-D shape), non-finite values, or bytes
    whose sha256 is not the recorded one (a flipped bit)."""
    from safetensors.torch import load

    if len(data) < 8:
        raise CacheEntryError("truncated file")
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size]) if size <= len(data) - 8 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise CacheEntryError("not a safetensors file")
    meta = header.get("__metadata__") or {}
    marker = meta.get(CACHE_FORMAT_KEY) if isinstance(meta, dict) else None
    if marker is None:
        raise _LegacyEntry("written by an older easyref-cli, without a checksum")
    if marker != CACHE_FORMAT:
        raise CacheEntryError(f"unknown entry format {marker!r}")
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CacheEntryError(f"unreadable ({exc})") from None
    if "tokens" not in tensors:
        raise CacheEntryError("no 'tokens' tensor")
    tokens = tensors["tokens"]
    shape = list(tokens.shape)
    try:
        recorded = json.loads(meta.get(CACHE_SHAPE_KEY, "null"))
    except (TypeError, ValueError):
        recorded = None
    if shape != recorded:
        raise CacheEntryError(f"shape {shape} is not the recorded {recorded}")
    if _dtype_name(tokens.dtype) != meta.get(CACHE_DTYPE_KEY):
        raise CacheEntryError(f"dtype {_dtype_name(tokens.dtype)} is not the recorded {meta.get(CACHE_DTYPE_KEY)}")
    if expect_shape is None:
        if tokens.ndim != TOKENS_NDIM:
            raise CacheEntryError(f"shape {shape}: condition tokens are {TOKENS_NDIM}-D (num_tokens, dim)")
    elif len(shape) != len(expect_shape) or any(
        e is not None and e != n for e, n in zip(expect_shape, shape, strict=True)
    ):
        want = [e if e is not None else "*" for e in expect_shape]
        raise CacheEntryError(f"shape {shape}, but this model's condition tokens are {want}")
    if tokens.is_floating_point() and not bool(torch.isfinite(tokens).all()):
        raise CacheEntryError("non-finite values (NaN or inf)")
    if tensor_sha256(tokens) != meta.get(CACHE_SHA256_KEY):
        raise CacheEntryError("checksum mismatch: the file is damaged")
    return tokens


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class ConditionCache:
    """``root/<key[:2]>/<key>.safetensors`` holding one ``tokens`` tensor. ``root=None`` disables it.

    Entries are verified: each records the sha256, shape and dtype of its tokens (see
    :func:`entry_metadata`), and one that does not match them, the expected shape or finite values
    (:func:`verify_entry`) is a miss, warned about once and overwritten by the caller's next
    :meth:`put`. Entries of older versions (no checksum) are misses too, re-encoded once.

    The cache never fails a run: a root that is not a folder (or under a file), or an ``OSError``
    reading an entry, turns it off (``usable``); an ``OSError`` writing stops the writes
    (``writable``) while verified entries are still read. Either is one warning per instance.
    """

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0
        self.usable = self.root is not None  # False: get and put do nothing
        self.writable = self.usable  # False: put does nothing, get still reads
        self._warned = False  # the one cache-level warning
        self._reported: set[Path] = set()  # entries already warned about
        self._legacy = 0
        if self.root is not None:
            self._check_root(self.root)

    def _check_root(self, root: Path) -> None:
        """Turn the cache off when ``root`` (or the nearest existing folder above it) is not a folder."""
        try:
            existing = next((p for p in (root, *root.parents) if p.exists()), None)
            if existing is not None and not existing.is_dir():
                where = "it is" if existing == root else f"{existing} is"
                self._disable(f"{where} a file, not a folder")
        except OSError as exc:
            self._disable(_reason(exc))

    def _warn_once(self, message: str, *args: Any) -> None:
        if self._warned:
            logger.debug(message, *args)
        else:
            self._warned = True
            logger.warning(message, *args)

    def _disable(self, reason: str) -> None:
        self.usable = self.writable = False
        self._warn_once("condition cache %s unusable (%s): running without it", self.root, reason)

    def _stop_writing(self, reason: str) -> None:
        self.writable = False
        self._warn_once(
            "condition cache %s unusable for writing (%s): running without storing new conditions in it",
            self.root,
            reason,
        )

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, *, expect_shape: tuple[int | None, ...] | None = None) -> torch.Tensor | None:
        """The verified tokens stored under ``key``, or ``None`` (a miss). ``expect_shape``: the
        shape the caller needs (``None`` entries match any size); without it any 2-D tokens."""
        if not self.usable:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            self.misses += 1
            return None
        except OSError as exc:
            self.misses += 1
            self._disable(f"cannot read {path}: {_reason(exc)}")
            return None
        try:
            tokens = verify_entry(data, expect_shape)
        except CacheEntryError as exc:
            self.misses += 1
            self._report(path, exc)
            return None
        self.hits += 1
        return tokens

    def _report(self, path: Path, exc: CacheEntryError) -> None:
        if path in self._reported:
            return
        self._reported.add(path)
        if isinstance(exc, _LegacyEntry):
            self._legacy += 1
            if self._legacy > 1:
                logger.debug("condition cache entry %s: %s; encoding it again", path, exc)
                return
            logger.warning(
                "condition cache entry %s: %s; encoding it again (other such entries: no further message)", path, exc
            )
            return
        logger.warning("ignoring condition cache entry %s (%s): encoding it again", path, exc)

    def put(self, key: str, tokens: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
        """Store ``tokens`` under ``key`` atomically (a unique temporary file, then ``os.replace``),
        with ``metadata`` and the checksum metadata. Never raises for the file system."""
        if not self.writable:
            return
        from safetensors.torch import save

        tokens = tokens.detach().cpu().contiguous()
        if tokens.is_floating_point() and not bool(torch.isfinite(tokens).all()):
            logger.debug("not caching %s: non-finite values", key)
            return
        data = save({"tokens": tokens}, metadata={**(metadata or {}), **entry_metadata(tokens)})
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # unique across hosts sharing the folder
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            self._stop_writing(_reason(exc))
        finally:
            with contextlib.suppress(OSError):
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


def expected_token_shape(checkpoint) -> tuple[int, int] | None:
    """``(num_tokens, cross_attention_dim)`` of the condition tokens ``checkpoint`` makes (``None``
    when it cannot tell: the cache then checks for 2-D tokens only)."""
    try:
        return int(checkpoint.num_tokens), int(checkpoint.cross_attention_dim)
    except Exception:  # noqa: BLE001 - a stand-in checkpoint without the shape facts
        return None


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
        self._shape = expected_token_shape(encoder.checkpoint)  # what a cache entry must hold

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
            cond = self.cache.get(key, expect_shape=self._shape)
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
            tokens = self.cache.get(key, expect_shape=self._shape)
            if tokens is None:
                tokens = self.encoder.get().encode_uncond(instruction)
                self.cache.put(key, tokens, {"kind": "uncond", "instruction": instruction})
            self._uncond[instruction] = tokens
        return self._uncond[instruction]
