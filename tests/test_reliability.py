"""Outputs that always match their inputs, shared output folders, a full disk.

- job ids cover the references' content and the models' content (not their install path);
- runs sharing one output folder claim each job first: they split identical work, never clobber
  each other's files, keep one valid manifest, and take over the claims of dead processes;
- a full disk stops the run at once with exit 1, what it finished intact;
- temporary files of a killed write are removed by the next run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from easyref_cli import claims, files
from easyref_cli.cli import app
from easyref_cli.plan import build_plan
from easyref_cli.testing import make_reference_images, tiny_cli_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

cli = CliRunner()


def model_args(base_model, mllm, adapter) -> list[str]:
    return tiny_cli_args(base_model=base_model, mllm=mllm, adapter=adapter)


def tiny_args(tiny) -> list[str]:
    return tiny_cli_args(tiny)


def make_groups(root: Path, names=("alpha", "beta")) -> Path:
    for i, name in enumerate(names):
        make_reference_images(root / name, n=2, size=(64, 48), seed=i)
    return root


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args], catch_exceptions=False)


def manifest(out: Path) -> list[dict]:
    return files.read_manifest(out / files.MANIFEST_NAME)


def tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


# ----------------------------------------------------------------------------------------------
# 1-2. Job ids: references and models by content
# ----------------------------------------------------------------------------------------------


def test_changed_references_are_not_taken_for_finished_outputs(tiny, tmp_path):
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    args = ["generate", groups, "--prompt", "a cat", "-o", out, *tiny_args(tiny), "-q"]
    assert invoke(*args).exit_code == 0
    before = tree(out)
    make_reference_images(groups / "alpha", n=2, size=(64, 48), seed=7)  # other pictures, same names
    for extra in (["--dry-run"], []):  # the dry run refuses what the run refuses
        res = invoke(*args, *extra)
        assert res.exit_code == 2, res.output
        assert "other reference images" in res.output and "alpha/a-cat_0.png" in res.output
    assert tree(out) == before
    assert invoke(*args, "--overwrite").exit_code == 0
    assert tree(out) != before


def test_the_same_models_elsewhere_resume_the_same_outputs(tiny, tmp_path):
    """A reinstall (the same weights at another path) keeps every finished image; the dry run agrees."""
    groups = make_groups(tmp_path / "groups")
    out = tmp_path / "out"
    assert invoke("generate", groups, "--prompt", "a cat", "-o", out, *tiny_args(tiny), "-q").exit_code == 0
    copy = tmp_path / "venv2"
    for part in ("sdxl", "qwen2-vl", "easyref"):
        shutil.copytree(Path(tiny.base_model).parent / part, copy / part)
    moved = model_args(copy / "sdxl", copy / "qwen2-vl", copy / "easyref" / Path(tiny.adapter_lora).name)
    dry = invoke("generate", groups, "--prompt", "a cat", "-o", out, *moved, "--dry-run")
    assert dry.exit_code == 0 and "2 to generate" not in dry.output and "0 to generate" in dry.output
    res = invoke("generate", groups, "--prompt", "a cat", "-o", out, *moved)
    assert res.exit_code == 0, res.output
    assert "0 done, 2 skipped" in res.output
    record = files.read_png_record(out / "alpha" / "a-cat_0.png")
    assert record["model_identity"]["adapter"] == "sha256:" + files.sha256_file(Path(tiny.adapter_lora))
    assert "/" not in json.dumps(record["model_identity"]).replace("sha256:", "")  # content, no path


def test_retrained_weights_under_the_same_path_are_other_settings(tiny, tmp_path):
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    adapter = tmp_path / "adapter.safetensors"
    shutil.copy(tiny.adapter_lora, adapter)
    out = tmp_path / "out"
    args = ["generate", groups, "--prompt", "a cat", "-o", out, *model_args(tiny.base_model, tiny.mllm, adapter)]
    first = build_plan(out_dir=out, groups=[groups], prompt="a cat", adapter=str(adapter)).jobs[0].job_id
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, str(adapter))
    assert build_plan(out_dir=out, groups=[groups], prompt="a cat", adapter=str(adapter)).jobs[0].job_id != first
    assert invoke(*args, "-q").exit_code == 0


def test_images_of_earlier_versions_still_resume_unless_their_references_changed(tiny, tmp_path):
    """0.2 ids hashed model paths and no reference content: such an image resumes while its
    recorded references match, and is a clash once they changed."""
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    args = ["generate", groups, "--prompt", "a cat", "-o", out, *tiny_args(tiny)]
    assert invoke(*args, "-q").exit_code == 0
    path = out / "alpha" / "a-cat_0.png"
    plan = build_plan(out_dir=out, groups=[groups], prompt="a cat", base_model=str(tiny.base_model),
                      mllm=str(tiny.mllm), adapter=str(tiny.adapter_lora),
                      cli={"width": 64, "height": 64, "steps": 2})  # fmt: skip
    job = plan.jobs[0]
    old = {k: v for k, v in files.read_png_record(path).items() if k != "model_identity"}
    old["job_id"] = job.legacy_id
    from PIL import Image

    with Image.open(path) as im:
        image = im.convert("RGB")
    path.unlink()
    files.write_png_atomic(path, image, record=old)
    res = invoke(*args)
    assert res.exit_code == 0 and "0 done, 1 skipped" in res.output, res.output
    make_reference_images(groups / "alpha", n=2, size=(64, 48), seed=9)
    assert invoke(*args).exit_code == 2


# ----------------------------------------------------------------------------------------------
# 4. Claims
# ----------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_claim(out: Path, output: str, *, job_id: str, pid: int, host: str | None = None, age_s: float = 0):
    c = claims.Claims(out)
    path = c.path(Path(output))
    path.parent.mkdir(parents=True, exist_ok=True)
    start = claims._start_time(pid) if host is None else None
    ns = claims._pid_namespace() if host is None else None
    holder = {"job_id": job_id, "pid": pid, "host": host or socket.gethostname(), "start": start, "ns": ns,
              "output": output}  # fmt: skip
    path.write_text(json.dumps(holder))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_claim_lifecycle(tmp_path):
    c = claims.Claims(tmp_path)
    assert c.acquire("job1", Path("a/x.png")) is None  # ours
    data = json.loads(c.path(Path("a/x.png")).read_text())
    assert data["pid"] == os.getpid() and data["job_id"] == "job1"
    other = claims.Claims(tmp_path)
    assert other.acquire("job1", Path("a/x.png")) is None  # the same process: ours already
    c.release_all()
    assert not (tmp_path / claims.CLAIMS_DIR).exists()  # nothing left behind

    _plant_claim(tmp_path, "a/x.png", job_id="j", pid=_dead_pid())
    assert c.acquire("job1", Path("a/x.png")) is None  # a dead holder's claim is taken over
    c.release_all()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant_claim(tmp_path, "a/x.png", job_id="j", pid=live.pid)
        holder = c.acquire("job1", Path("a/x.png"))
        assert holder is not None and holder.pid == live.pid and holder.job_id == "j"
        planted = _plant_claim(tmp_path, "a/x.png", job_id="j", pid=live.pid)
        data = json.loads(planted.read_text())
        planted.write_text(json.dumps({**data, "start": "1"}))  # the pid now belongs to a newer process
        assert c.acquire("job1", Path("a/x.png")) is None
        c.release_all()
    finally:
        live.kill()
        live.wait()

    _plant_claim(tmp_path, "a/x.png", job_id="j", pid=1, host="node-17")  # another host, fresh: live
    assert c.acquire("job1", Path("a/x.png")) is not None
    _plant_claim(tmp_path, "a/x.png", job_id="j", pid=1, host="node-17", age_s=claims.STALE_AFTER_S + 60)
    assert c.acquire("job1", Path("a/x.png")) is None  # no heartbeat for too long: stale
    c.release_all()


def _sleeper() -> subprocess.Popen:
    """A live process standing for another run."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _on_first_poll(monkeypatch, action) -> None:
    """Run ``action`` (what the other run does meanwhile) when this run first looks again at the
    jobs it waits for: deterministic, whatever the machine's speed."""
    from easyref_cli import cooperate

    real, done = cooperate.Cooperation.poll, []
    monkeypatch.setattr(cooperate, "POLL_S", 0.05)

    def poll(self):
        if not done:
            done.append(action())
        return real(self)

    monkeypatch.setattr(cooperate.Cooperation, "poll", poll)


