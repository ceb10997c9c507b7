"""``--batch-size auto`` against fixed batch sizes: the README's first command, end to end, side by side.

Each path runs ``easyref generate examples/groups --prompts examples/prompts.yaml --model demo`` as a
real process (16 images of 64², 25 steps; import, load, encode and generate all counted) into a fresh
output folder:

* ``batch1`` — ``--batch-size 1`` (the default before ``auto``);
* ``batch8`` — ``--batch-size 8``;
* ``auto_fresh`` — ``auto`` with nothing remembered (a first run: it probes 1, 2, 4, 8 on its own images);
* ``auto_known`` — ``auto`` with what an earlier run remembered (``$EASYREF_HOME/batch-sizes.json``).

Paths run in interleaved rounds (ABCD, DCBA, …); ratios are medians of per-round ratios. From the
repository root::

    python -m bench.autobatch            # 2 rounds, about 3 minutes on 2 CPU cores
    python -m bench.autobatch --rounds 3

Prints seconds per path, ratios to ``batch1``, and last ``auto_known_speedup=<x>`` (batch1 / auto_known).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ._common import RATIO_HEADER, interleaved, median_ratio, ratio_row, seconds_row
from ._common import table as format_table

REPO = Path(__file__).resolve().parent.parent
COMMAND = ["generate", "examples/groups", "--prompts", "examples/prompts.yaml", "--model", "demo", "-q"]


def _runner(work: Path, name: str, extra: list[str], home: Path, fresh_memo: bool):
    def run() -> None:
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        if fresh_memo:
            (home / "batch-sizes.json").unlink(missing_ok=True)
        env = {**os.environ, "EASYREF_HOME": str(home)}
        res = subprocess.run([sys.executable, "-m", "easyref_cli", *COMMAND, "-o", str(out), *extra], cwd=REPO,
                             env=env, capture_output=True, text=True)  # fmt: skip
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-2000:]}")

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="easyref-bench-autobatch-") as tmp:
        work = Path(tmp)
        homes = {name: work / f"home-{name}" for name in ("fixed", "fresh", "known")}
        paths = {
            "batch1": _runner(work, "batch1", ["--batch-size", "1"], homes["fixed"], False),
            "batch8": _runner(work, "batch8", ["--batch-size", "8"], homes["fixed"], False),
            "auto_fresh": _runner(work, "auto_fresh", [], homes["fresh"], True),
            "auto_known": _runner(work, "auto_known", [], homes["known"], False),
        }
        for name in ("batch1", "auto_known", "auto_known"):  # warm-up: demo hashes, and two runs to remember a size
            paths[name]()
        memo = (homes["known"] / "batch-sizes.json").read_text()
        times = interleaved(paths, args.rounds)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.rounds} rounds")
    print(
        format_table(
            [seconds_row(n, t, per=16) for n, t in times.items()],
            ("path", "median s", "min s", "max s", "ms per image"),
        )
    )
    print(format_table([ratio_row(f"{n} / batch1", t, times["batch1"]) for n, t in times.items() if n != "batch1"],
                       RATIO_HEADER))  # fmt: skip
    print(f"remembered: {' '.join(memo.split())}")
    print(f"auto_known_speedup={median_ratio(times['batch1'], times['auto_known']):.2f}")


if __name__ == "__main__":
    main()
