"""Scale-out on accelerate: sharding by group, manifest shards, byte-identical outputs (issue 7)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from easyref_cli import distributed, files
from easyref_cli.files import Group
from easyref_cli.jobs import Job
from easyref_cli.settings import GenerationSettings
from easyref_cli.testing import tiny_cli_args


def _job(group: str, i: int) -> Job:
    g = Group(name=group, path=Path(group), images=(Path(group) / "a.png",), ignored=())
    settings = GenerationSettings(seed=i, steps=1, guidance=1.0, width=8, height=8)
    return Job(
        job_id=f"{group}-{i}",
        group=g,
        prompt_id="p",
        prompt="p",
        caption="p",
        index=i,
        settings=settings,
        output=Path(group) / f"p_{i}.png",
    )


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_sharding_keeps_groups_whole_covers_every_job_once_and_balances(count):
    sizes = {"a": 5, "b": 1, "c": 3, "d": 3, "e": 2}
    jobs = [_job(g, i) for g, n in sizes.items() for i in range(n)]
    shards = [distributed.shard_jobs(jobs, count, r) for r in range(count)]
    ids = [j.job_id for shard in shards for j in shard]
    assert sorted(ids) == sorted(j.job_id for j in jobs)  # nothing lost, nothing twice
    owners = {}
    for r, shard in enumerate(shards):
        for j in shard:
            assert owners.setdefault(j.group.name, r) == r  # a group lives on one process
        assert [j.job_id for j in shard] == [j.job_id for j in jobs if j in shard]  # plan order kept
    loads = [len(s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert shards == [distributed.shard_jobs(jobs, count, r) for r in range(count)]  # deterministic


def test_merge_shards_appends_in_plan_order_and_removes_shards(tmp_path):
    with files.ManifestWriter(tmp_path / files.MANIFEST_NAME) as m:
        m.write({"job_id": "old", "status": "ok"})
    for rank, ids in ((0, ["j3", "j1"]), (1, ["j2"])):
        with files.ManifestWriter(distributed.shard_path(tmp_path, rank)) as m:
            for i in ids:
                m.write({"job_id": i, "status": "ok"})
    merged = distributed.merge_shards(tmp_path, ["j1", "j2", "j3"])
    assert [e["job_id"] for e in merged] == ["j1", "j2", "j3"]
    assert [e["job_id"] for e in files.read_manifest(tmp_path / files.MANIFEST_NAME)] == ["old", "j1", "j2", "j3"]
    assert not list(tmp_path.glob(distributed.SHARD_GLOB))
    assert distributed.merge_shards(tmp_path) == []


def test_strip_option():
    argv = ["generate", "g", "--num-processes", "2", "-o", "out", "--num-processes=3"]
    assert distributed.strip_option(argv, "--num-processes") == ["generate", "g", "-o", "out"]


def test_not_distributed_by_default(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_distributed()
    assert distributed.current("cpu").count == 1


# ---------------------------------------------------------------- real multi-process runs


def _groups(tmp_path: Path) -> Path:
    from easyref_cli.testing import make_reference_images

    root = tmp_path / "groups"
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        (root / name).mkdir(parents=True)
        make_reference_images(root / name, n=2, size=(48, 48), seed=i)
    return root


def _args(tiny, groups: Path, out: Path) -> list[str]:
    return [
        "generate",
        str(groups),
        "--prompt",
        "a cat",
        "-n",
        "2",
        "-o",
        str(out),
        "--no-cache",
        "-q",
        *tiny_cli_args(tiny),
    ]


def _launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "easyref_cli",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _single(args: list[str]):
    from typer.testing import CliRunner

    from easyref_cli.cli import app

    return CliRunner().invoke(app, args)


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _control_args(tiny, tmp_path: Path) -> list[str]:
    """ControlNet + img2img from folders (two inputs, paired by name)."""
    from PIL import Image

    from easyref_cli.tiny import build_tiny_controlnet

    controlnet = build_tiny_controlnet(tiny.base_model, tmp_path / "controlnet")
    for folder, colours in (("poses", [(255, 255, 255), (90, 0, 0)]), ("photos", [(20, 80, 200), (200, 180, 20)])):
        (tmp_path / folder).mkdir()
        for name, colour in zip("ab", colours, strict=True):
            Image.new("RGB", (64, 64), colour).save(tmp_path / folder / f"{name}.png")
    return ["--controlnet", str(controlnet), "--control-image", str(tmp_path / "poses"),
            "--init-image", str(tmp_path / "photos"), "--strength", "1"]  # fmt: skip


@pytest.mark.slow
def test_two_processes_give_the_same_bytes_as_one(tiny, tmp_path):
    """ControlNet + img2img inputs on top of the reference groups (text-to-image on two processes:
    ``test_num_processes_convenience_…`` below)."""
    groups = _groups(tmp_path)
    extra = _control_args(tiny, tmp_path)
    one = _single(_args(tiny, groups, tmp_path / "one") + extra)
    assert one.exit_code == 0, one.output
    two = _launch(_args(tiny, groups, tmp_path / "two") + extra)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _pngs(tmp_path / "one") == _pngs(tmp_path / "two")
    assert len(_pngs(tmp_path / "two")) == 12
    manifest = files.read_manifest(tmp_path / "two" / files.MANIFEST_NAME)
    assert [e["job_id"] for e in manifest] == [
        e["job_id"] for e in files.read_manifest(tmp_path / "one" / files.MANIFEST_NAME)
    ]
    assert all(e["status"] == "ok" for e in manifest) and len({e["job_id"] for e in manifest}) == len(manifest)
    assert not list((tmp_path / "two").glob(distributed.SHARD_GLOB))


@pytest.mark.slow
def test_resume_with_another_process_count_and_a_failing_group(tiny, tmp_path):
    groups = _groups(tmp_path)
    out = tmp_path / "out"
    # a 1-process partial run: only alpha
    first = _single(_args(tiny, groups / "alpha", out))
    assert first.exit_code == 0, first.output
    done = _pngs(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    before = len(files.read_manifest(out / files.MANIFEST_NAME))
    # gamma gets a corrupt image: its jobs fail in whichever process owns it
    (groups / "gamma" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    second = _launch(_args(tiny, groups, out))
    assert second.returncode == 1, second.stderr[-3000:]  # the failure is reported by the run as a whole
    new = files.read_manifest(out / files.MANIFEST_NAME)[before:]
    assert sorted(e["job_id"] for e in new) == sorted({e["job_id"] for e in new})  # one line per job
    assert len(new) == 6
    status = {(e["group"], e["seed"]): e["status"] for e in new}
    assert {k: v for k, v in status.items() if k[0] == "alpha"} == {("alpha", 0): "skipped", ("alpha", 1): "skipped"}
    assert {v for k, v in status.items() if k[0] == "beta"} == {"ok"}
    assert {v for k, v in status.items() if k[0] == "gamma"} == {"error"}
    assert any("zz_broken.png" in e.get("error", "") for e in new)
    after = _pngs(out)
    assert {k: after[k] for k in done} == done  # nothing rewritten
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert sorted(after) == sorted(done) + sorted(f"beta/a-cat_{s}.png" for s in (0, 1))
    assert not list(out.rglob("*.tmp")) and not list(out.glob(distributed.SHARD_GLOB))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("easyref") is None, reason="the easyref console script is not installed")
def test_num_processes_convenience_runs_accelerate_and_keeps_the_exit_code(tiny, tmp_path):
    groups = _groups(tmp_path)
    (groups / "beta" / "zz_broken.png").write_bytes(b"not a png")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        ["easyref", *_args(tiny, groups, tmp_path / "o"), "--num-processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr[-3000:]  # "some jobs failed", not the launcher's generic failure
    assert "ChildFailedError" not in res.stderr
    one = _single(_args(tiny, groups, tmp_path / "one"))
    assert one.exit_code == 1, one.output
    assert _pngs(tmp_path / "o") == _pngs(tmp_path / "one") and len(_pngs(tmp_path / "o")) == 4  # text-to-image
    manifest = files.read_manifest(tmp_path / "o" / files.MANIFEST_NAME)
    assert len(manifest) == 6 and sum(e["status"] == "error" for e in manifest) == 2
