"""``--batch-size auto``: the largest UNet batch that pays, chosen while the run makes its images.

Jobs are batched only when their pipeline requests share a batch key (size, steps, scheduler, …);
within a key, :class:`AutoBatch` picks how many go together:

* **CUDA** — from memory: the first batch runs one image with the peak-memory counter reset; its
  peak over what was allocated before is one image's footprint, and the batch grows to what the
  free memory holds (with :data:`CUDA_HEADROOM` spare), at most :data:`MAX_AUTO`.
* **CPU and others** — from throughput: batches of 1, 2, 4, … are timed on the run's real images;
  the batch stops growing when images/s improves by less than :data:`MIN_GAIN` (or at
  :data:`MAX_AUTO`), and the best size so far is kept. (The first batch also pays the warm-up, which
  only ever errs towards growing.)

What was found is remembered per device, model, image size, guidance on/off and runtime (dtype,
attention, offload, compile) in ``$EASYREF_HOME/batch-sizes.json`` (a missing or unwritable file only
costs probing again), so later runs start at it: on CUDA the footprint per image is remembered and
the size worked out again from the free memory of the day. An out-of-memory
batch is split in half and retried (:meth:`AutoBatch.out_of_memory` lowers the size for the rest of
the run and in the memo). Batching never changes seeds; batched kernels may round a few pixels one
8-bit level differently (README, *Determinism*). Torch-free but for the CUDA memory probes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easyref_cli import files
from easyref_cli.errors import EasyRefError, InputError

logger = logging.getLogger(__name__)

MEMO_NAME = "batch-sizes.json"
#: The largest batch ``auto`` tries.
MAX_AUTO = 16
#: Grow while a batch twice as large gives at least this much more images/s (a little over 1: timing
#: noise on a busy machine must not settle a size that is still improving).
MIN_GAIN = 1.02
#: Share of the free CUDA memory ``auto`` leaves unused.
CUDA_HEADROOM = 0.2


def memo_path() -> Path:
    from easyref_cli.env import easyref_home

    return easyref_home() / MEMO_NAME


@dataclass
class _Probe:
    """What is known for one batch key in this run."""

    size: int = 1  # the size to ask for next
    settled: bool = False
    best: int = 1
    best_rate: float = 0.0
    cap: int = MAX_AUTO  # lowered by an out-of-memory batch
    base_bytes: int | None = None  # CUDA: allocated before the probe batch


@dataclass
class AutoBatch:
    """Batch sizes for one run: ``fixed`` (``--batch-size N``) or chosen per batch key (``auto``).

    ``model`` and ``device`` (e.g. ``cuda:NVIDIA H100`` or ``cpu:2``) name what the sizes are
    remembered for; ``memo`` is the JSON file (``None``: remember nothing).
    """

    fixed: int | None
    device: str = "cpu"
    model: str = ""
    memo: Path | None = None
    torch_device: Any = None  # the CUDA device measured (``--device cuda:1``), None: the current one
    context: str = ""  # dtype, attention, offload, compile: what else changes an image's footprint or speed
    _probes: dict[Any, _Probe] = field(default_factory=dict)
    _remembered: dict[str, Any] | None = None

    # ---- the memo ----------------------------------------------------------------------------

    def _memo_key(self, request) -> str:
        cfg = getattr(request, "guidance", 2.0) > 1.0  # guidance doubles the UNet batch
        key = [self.device, self.model, self.context, request.width, request.height, cfg]
        mode = _mode(request)  # ControlNets and img2img/inpainting weigh otherwise (text-to-image: as before)
        return json.dumps(key + ([list(mode)] if any(mode) else []), separators=(",", ":"))

    def _load(self) -> dict[str, Any]:
        if self._remembered is None:
            self._remembered = {}
            if self.memo is not None:
                try:
                    data = json.loads(self.memo.read_text(encoding="utf-8"))
                    self._remembered = data if isinstance(data, dict) else {}
                except (OSError, ValueError):
                    pass
        return self._remembered

    def _remember(self, request, size: int, how: str, settled: bool = True, **extra: Any) -> None:
        self._remembered = None  # read again: another run may have added entries since
        entries = self._load()
        entries[self._memo_key(request)] = {"size": size, "how": how, "settled": settled, **extra}
        if self.memo is not None:
            data = json.dumps(entries, indent=1, sort_keys=True).encode("utf-8")
            with contextlib.suppress(EasyRefError):
                files.write_bytes_atomic(self.memo, data, error=InputError)

    def _probe(self, key, request) -> _Probe:
        probe = self._probes.get(key)
        if probe is None:
            probe = self._probes[key] = _Probe()
            entry = self._load().get(self._memo_key(request))
            if isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 1:
                probe.size = probe.best = min(entry["size"], MAX_AUTO)
                probe.settled = entry.get("settled", True) is not False  # else: grow on from there
                per_image = entry.get("per_image_bytes")
                if self.device.startswith("cuda") and isinstance(per_image, int) and entry.get("how") == "memory":
                    probe.size = probe.best = self._fits(per_image, probe.cap)  # today's free memory decides
        return probe

    # ---- sizes -------------------------------------------------------------------------------

    def size(self, key, request) -> int:
        """How many jobs of batch key ``key`` (whose first request is ``request``) to batch next."""
        if self.fixed is not None:
            probe = self._probes.get(key)
            return min(self.fixed, probe.cap) if probe is not None else self.fixed
        probe = self._probe(key, request)
        return min(probe.size, probe.cap)

    def before(self, key, request) -> None:
        """Called before each batch: on CUDA, the first batch of a key measures its memory."""
        if self.fixed is not None or not self.device.startswith("cuda"):
            return
        probe = self._probe(key, request)
        if not probe.settled and probe.base_bytes is None:
            import torch

            torch.cuda.synchronize(self.torch_device)
            torch.cuda.reset_peak_memory_stats(self.torch_device)
            probe.base_bytes = torch.cuda.memory_allocated(self.torch_device)

    def observe(self, key, request, size: int, seconds: float) -> None:
        """A batch of ``size`` images of key ``key`` took ``seconds``: the next size to try."""
        if self.fixed is not None:
            return
        probe = self._probe(key, request)
        if probe.settled or size != min(probe.size, probe.cap):
            return  # a short batch (the key's last jobs) says nothing about its size
        if self.device.startswith("cuda"):
            self._from_memory(probe, request)
            return
        rate = size / seconds if seconds > 0 else float("inf")
        if rate >= probe.best_rate * MIN_GAIN or probe.best_rate == 0.0:
            probe.best, probe.best_rate = size, rate
            if size * 2 <= probe.cap:
                probe.size = size * 2
                self._remember(request, size, "throughput, still growing", settled=False)  # the next run goes on
                return
        self._settle(probe, request, "throughput")

    def _fits(self, per_image: int, cap: int) -> int:
        """How many images of ``per_image`` bytes the free memory holds now, beside one (measured) image."""
        import torch

        free, _total = torch.cuda.mem_get_info(self.torch_device)
        fits = int(free * (1 - CUDA_HEADROOM) // max(per_image, 1)) + 1
        logger.info("batch size auto: %.2f GiB per image, %.1f GiB free → %d", per_image / 2**30, free / 2**30,
                    min(fits, cap))  # fmt: skip
        return max(1, min(fits, cap))

    def _from_memory(self, probe: _Probe, request) -> None:
        import torch

        torch.cuda.synchronize(self.torch_device)
        per_image = max(torch.cuda.max_memory_allocated(self.torch_device) - (probe.base_bytes or 0), 1)
        probe.best = self._fits(per_image, probe.cap)
        self._settle(probe, request, "memory", per_image_bytes=int(per_image))

    def _settle(self, probe: _Probe, request, how: str, **extra: Any) -> None:
        probe.size, probe.settled = probe.best, True
        logger.info("batch size auto: %d for %dx%d (%s)", probe.best, request.width, request.height, how)
        self._remember(request, probe.best, how, **extra)

    def out_of_memory(self, key, request, size: int) -> None:
        """A batch of ``size`` ran out of memory: at most half of it from now on (and in the memo)."""
        probe = self._probes.setdefault(key, _Probe())
        probe.cap = max(1, min(probe.cap, size // 2))
        probe.size = min(probe.size, probe.cap)
        probe.best = min(probe.best, probe.cap)
        if self.fixed is None:
            probe.settled = True
            self._remember(request, probe.cap, "out of memory")


def _mode(request) -> tuple[int, bool, bool]:
    """(control images, init image, mask) of a request: what else changes a batch's memory and speed."""
    controls = len(getattr(request, "control_images", ()) or ())
    return controls, getattr(request, "init_image", None) is not None, getattr(request, "mask_image", None) is not None


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA/MPS/CPU allocation failure (torch raises several types)."""
    name = type(exc).__name__
    text = str(exc).lower()
    return name in ("OutOfMemoryError", "MemoryError") or "out of memory" in text or "can't allocate memory" in text
