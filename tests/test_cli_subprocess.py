"""`easyref` as a real process: SIGINT and resume, the installed console script, torch-free dry run.

Each subprocess pays the imports (~6 s with torch), so there are few of them: five in all
(one more only if a run finishes before the interrupt lands and is retried with more jobs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from easyref_cli.testing import make_reference_images, tiny_cli_args

SUBPROCESS_TIMEOUT = 300


def tiny_args(tiny, steps: int = 2) -> list[str]:
    return tiny_cli_args(tiny, steps=steps)


def make_groups(root: Path, names=("alpha", "beta"), n: int = 2) -> Path:
    for i, name in enumerate(names):
        make_reference_images(root / name, n=n, size=(64, 48), seed=i)
    return root


def write_prompts(path: Path, count: int) -> Path:
    prompts = [{"prompt": f"a cat number {i}", "id": f"p{i:02d}"} for i in range(count)]
    path.write_text(yaml.safe_dump({"prompts": prompts}), encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)  # carries EASYREF_HOME (tmp, from conftest) and HF_HUB_OFFLINE
    env["PYTHONUNBUFFERED"] = "1"
    # One thread: tiny models gain nothing from more, and OpenMP spin-waits make 2 threads up to
    # 10x slower on a busy shared CPU.
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env.pop("EASYREF_DEBUG", None)
    return env


def easyref_command() -> list[str]:
    exe = shutil.which("easyref")
    return [exe] if exe else [sys.executable, "-m", "easyref_cli"]


def all_files(out: Path) -> list[Path]:
    return sorted(Path(d) / n for d, _, names in os.walk(out) for n in names)


def pngs(out: Path) -> list[Path]:
    return sorted(out.rglob("*.png"))


def read_manifest(out: Path) -> list[dict]:
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]  # every line is valid JSON
    assert all(isinstance(e, dict) for e in entries)
    return entries


def assert_complete_png(path: Path) -> dict:
    with Image.open(path) as im:
        im.load()  # a partial file would raise here
        assert im.size == (64, 64)
        return json.loads(im.text["easyref"])


# ----------------------------------------------------------------------------------------------
# SIGINT: finish or discard the image in flight, flush the manifest, exit 130; rerun completes
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_exits_130_and_rerun_completes(tmp_path, tiny):
    groups = make_groups(tmp_path / "groups")
    for attempt, n_prompts in enumerate((6, 24)):
        prompts = write_prompts(tmp_path / f"prompts{attempt}.yaml", n_prompts)
        out = tmp_path / f"out{attempt}"
        expected = {f"{g}/p{i:02d}_0.png" for g in ("alpha", "beta") for i in range(n_prompts)}
        cmd = [
            *easyref_command(),
            "generate",
            str(groups),
            "--prompts",
            str(prompts),
            "-o",
            str(out),
            *tiny_args(tiny, steps=4),
        ]
        log_path = tmp_path / f"interrupted{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
            try:
                deadline = time.monotonic() + 120
                while not pngs(out) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                if proc.poll() is None and not pngs(out):
                    pytest.fail(f"no image within 120 s:\n{log_path.read_text(errors='replace')[-3000:]}")
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGINT)  # the child only, not our process group
                rc = proc.wait(timeout=SUBPROCESS_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        done = {p.relative_to(out).as_posix() for p in pngs(out)}
        if done == expected:
            continue  # the run finished before the signal landed: retry with more jobs
        break
    else:
        pytest.fail("the run always finished before SIGINT arrived; cannot test interruption")

    log_text = log_path.read_text(errors="replace")
    assert rc == 130, log_text[-3000:]
    assert "interrupted" in log_text.lower()
    assert done and done < expected
    # Nothing partial: no temp files, every PNG complete with its record, manifest all JSON.
    assert not [p for p in all_files(out) if p.name.endswith(".tmp")]
    for rel in done:
        record = assert_complete_png(out / rel)
        assert record["output"] == rel
    entries = read_manifest(out)
    assert {Path(e["path"]).relative_to(out).as_posix() for e in entries if e["status"] == "ok"} == done
    assert not [e for e in entries if e["status"] == "error"]
    before = {rel: ((out / rel).read_bytes(), (out / rel).stat().st_mtime_ns) for rel in done}

    # The same command again finishes the rest; nothing is redone or duplicated.
    res = subprocess.run(cmd, capture_output=True, env=child_env(), timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-3000:]
    assert {p.relative_to(out).as_posix() for p in pngs(out)} == expected
    assert [p.relative_to(out).as_posix() for p in all_files(out)] == sorted(expected | {"manifest.jsonl"})
    for rel, (data, mtime) in before.items():
        assert (out / rel).read_bytes() == data and (out / rel).stat().st_mtime_ns == mtime, rel
    for rel in expected - done:
        assert_complete_png(out / rel)
    rerun = read_manifest(out)[len(entries) :]
    assert len(rerun) == len(expected)
    assert {Path(e["path"]).relative_to(out).as_posix() for e in rerun if e["status"] == "skipped"} == done
    assert {Path(e["path"]).relative_to(out).as_posix() for e in rerun if e["status"] == "ok"} == expected - done
    ok_ids = [e["job_id"] for e in read_manifest(out) if e["status"] == "ok"]
    assert len(ok_ids) == len(set(ok_ids)) == len(expected)


# ----------------------------------------------------------------------------------------------
# The installed console script
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_installed_easyref_script_generates_and_inspects(tmp_path, tiny):
    exe = shutil.which("easyref")
    if exe is None:
        pytest.skip("the `easyref` console script is not on PATH (package not installed)")
    groups = make_groups(tmp_path / "groups", names=("alpha",))
    out = tmp_path / "out"
    res = subprocess.run(
        [exe, "generate", str(groups), "--prompt", "a cat", "-n", "2", "-o", str(out), "--json", *tiny_args(tiny)],
        capture_output=True,
        env=child_env(),
        timeout=SUBPROCESS_TIMEOUT,
    )
    stderr = res.stderr.decode(errors="replace")
    assert res.returncode == 0, stderr[-3000:]
    assert [p.relative_to(out).as_posix() for p in pngs(out)] == ["alpha/a-cat_0.png", "alpha/a-cat_1.png"]
    printed = [json.loads(line) for line in res.stdout.decode().splitlines()]  # stdout: JSON only
    assert printed == read_manifest(out) and [e["status"] for e in printed] == ["ok", "ok"]
    assert "2 done, 0 skipped, 0 failed" in stderr  # summary (and progress bars) on stderr

    res = subprocess.run(
        [exe, "inspect", str(out / "alpha" / "a-cat_1.png")],
        capture_output=True,
        env=child_env(),
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    record = json.loads(res.stdout)
    assert record["prompt"] == "a cat" and record["seed"] == 1 and record["steps"] == 2
    assert len(record["references"]) == 2 and record["adapter"] == tiny.adapter_lora.name  # no paths by default
    assert "AI label (XMP DigitalSourceType): trainedAlgorithmicMedia" in res.stderr.decode(errors="replace")


# ----------------------------------------------------------------------------------------------
# --dry-run imports no torch
# ----------------------------------------------------------------------------------------------

DRY_RUN_PROBE = textwrap.dedent(
    """
    import json, sys
    report, args = sys.argv[1], json.loads(sys.argv[2])
    sys.argv = ["easyref", *args]
    from easyref_cli.cli import main
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate", "safetensors") if m in sys.modules)
    with open(report, "w") as f:
        json.dump({"code": code, "heavy": heavy}, f)
    """
)


def test_dry_run_imports_no_torch_and_prints_only_json(tmp_path):
    groups = make_groups(tmp_path / "groups")
    prompts = write_prompts(tmp_path / "prompts.yaml", 3)
    out = tmp_path / "out"
    args = ["generate", str(groups), "--prompts", str(prompts), "-o", str(out), "--dry-run", "--json", "-n", "2"]
    report = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-c", DRY_RUN_PROBE, str(report), json.dumps(args)],
        capture_output=True,
        env=child_env(),
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    result = json.loads(report.read_text())
    assert result == {"code": 0, "heavy": []}
    jobs = [json.loads(line) for line in res.stdout.decode().splitlines()]  # nothing but JSON
    assert len(jobs) == 2 * 3 * 2
    assert all(isinstance(j, dict) and j["exists"] is False for j in jobs)
    assert {j["output"] for j in jobs} == {
        f"{g}/p{i:02d}_{s}.png" for g in ("alpha", "beta") for i in range(3) for s in (0, 1)
    }
    assert not out.exists()