def test_a_job_another_run_holds_is_waited_for_taken_over_or_failed(tiny, tmp_path, monkeypatch):
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out, made = tmp_path / "out", tmp_path / "made"
    args = ["generate", groups, "--prompt", "a cat", "-n", "2", "-o", "*", *tiny_args(tiny)]
    run = lambda folder, *extra: invoke(*[folder if a == "*" else a for a in args], *extra)  # noqa: E731
    assert run(made).exit_code == 0  # the image the other run will make
    plan = build_plan(out_dir=out, groups=[groups], prompt="a cat", cli={"images_per_prompt": 2, "width": 64,
                      "height": 64, "steps": 2}, base_model=str(tiny.base_model), mllm=str(tiny.mllm),
                      adapter=str(tiny.adapter_lora))  # fmt: skip
    job = plan.jobs[0]
    claim = claims.Claims(out).path(job.output)

    # 1. the other run makes the image while this one waits: counted as made by it, not made twice
    other = _sleeper()
    try:
        _plant_claim(out, job.output.as_posix(), job_id=job.job_id, pid=other.pid)

        def finish():
            (out / job.output).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(made / job.output, out / job.output)
            claim.unlink()

        _on_first_poll(monkeypatch, finish)
        res = run(out, "--json")
    finally:
        other.kill()
        other.wait()
    assert res.exit_code == 0, res.output
    assert "1 done, 0 skipped, 0 failed, 1 made by another run" in res.output
    assert any(json.loads(line).get("status") == "elsewhere" for line in res.stdout.splitlines() if line)
    assert [e["status"] for e in manifest(out)] == ["ok"]  # the other run writes its own line
    assert (out / job.output).read_bytes() == (made / job.output).read_bytes()
    monkeypatch.undo()

    # 2. the other run dies without making it: this run takes its claim over and makes the image
    (out / job.output).unlink()
    other = _sleeper()
    _plant_claim(out, job.output.as_posix(), job_id=job.job_id, pid=other.pid)
    _on_first_poll(monkeypatch, lambda: (other.kill(), other.wait()))
    res = run(out)
    assert res.exit_code == 0 and "1 done, 1 skipped" in res.output, res.output
    assert (out / job.output).read_bytes() == (made / job.output).read_bytes()
    assert not (out / claims.CLAIMS_DIR).exists()  # every claim released, the folder removed
    monkeypatch.undo()

    # 3. a live run holds the file for another job (other settings): this job fails, nothing is written
    (out / job.output).unlink()
    other = _sleeper()
    try:
        planted = _plant_claim(out, job.output.as_posix(), job_id="0123456789abcdef", pid=other.pid)
        res = run(out)
        assert res.exit_code == 1 and "being made by another run" in res.output, res.output
        assert not (out / job.output).exists() and planted.is_file()  # another run's claim is never removed
    finally:
        other.kill()
        other.wait()


