"""What the demo's pre-training loops share (the base UNet's and the tiny Qwen2-VL's, in
:mod:`easyref_cli.demo.build` and :mod:`easyref_cli.demo.mllm`): the optimiser step, the run's whole
state in one file, so a stopped run continues exactly as an uninterrupted one, and a model folder
replaced whole."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def optimizer_step(loss, params, optimizer, schedule) -> None:
    """Backward ``loss``, clip the gradients of ``params`` to norm 1, step the optimiser and the schedule."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def replace_folder(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a fresh folder next to ``path``, then swap it in: an interrupted write leaves the old one."""
    path = Path(path)
    partial, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    if path.exists():
        path.rename(old)
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def save_state(path: Path, run, step: int, modules, optimizer, schedule, rng, generator, loss: float) -> None:
    """Weights of ``modules``, optimiser, schedule, both RNG states and the last loss of ``run`` (a
    dataclass saying what the run is) at ``step``, written atomically."""
    import torch

    state = {
        "run": dataclasses.asdict(run),
        "step": step,
        "modules": [m.state_dict() for m in modules],
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": rng.getstate(),
        "generator": generator.get_state(),
        "loss": loss,
    }
    partial = path.with_name(path.name + ".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def load_state(
    path: Path | None, run, modules, optimizer, schedule, rng, generator, *, what: str = "run"
) -> tuple[int, float]:
    """The step a saved state of the same ``run`` reached and its last loss (its tensors and RNG states
    loaded), else ``(0, nan)``; a state of another run is an error (``what`` names the run in it)."""
    import torch

    if path is None or not path.exists():
        return 0, float("nan")
    state = torch.load(path, weights_only=False)
    if state["run"] != dataclasses.asdict(run):
        raise SystemExit(f"{path} is the state of another {what} ({state['run']}); remove it to start again")
    for module, tensors in zip(modules, state["modules"], strict=True):
        module.load_state_dict(tensors)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rng.setstate(state["rng"])
    generator.set_state(state["generator"])
    return state["step"], state["loss"]
