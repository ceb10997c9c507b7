"""``--shard K/N``: separate runs (job arrays, ``xargs -P``) split one plan over a shared output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from easyref_cli import distributed, files
from easyref_cli.cli import app
from easyref_cli.testing import make_reference_images, tiny_cli_args

cli = CliRunner()


def _groups(root: Path, names=("alpha", "beta", "gamma", "delta")) -> Path:
    for i, name in enumerate(names):
        make_reference_images(root / name, n=2, size=(64, 48), seed=i)
    return root


def _args(tiny) -> list[str]:
    return tiny_cli_args(tiny)


def _dry(groups: Path, *extra: str) -> list[dict]:
    res = cli.invoke(app, ["generate", str(groups), "--prompt", "a cat", "-n", "2", "-o", "/tmp/unused-out",
                           "--model", "tiny", "--dry-run", "--json", *extra])  # fmt: skip
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_shares_cover_the_plan_once_by_whole_groups(tmp_path):
    groups = _groups(tmp_path / "groups")
    every = {e["job_id"] for e in _dry(groups)}
    shares = [_dry(groups, "--shard", f"{k}/3") for k in (1, 2, 3)]
    ids = [e["job_id"] for share in shares for e in share]
    assert sorted(ids) == sorted(every)  # each job in exactly one share
    owners = {}
    for k, share in enumerate(shares):
        for e in share:
            assert owners.setdefault(e["group"], k) == k  # a group is never split (encoded once)
    assert _dry(groups, "--shard", "2/3") == shares[1]  # deterministic


@pytest.mark.parametrize("bad", ["4/3", "0/3", "3", "a/b", "1/0"])
def test_bad_shard_is_a_usage_error(tmp_path, bad):
    groups = _groups(tmp_path / "groups", names=("alpha",))
    res = cli.invoke(app, ["generate", str(groups), "--prompt", "a cat", "-o", str(tmp_path / "o"), "--model", "tiny",
                           "--dry-run", "--shard", bad])  # fmt: skip
    assert res.exit_code == 2 and "--shard" in res.output, res.output


@pytest.mark.slow
def test_three_concurrent_shards_give_the_bytes_of_one_run(tiny, tmp_path):
    groups = _groups(tmp_path / "groups")
    prompts = tmp_path / "p.yaml"
    prompts.write_text(yaml.safe_dump({"prompts": ["a cat", "a dog"]}))
    base = [sys.executable, "-m", "easyref_cli", "generate", str(groups), "--prompts", str(prompts), *_args(tiny), "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    one, many = tmp_path / "one", tmp_path / "many"
    single = cli.invoke(app, [*base[3:], "-o", str(one)])  # the reference run, in this process
    assert single.exit_code == 0, single.output
    procs = [subprocess.Popen([*base, "-o", str(many), "--shard", f"{k}/3"], env=env, stderr=subprocess.PIPE)
             for k in (1, 2, 3)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]

    def tree(out: Path) -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}

    assert tree(many) == tree(one) and len(tree(one)) == 8
    entries = files.read_manifest(many / files.MANIFEST_NAME)
    ok = [e["job_id"] for e in entries if e["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 8  # each job once, every shard folded in
    assert not list(many.glob(distributed.SHARD_GLOB))
    merged = cli.invoke(app, [*base[3:], "-o", str(many), "--merge-manifest"])
    assert merged.exit_code == 0 and "8 of 8 images exist" in merged.output, merged.output


def test_merge_manifest_folds_finished_shards_and_reports_missing(tiny, tmp_path):
    groups = _groups(tmp_path / "groups", names=("alpha", "beta"))
    out = tmp_path / "out"
    args = ["generate", str(groups), "--prompt", "a cat", "-o", str(out), *_args(tiny)]
    res = cli.invoke(app, [*args, "--shard", "1/2"])
    assert res.exit_code == 0, res.output
    assert len(list(out.rglob("*.png"))) == 1 and not list(out.glob(distributed.SHARD_GLOB))
    leftover = distributed.share_path(out, (2, 2))  # a shard whose run died before folding it in
    with files.ManifestWriter(leftover) as m:
        m.write({"job_id": "x", "status": "error", "error": "boom", "group": "beta", "prompt_id": "a-cat", "seed": 0})
    res = cli.invoke(app, [*args, "--merge-manifest"])
    assert res.exit_code == 1 and "merged 1 manifest line(s); 1 of 2 images exist" in res.output, res.output
    assert not leftover.exists()
    assert [e["status"] for e in files.read_manifest(out / files.MANIFEST_NAME)] == ["ok", "error"]