def _run_all(commands: list[list[str]], env: dict) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]  # fmt: skip
    results = []
    for cmd, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return results


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("EASYREF_DEBUG", None)
    return env


@pytest.mark.slow
def test_concurrent_runs_into_one_folder_split_the_work_and_never_clobber(tiny, tmp_path):
    groups = make_groups(tmp_path / "groups")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"prompts": [{"prompt": f"a cat {i}", "id": f"p{i}"} for i in range(3)]}))
    base = [sys.executable, "-m", "easyref_cli", "generate", str(groups), "--prompts", str(prompts),
            "-n", "2", *tiny_args(tiny), "-q"]  # fmt: skip
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    single = invoke(*base[3:], "-o", alone)  # the reference run, in this process
    assert single.exit_code == 0, single.output
    runs = _run_all([[*base, "-o", str(shared), "--json"] for _ in range(2)], _env())
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    made = [[json.loads(line)["status"] for line in r.stdout.splitlines()].count("ok") for r in runs]
    assert sum(made) == 12, made  # the work was split, not done twice
    assert tree(shared) == tree(alone)  # 12 images, the same bytes as one run
    entries = manifest(shared)
    ok = [e["job_id"] for e in entries if e["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 12  # each finished job once
    assert not list(shared.rglob("*.tmp")) and not (shared / claims.CLAIMS_DIR).exists()

    # Other settings into the same names, at the same time: never a clobbered image.
    other = [*base, "--steps", "3", "-o", str(shared), "--overwrite"]
    mixed = _run_all([[*base, "-o", str(shared), "--overwrite"], other], _env())
    assert all(r.returncode in (0, 1) for r in mixed), [r.stderr[-2000:] for r in mixed]
    latest = files.latest_status(manifest(shared))
    for path in shared.rglob("*.png"):
        record = files.read_png_record(path)
        assert latest[record["job_id"]]["status"] == "ok"  # the file is the image its ok line describes


# ----------------------------------------------------------------------------------------------
# 6. A full disk, and leftovers of kill -9
# ----------------------------------------------------------------------------------------------


def test_a_full_disk_stops_the_run_at_once(tiny, tmp_path, monkeypatch):
    groups = make_groups(tmp_path / "groups")
    out = tmp_path / "out"
    from easyref_cli.model.pipeline import EasyRefPipeline

    calls = []
    real_generate = EasyRefPipeline.generate
    monkeypatch.setattr(
        EasyRefPipeline, "generate", lambda self, *a, **k: calls.append(1) or real_generate(self, *a, **k)
    )
    real_replace = os.replace

    def replace(src, dst, *a, **k):  # the first image lands, then the disk is full
        if str(dst).endswith(".png") and Path(dst).parent.parent == out and list(out.rglob("*.png")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    res = invoke("generate", groups, "--prompt", "a cat", "-n", "3", "-o", out, *tiny_args(tiny))
    assert res.exit_code == 1, res.output
    assert "No space left on device" in res.output and str(out / "alpha" / "a-cat_1.png") in res.output
    assert len(calls) == 2  # stopped at once: not six images computed for nothing
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.png")] == ["alpha/a-cat_0.png"]
    assert [e["status"] for e in manifest(out)] == ["ok"]
    assert not list(out.rglob("*.tmp")) and not (out / claims.CLAIMS_DIR).exists()
    monkeypatch.setattr(os, "replace", real_replace)
    res = invoke("generate", groups, "--prompt", "a cat", "-n", "3", "-o", out, *tiny_args(tiny))
    assert res.exit_code == 0 and "5 done, 1 skipped" in res.output, res.output


def test_a_full_disk_while_writing_the_manifest_stops_cleanly(tiny, tmp_path, monkeypatch):
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    real_write = os.write

    def write(fd, data):
        if b'"status": "ok"' in bytes(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    res = invoke("generate", groups, "--prompt", "a cat", "-o", out, *tiny_args(tiny))
    assert res.exit_code == 1 and "cannot write manifest" in res.output and str(out) in res.output, res.output
    raw = (out / files.MANIFEST_NAME).read_bytes()
    assert raw == b"" or raw.endswith(b"\n")  # no torn line for the next run to append after


def test_a_short_manifest_write_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / files.MANIFEST_NAME
    with files.ManifestWriter(path) as manifest:
        manifest.write({"job_id": "a", "status": "ok"})
        real_write = os.write
        calls = []

        def short(fd, data):  # half the line lands, then the disk is full
            calls.append(1)
            if len(calls) == 1:
                return real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", short)
        with pytest.raises(files.StorageError, match="No space left"):
            manifest.write({"job_id": "b", "status": "ok"})
        monkeypatch.setattr(os, "write", real_write)
        manifest.write({"job_id": "c", "status": "ok"})
    assert [e["job_id"] for e in files.read_manifest(path)] == ["a", "c"]


def test_temporary_files_left_by_kill_9_are_removed(tiny, tmp_path):
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    (out / "alpha").mkdir(parents=True)
    orphan = out / "alpha" / ".a-cat_0.png.0123456789ab.tmp"
    orphan.write_bytes(b"partial")
    keep = out / "alpha" / ".notes.txt"
    keep.write_text("mine")
    assert invoke("generate", groups, "--prompt", "a cat", "-o", out, *tiny_args(tiny), "-q").exit_code == 0
    assert not orphan.exists() and keep.exists()
