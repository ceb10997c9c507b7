"""Shared fixtures: tiny random models built once per session, isolated user state, no hub access."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never touch the network or the user's caches from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("easyref_home")
    monkeypatch.setenv("EASYREF_HOME", str(home))
    monkeypatch.delenv("EASYREF_DEBUG", raising=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny Qwen2-VL + SDXL + official-layout checkpoints, built locally once per session."""
    import torch

    from easyref_cli.tiny import build_tiny_models

    # One thread: tiny ops are overhead-bound (2 threads measured up to 40x slower on a shared
    # 2-core box), and subprocess tests run with OMP_NUM_THREADS=1, so results match bit for bit.
    torch.set_num_threads(1)
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def ref_group(tmp_path_factory) -> Path:
    from easyref_cli.testing import make_reference_images

    folder = tmp_path_factory.mktemp("groups") / "cats"
    folder.mkdir()
    make_reference_images(folder, n=3, size=(64, 48))
    return folder


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI reconfigures the root logger onto CliRunner's (then closed) stderr: undo that."""
    import logging

    from easyref_cli.clitools import BarSafeHandler

    root = logging.getLogger()
    # a module-scoped fixture may have run the CLI before this test: undo its level and handler too
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, BarSafeHandler)]
    root.setLevel(logging.WARNING)
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():  # a library's dictConfig may disable ours
        if name.startswith("easyref") and isinstance(logger, logging.Logger):
            logger.disabled = False


@pytest.fixture(scope="module")
def one_torch_thread(tiny):
    """Run the tiny models on one thread (restored afterwards): use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.

    They gain nothing from two, and on a busy shared CPU OpenMP's spin-waiting made two threads
    up to 10× slower than one (measured: 1.3-19 s vs a steady 1.7 s for the same 8-image run).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
