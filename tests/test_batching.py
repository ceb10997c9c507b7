"""``--batch-size auto``: sizes from throughput (CPU) or memory (CUDA), remembered; OOM retries smaller."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from easyref_cli import batching
from easyref_cli.batching import AutoBatch
from easyref_cli.cli import app
from easyref_cli.run import batches
from easyref_cli.testing import make_reference_images


@dataclass(frozen=True)
class Req:
    width: int = 64
    height: int = 64


KEY = ("64x64",)


def _feed(auto: AutoBatch, seconds_per_image: dict[int, float], rounds: int = 8) -> list[int]:
    """Ask for sizes and report their timings; the sizes asked for, in order."""
    asked = []
    for _ in range(rounds):
        size = auto.size(KEY, Req())
        asked.append(size)
        auto.observe(KEY, Req(), size, size * seconds_per_image[size])
    return asked


def test_cpu_grows_while_images_per_second_improve_then_settles_and_remembers(tmp_path):
    memo = tmp_path / "batch-sizes.json"
    curve = {1: 1.0, 2: 0.6, 4: 0.45, 8: 0.449, 16: 0.3}  # 8 is no better than 4
    asked = _feed(AutoBatch(fixed=None, device="cpu:2", model="m", memo=memo), curve)
    assert asked == [1, 2, 4, 8, 4, 4, 4, 4]
    (entry,) = json.loads(memo.read_text()).values()
    assert entry["size"] == 4 and entry["settled"] is True and entry["how"] == "throughput"
    again = AutoBatch(fixed=None, device="cpu:2", model="m", memo=memo)
    assert _feed(again, curve, rounds=3) == [4, 4, 4]  # starts where the last run settled
    other = AutoBatch(fixed=None, device="cpu:2", model="another model", memo=memo)
    assert other.size(KEY, Req()) == 1  # remembered per model (and device and size)


def test_cpu_stops_at_the_cap_and_a_run_that_ended_early_goes_on_next_time(tmp_path):
    memo = tmp_path / "m.json"
    curve = {1: 1.0, 2: 0.5, 4: 0.25, 8: 0.12, 16: 0.06}
    assert _feed(AutoBatch(fixed=None, memo=memo), curve, rounds=2) == [1, 2]  # the run ended while growing
    assert json.loads(memo.read_text()) and not next(iter(json.loads(memo.read_text()).values()))["settled"]
    assert _feed(AutoBatch(fixed=None, memo=memo), curve, rounds=6) == [2, 4, 8, 16, 16, 16]


def test_a_short_batch_says_nothing_about_its_size(tmp_path):
    auto = AutoBatch(fixed=None, memo=None)
    auto.observe(KEY, Req(), 1, 1.0)
    assert auto.size(KEY, Req()) == 2
    auto.observe(KEY, Req(), 1, 100.0)  # the key's last job, alone: not a verdict on size 2
    assert auto.size(KEY, Req()) == 2


def test_out_of_memory_halves_the_size_for_the_rest_of_the_run_and_next_runs(tmp_path):
    memo = tmp_path / "m.json"
    auto = AutoBatch(fixed=None, memo=memo)
    for size, seconds in ((1, 1.0), (2, 1.0), (4, 1.0)):
        auto.observe(KEY, Req(), size, seconds)
    assert auto.size(KEY, Req()) == 8
    auto.out_of_memory(KEY, Req(), 8)
    assert auto.size(KEY, Req()) == 4
    assert AutoBatch(fixed=None, memo=memo).size(KEY, Req()) == 4
    fixed = AutoBatch(fixed=8, memo=None)
    fixed.out_of_memory(KEY, Req(), 8)
    assert fixed.size(KEY, Req()) == 4  # an explicit size retries smaller too


def test_cuda_size_comes_from_free_memory_and_the_measured_footprint(monkeypatch, tmp_path):
    import torch

    gib = 2**30
    calls = {"allocated": 2 * gib, "peak": 3 * gib}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: calls["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: calls["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10 * gib, 80 * gib))
    auto = AutoBatch(fixed=None, device="cuda:NVIDIA H100", memo=tmp_path / "m.json")
    assert auto.size(KEY, Req()) == 1
    auto.before(KEY, Req())
    auto.observe(KEY, Req(), 1, 5.0)
    # 1 GiB per image, 10 GiB free, 20 % spare: 8 more fit beside the one measured
    assert auto.size(KEY, Req()) == 9
    (entry,) = json.loads((tmp_path / "m.json").read_text()).values()
    assert entry == {"size": 9, "how": "memory", "settled": True, "per_image_bytes": gib}
    # the next run: the remembered footprint against the memory free now (another process took some)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (5 * gib, 80 * gib))
    assert AutoBatch(fixed=None, device="cuda:NVIDIA H100", memo=tmp_path / "m.json").size(KEY, Req()) == 5


def test_batches_ask_the_size_when_each_batch_starts():
    sizes = iter([1, 3, 2, 5])
    asked_at = []

    def size(job):
        asked_at.append(job)
        return next(sizes)

    got = list(batches(range(7), key=lambda j: 0 if j < 6 else 1, size=size))
    assert got == [[0], [1, 2, 3], [4, 5], [6]]  # job 6 has another key: a batch of its own
    assert asked_at == [0, 1, 4, 6]  # asked once per batch, by its first job


def test_out_of_memory_is_recognised():
    import torch

    assert batching.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert batching.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not batching.is_out_of_memory(ValueError("bad"))


# ----------------------------------------------------------------------------------------------
# In a run
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def groups(tmp_path) -> Path:
    make_reference_images(tmp_path / "groups" / "alpha", n=2, size=(64, 48))
    return tmp_path / "groups"


def _run(tiny, groups, out, *extra):
    args = ["generate", str(groups), "--prompt", "a cat", "-n", "5", "-o", str(out), "--base-model", str(tiny.base_model),
            "--mllm", str(tiny.mllm), "--adapter", str(tiny.adapter_lora), "--device", "cpu", "--width", "64",
            "--height", "64", "--steps", "2", "--json", *extra]  # fmt: skip
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_a_batch_that_runs_out_of_memory_is_retried_in_halves(tiny, groups, tmp_path, monkeypatch):
    import torch

    from easyref_cli.model.pipeline import EasyRefPipeline

    real = EasyRefPipeline.generate

    def generate(self, requests, **kwargs):
        if len(requests) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, requests, **kwargs)

    monkeypatch.setattr(EasyRefPipeline, "generate", generate)
    lines = _run(tiny, groups, tmp_path / "out", "--batch-size", "4")
    assert [e["status"] for e in lines] == ["ok"] * 5  # no job failed
    assert {e["timings"]["batch_size"] for e in lines} == {1}
    reference = _run(tiny, groups, tmp_path / "ref", "--batch-size", "1")
    for a, b in zip(lines, reference, strict=True):
        assert np.array_equal(_pixels(Path(a["path"])), _pixels(Path(b["path"])))


def test_auto_is_the_default_and_changes_no_picture_beyond_one_level(tiny, groups, tmp_path):
    from easyref_cli.env import easyref_home

    lines = _run(tiny, groups, tmp_path / "auto")
    sizes = [e["timings"]["batch_size"] for e in lines]
    assert sizes[0] == 1 and all(s in (1, 2, 4, 8, 16) for s in sizes)
    assert (easyref_home() / batching.MEMO_NAME).is_file()
    reference = _run(tiny, groups, tmp_path / "one", "--batch-size", "1")
    for a, b in zip(lines, reference, strict=True):
        assert np.abs(_pixels(Path(a["path"])) - _pixels(Path(b["path"]))).max() <= 1
