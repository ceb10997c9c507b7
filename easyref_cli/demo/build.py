"""Train the demo model from nothing: ``python -m easyref_cli.demo.build WORK_DIR [--install]``.

The recipe (every step seeded; the defaults took 233 minutes on two CPU cores, see docs/DEMO.md):

1. **Base models.** A tiny SDXL-layout pipeline (UNet, VAE, two CLIP text encoders, Euler
   scheduler) and a tiny random Qwen2-VL, saved with ``save_pretrained``.
2. **VAE** fitted on synthetic images (64² pixels → 4×16² latents; its ``scaling_factor`` is set
   so the latents have unit variance, as SDXL's).
3. **Base UNet**: text-to-image pre-training of the UNet and both tiny CLIP text encoders on
   synthetic captions ("a large red circle at the top left"), with colour and/or shape words
   dropped from some captions so the UNet also draws a shape of *some* colour for "a large shape
   at the top left"; v-prediction on a zero-terminal-SNR schedule (see ``base.build_base_pipeline``).
   Two training-only additions make it draw what the caption names (``BaseLoss``): heads that must
   read the caption's cell, size, colour and shape off the pooled text embedding (the position),
   and a heavier loss on and around the drawn shape (the shape).
   Two checks record what the base model then does with a caption: how often it draws the colour,
   shape, position and size the caption names (``base.from_text_accuracy``), and how much each of those
   words moves its loss (``base.caption_sensitivity``).
   Two more runs (``unet_place`` and ``unet_more``, :data:`PLACE_RUNS`) train them on with the pooled
   text embedding computed from the caption without its colour and shape words, as the EasyRef prompts
   are: the UNet then reads colour and shape through cross-attention, where the references arrive; each
   run's check draws from text that way.
4. **Qwen2-VL**: the tiny Qwen2-VL pre-trained as a captioner of the pictures ("a large red circle at
   the top left"), as the real EasyRef starts from a Qwen2-VL that sees shapes and colours
   (:mod:`easyref_cli.demo.mllm`); a check records how often it reads each attribute.
5. **EasyRef**: the real ``easyref train`` stages (``align`` → ``single`` → ``multi``, then ``multi`` once
   more with the rate decayed to zero: ``anneal``, :data:`STAGE_RUNS`) on synthetic
   groups whose captions name no colour and no shape: the colour and the shape can only come from
   the references.
6. ``--install`` copies the result (``sdxl/``, ``qwen2vl/``, ``easyref.safetensors``,
   ``build.json``) into ``easyref_cli/demo/weights``, where ``--model demo`` finds it.

``build.json`` records the settings, the wall time of each step and the machine.

A build folder continues where it stopped: running the same command again (``kill`` or Ctrl-C
first, if need be) keeps finished steps, resumes the base UNet and the Qwen2-VL from their last
saved states (``base-state.pt``, ``base-place-state.pt``, ``base-unet_more-state.pt``,
``qwen2vl-state.pt``, every 250 steps, exactly as if they had not stopped) and a stage from its last
checkpoint (``easyref train --resume``); ``--steps multi=2400`` trains a finished constant-rate stage
further; a decaying run (``anneal``) at another step count, or an edited :data:`STAGE_RUNS` entry,
trains that run and those after it again. The time of every run, interrupted ones included, adds up
in ``build.json`` (``seconds``; ``runs`` lists each).
``--base-from BUILD`` starts from a previous build's VAE, text encoders and Qwen2-VL with a new UNet.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from easyref_cli.demo import base, weights_dir
from easyref_cli.demo.base import caption
from easyref_cli.demo.base import log as _log
from easyref_cli.demo.state import replace_folder
from easyref_cli.demo.synthetic import (
    IMAGE_SIZE,
    Drawing,
    make_group,
)

#: Where ``--install`` puts the trained model (and where ``--model demo`` looks for it).
WEIGHTS_DIR = weights_dir()

#: Default step counts (``--quick`` divides them by 20 for a smoke run of the recipe).
STEPS = {
    "vae": 1600,
    "unet": 3000,
    "unet_place": 1000,
    "unet_more": 3000,
    "mllm": 2500,
    "mllm_more": 1500,
    "align": 600,
    "single": 500,
    "multi": 1600,
    "anneal": 7200,
}
LORA_RANK = 8
#: Step 4's Qwen2-VL training state (an interrupted run resumes from it) and its two runs: (name, learning
#: rate, seed offset). The second, a fresh cosine run at half the rate, raised the shape it names from 71%
#: to 100% (docs/DEMO.md).
MLLM_STATE = "qwen2vl-state.pt"
MLLM_RUNS = (("mllm", 2e-3, 0), ("mllm_more", 1e-3, 1))
#: The stages' ``easyref train --mask-weight``: 0, the plain loss, as the shipped weights (4, the loss
#: weighted 1 + 4 on and around the drawn shape, changed nothing measurable on the base before ``unet_place``:
#: docs/DEMO.md).
STAGE_MASK_WEIGHT = 0.0


# ---------------------------------------------------------------------------------------------
# 4. EasyRef stages (the real `easyref train`)
# ---------------------------------------------------------------------------------------------


def write_training_data(root: Path, *, groups: int, per_group: int, seed: int) -> dict[str, Path]:
    """Synthetic groups as PNG files plus one official-format JSON list per stage; each item also names
    its target's loss mask (:func:`loss_mask`, for ``easyref train --mask-weight``)."""
    root.mkdir(parents=True, exist_ok=True)
    align, single, multi = [], [], []
    for g in range(groups):
        drawings = make_group(seed * 1_000_003 + g, per_group)
        names, masks = [], []
        for i, d in enumerate(drawings):
            name, mask = f"g{g:04d}/{i}.png", f"g{g:04d}/{i}-mask.png"
            (root / name).parent.mkdir(exist_ok=True)
            d.render().save(root / name)
            loss_mask(d).save(root / mask)
            names.append(name)
            masks.append(mask)
        for i, d in enumerate(drawings):
            others = names[:i] + names[i + 1 :]
            text, mask = caption(d), masks[i]
            align.append({"image_file": names[i], "text": text, "mask": mask})
            single.append(
                {"image_file": [others[(g + i) % len(others)]], "text": text, "target": names[i], "mask": mask}
            )
            multi.append({"image_file": others, "text": text, "target": names[i], "mask": mask})
    files = {}
    for stage, items in (("align", align), ("single", single), ("multi", multi)):
        files[stage] = root / f"{stage}.json"
        files[stage].write_text(json.dumps(items, indent=0))
    return files


def loss_mask(drawing: Drawing):
    """The shape's pixels spread by one latent pixel (4 px) each way, so its outline, where two shapes
    differ, counts in full (as :func:`~easyref_cli.demo.base._shape_weights` does for the base)."""
    from PIL import ImageFilter

    return drawing.mask().filter(ImageFilter.MaxFilter(9))


def run_stage(
    stage: str,
    *,
    data: dict[str, Path],
    data_root: Path,
    sdxl: Path,
    mllm: Path,
    out: Path,
    steps: int,
    init: Path | None,
    seed: int,
    batch_size: int,
    learning_rate: float,
    lr_scheduler: str = "constant",
    resume: bool = False,
    mask_weight: float = 0.0,
) -> Path:
    """One ``easyref train`` stage, through the real command line (``--resume``: continue the run in
    ``out`` to ``steps``); returns its final checkpoint."""
    command = [
        sys.executable, "-m", "easyref_cli", "train", "--stage", stage,
        "--data", str(data[stage]), "--data-root", str(data_root),
        "--base-model", str(sdxl), "--mllm", str(mllm), "--output-dir", str(out),
        "--resolution", str(IMAGE_SIZE), "--max-steps", str(steps), "--save-steps", str(min(steps, 400)),
        "--batch-size", str(batch_size), "--gradient-accumulation", "1", "--resize", "crop",
        "--learning-rate", str(learning_rate), "--lr-scheduler", lr_scheduler, "--seed", str(seed),
        "--device", "cpu", "--mixed-precision", "no", "--num-workers", "0", "--quiet",
    ]  # fmt: skip
    if stage != "align":  # align trains no LoRA
        command += ["--lora-rank", str(LORA_RANK)]
    if init is not None:
        command += ["--init", str(init)]
    if resume:
        command += ["--resume"]
    if mask_weight:
        command += ["--mask-weight", str(mask_weight)]
    _log(" ".join(command[1:]))
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # easyref train finishes its step, saves and exits on one SIGINT. A Ctrl-C in the terminal
        # already reached it (a second one would stop it unsaved); a `kill` of this build did not.
        if _TERMINATED:
            process.send_signal(signal.SIGINT)
        process.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)
    return out / f"checkpoint-{steps}.safetensors"


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------


@functools.cache
def _cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor"), where the system says it; else the
    architecture: two 2-core x86_64 machines can train at twice the speed of each other."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_record() -> dict:
    """The machine a build ran on last (recorded in ``build.json``; each run records its CPU too)."""
    import torch

    return {
        "cpu": _cpu_name(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class Ledger:
    """``WORK/build.json`` as the build goes: settings, results, and the wall time of every step, summed
    over every invocation that worked on it (a resumed step adds its time; ``runs`` lists each)."""

    def __init__(self, work: Path, settings: dict):
        self.path = work / "build.json"
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        if previous and previous.get("seed") != settings["seed"]:
            raise SystemExit(f"{self.path} is a build with another seed; use another WORK folder")
        self.record: dict = {
            **previous,
            **settings,
            "seconds": previous.get("seconds", {}),
            "runs": previous.get("runs", []),
        }
        self.record["machine"] = _machine_record()

    def timed(self, name: str, fn: Callable, **details):
        """``fn()``, its wall time added to ``seconds[name]`` and listed in ``runs``."""
        import torch

        started, t0 = time.strftime("%Y-%m-%d %H:%M"), time.time()
        run = {"step": name, "started": started, "cpu": _cpu_name(), "threads": torch.get_num_threads(), **details}
        try:
            return fn()
        except BaseException:  # Ctrl-C included: the time it ran still counts
            run["stopped"] = True
            raise
        finally:
            run["seconds"] = seconds = round(time.time() - t0, 1)
            self.record["seconds"][name] = round(self.record["seconds"].get(name, 0.0) + seconds, 1)
            self.record["runs"].append(run)
            _log(f"{name}: {seconds} s")
            self.save()

    def save(self) -> None:
        self.record["total_seconds"] = round(sum(self.record["seconds"].values()), 1)
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(partial, self.path)


def _start_from(base_from: Path, work: Path, ledger: Ledger, seed: int):
    """Steps 1-2 from a previous build (``--base-from``): its VAE, text encoders and Qwen2-VL copied into
    ``work``, a new UNet of this recipe's architecture (random, from ``seed``); the previous build's
    record of those parts kept under ``base_from``."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    sdxl = work / "sdxl"
    previous = base_from / "build.json"
    pipe = StableDiffusionXLPipeline.from_pretrained(base_from / "sdxl")
    torch.manual_seed(seed)
    pipe.unet = base.demo_unet()
    _save_pipeline(pipe, sdxl)
    shutil.rmtree(work / "qwen2vl", ignore_errors=True)  # a copy an interrupted run left
    shutil.copytree(base_from / "qwen2vl", work / "qwen2vl")
    old = json.loads(previous.read_text()) if previous.exists() else {}
    mllm_runs = [name for name, _, _ in MLLM_RUNS]
    for name in mllm_runs:  # its Qwen2-VL is pre-trained already (step 4; a build folder or installed weights)
        if old.get(name):
            _marker(work / f"base-{name}.done", {"qwen2vl": old["steps"][name]})
    ledger.record["base_from"] = {
        "path": str(base_from),
        "kept": "VAE, both text encoders (trained further with the new UNet), Qwen2-VL (pre-trained there if "
        "its build did step 4)",
        "vae": old.get("vae"),
        "steps": {k: old.get("steps", {}).get(k) for k in ("vae", "unet", *mllm_runs)},
        "seconds": {k: old.get("seconds", {}).get(k) for k in ("base_models", "qwen2vl", "vae", "unet", *mllm_runs)},
    }
    ledger.save()


def _marker(path: Path, content: dict) -> None:
    """Record what a finished step was built with, or stop if ``path`` records something else."""
    if path.exists():
        done = json.loads(path.read_text() or "{}")
        if done != content:
            raise SystemExit(
                f"{path.parent} holds a build made with {done}, not {content}; use another WORK folder "
                f"(or remove {path.name} and what it covers to rebuild that part)"
            )
        return
    path.write_text(json.dumps(content) + "\n")


def _save_pipeline(pipe, path: Path) -> None:
    """``save_pretrained`` into a fresh folder, then swapped in: an interrupted save leaves the old one."""
    replace_folder(path, lambda partial: pipe.save_pretrained(partial, safe_serialization=True))


@dataclass(frozen=True)
class BaseLoss:
    """What base pre-training adds to the diffusion loss (:func:`~easyref_cli.demo.base.train_base_unet`;
    docs/DEMO.md)."""

    attribute_loss: float = 0.1
    shape_weight: float = 4.0


def _build_base(
    work: Path, ledger: Ledger, steps: dict[str, int], seed: int, base_from: Path | None, base_loss: BaseLoss
) -> None:
    """Steps 1-3: base models, VAE, base UNet into ``work/sdxl`` and ``work/qwen2vl`` (resumable)."""
    from diffusers import StableDiffusionXLPipeline

    from easyref_cli.tiny import build_tiny_qwen2vl

    record = ledger.record
    sdxl, mllm = work / "sdxl", work / "qwen2vl"
    models = {
        "seed": seed,
        "base_from": str(base_from) if base_from else None,
        "vae": None if base_from else steps["vae"],
    }
    if (work / "base-models.done").exists():
        _marker(work / "base-models.done", models)
    else:
        if base_from is not None:
            _start_from(base_from, work, ledger, seed)
        else:
            pipe = ledger.timed("base_models", lambda: base.build_base_pipeline(sdxl, seed))
            ledger.timed("qwen2vl", lambda: build_tiny_qwen2vl(mllm, seed))
            record["vae"] = ledger.timed("vae", lambda: base.fit_vae(pipe.vae, steps["vae"], seed=seed))
            _save_pipeline(pipe, sdxl)
        _marker(work / "base-models.done", models)
    if (work / "base-unet.done").exists():
        _marker(work / "base-unet.done", {"unet": steps["unet"]} | dataclasses.asdict(base_loss))
        _log(f"base models of {work} are trained; reusing them")
        return
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    state = work / base.BASE_STATE
    record["unet"] = ledger.timed(
        "unet",
        lambda: base.train_base_unet(pipe, steps["unet"], seed=seed, state=state, **dataclasses.asdict(base_loss)),
        planned=steps["unet"],
    )
    record["unet"]["parameters"] = sum(p.numel() for p in pipe.unet.parameters())
    record["unet"]["block_out_channels"] = list(pipe.unet.config.block_out_channels)
    checks = ledger.timed("base_checks", lambda: {"from_text": base.from_text_accuracy(pipe),
                                                  "caption_sensitivity": base.caption_sensitivity(pipe)})  # fmt: skip
    record["unet"].update(checks)
    _log(f"base model from text: {record['unet']['from_text']}")
    _save_pipeline(pipe, sdxl)
    ledger.save()
    _marker(work / "base-unet.done", {"unet": steps["unet"]} | dataclasses.asdict(base_loss))


#: Step 3's further runs, in order: (name, learning rate, seed offset). Each trains the base UNet and the text
#: encoders on (a fresh cosine, new pictures) with the pooled embedding of the caption without colour and shape,
#: so the UNet reads both through cross-attention; ``unet_more`` goes on where ``unet_place`` ended, for the small
#: shapes (docs/DEMO.md).
PLACE_RUNS = (("unet_place", 5e-4, 1), ("unet_more", 5e-4, 2))


def _place_state(work: Path, name: str) -> Path:
    """A place run's state file; ``unet_place`` keeps the name it had alone, so its stopped runs resume."""
    return work / ("base-place-state.pt" if name == "unet_place" else f"base-{name}-state.pt")


def _place_base(work: Path, ledger: Ledger, steps: dict[str, int], seed: int, base_loss: BaseLoss) -> None:
    """Step 3b: the base UNet (and text encoders) trained further in the runs of :data:`PLACE_RUNS` with
    ``pooled_from="placement"`` (:func:`~easyref_cli.demo.base.train_base_unet`), each resumable and
    then checked from text with that pooled embedding."""
    from diffusers import StableDiffusionXLPipeline

    sdxl = work / "sdxl"
    for name, lr, offset in PLACE_RUNS:
        done = work / f"base-{name}.done"
        marker = {name: steps[name], "lr": lr} | dataclasses.asdict(base_loss)
        if done.exists():
            _marker(done, marker)
            continue
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
        run = functools.partial(
            base.train_base_unet, pipe, steps[name], seed=seed + offset, lr=lr, state=_place_state(work, name),
            pooled_from="placement", **dataclasses.asdict(base_loss),
        )  # fmt: skip
        record = ledger.record[name] = ledger.timed(name, run, planned=steps[name])
        check = functools.partial(base.from_text_accuracy, pipe, pooled_from="placement")
        record["from_text"] = ledger.timed(f"{name}_check", check)
        _log(f"base model from text after {name}, pooled from the placement: {record['from_text']}")
        _save_pipeline(pipe, sdxl)
        ledger.save()
        _marker(done, marker)


def _pretrain_mllm(work: Path, ledger: Ledger, steps: dict[str, int], seed: int) -> None:
    """Step 4: the tiny Qwen2-VL in ``work/qwen2vl`` pre-trained to describe the pictures
    (:mod:`easyref_cli.demo.mllm`), in the runs of :data:`MLLM_RUNS`, each resumable from its state
    file and checked after it."""
    from easyref_cli.demo.mllm import pretrain_qwen2vl, reading_accuracy

    mllm = work / "qwen2vl"
    for name, lr, offset in MLLM_RUNS:
        done, marker = work / f"base-{name}.done", {"qwen2vl": steps[name]}
        if done.exists():
            _marker(done, marker)
            continue
        state = work / (MLLM_STATE if name == "mllm" else f"qwen2vl-{name}-state.pt")
        run = functools.partial(pretrain_qwen2vl, mllm, steps[name], seed=seed + offset, lr=lr, state=state, log=_log)
        trained = ledger.timed(name, run, planned=steps[name])
        trained["reads"] = ledger.timed(f"{name}_check", functools.partial(reading_accuracy, mllm))
        _log(f"qwen2vl reads after {name}: {trained['reads']}")
        ledger.record[name] = trained
        ledger.save()
        _marker(done, marker)


def _stage_reached(out: Path) -> int:
    """The last step a stage's ``easyref train`` run in ``out`` saved (0 if none)."""
    saved = [int(p.stem.split("-")[1]) for p in out.glob("checkpoint-*.safetensors")]
    return max(saved, default=0) if (out / "state").is_dir() or (out / "state.old").is_dir() else 0


def _built_on(work: Path, init: Path | None, mask_weight: float, run: StageRun, steps: int) -> dict:
    """What a stage trains on and how: the base UNet's and Qwen2-VL's markers, the sha256 of the
    checkpoint it starts from, its loss's mask weight and its :class:`StageRun` settings, with its step
    count where the schedule depends on it (a decay to zero over N steps is another run than over M; a
    constant rate just goes on)."""
    import hashlib

    runs = {name: work / f"base-{name}.done" for name, _, _ in (*PLACE_RUNS, *MLLM_RUNS)}
    return {
        "base": (work / "base-unet.done").read_text(),
        "mllm": None,  # a folder built before step 4 (the run's marker replaces it)
        **{name: done.read_text() for name, done in runs.items() if done.exists()},
        "init": hashlib.sha256(init.read_bytes()).hexdigest() if init is not None else None,
        "mask_weight": mask_weight,
        "run": dataclasses.asdict(run) | ({} if run.lr_scheduler == "constant" else {"steps": steps}),
    }


def _only_steps_fewer(old: dict | None, new: dict, reached: int) -> bool:
    """Whether a stage folder stamped ``old`` differs from ``new`` only in a decaying run's step count,
    asked below the steps it reached: it is kept (and the build stops: fewer steps never delete one)."""
    if old is None:
        return False
    old_run, new_run = dict(old.get("run", {})), dict(new["run"])
    old_steps, new_steps = old_run.pop("steps", None), new_run.pop("steps", None)
    same = old | {"run": old_run} == new | {"run": new_run}
    return same and old_steps is not None and new_steps is not None and new_steps < reached


@dataclass(frozen=True)
class StageRun:
    """One ``easyref train`` run of step 5: its name (``WORK/train-<name>``, its ``--steps`` key), the
    ``--stage`` it runs and its optimiser settings."""

    name: str
    stage: str
    batch_size: int
    learning_rate: float
    lr_scheduler: str = "constant"
    seed_offset: int = 0


#: Step 5, in order, each starting from the one before. ``anneal`` continues ``multi`` (its data, a new
#: data order) with the rate decayed to zero (cosine): a constant rate, then a decay, as warmup-stable-decay
#: schedules do. The constant-rate run ends wherever its last steps left it; the decayed one settles
#: (the held-out evidence: shape 36% → 62% with 2,400 steps, 74% with 7,200 on the base before ``unet_more``,
#: docs/DEMO.md).
STAGE_RUNS = (
    StageRun("align", "align", 16, 1e-3),
    StageRun("single", "single", 16, 5e-4),
    StageRun("multi", "multi", 8, 5e-4),
    StageRun("anneal", "multi", 8, 5e-4, "cosine", seed_offset=1),
)


def _train_easyref(
    work: Path, ledger: Ledger, steps: dict[str, int], seed: int, *, quick: bool, mask_weight: float
) -> Path:
    """Step 5: training data, then the runs of :data:`STAGE_RUNS`; the last checkpoint.
    A stage that already reached its steps on the same base and start is kept, one that stopped short
    resumes (``easyref train --resume``); one whose base or start changed (the stage before it trained
    again), or whose run settings did (:data:`STAGE_RUNS`; the step count of a decaying run), restarts,
    and its time starts again from zero (``runs`` keeps every run)."""
    sdxl, mllm = work / "sdxl", work / "qwen2vl"
    data_root = work / "data"
    groups = 40 if quick else 400
    if not (data_root / "multi.json").exists():
        ledger.timed("data", lambda: write_training_data(data_root, groups=groups, per_group=6, seed=seed))
    _marker(work / "data.done", {"groups": groups, "per_group": 6, "seed": seed, "masks": True})
    data = {run.stage: data_root / f"{run.stage}.json" for run in STAGE_RUNS}
    init = None
    for run in STAGE_RUNS:
        name = run.name
        out, built_on = work / f"train-{name}", _built_on(work, init, mask_weight, run, steps[name])
        stamp = out / "built-on.json"
        old = json.loads(stamp.read_text()) if stamp.exists() else None
        reached = _stage_reached(out)
        if out.exists() and old != built_on and not _only_steps_fewer(old, built_on, reached):
            _log(f"{name}: {out} was trained on another base, start, loss or run; training it again")
            shutil.rmtree(out)
            reached = 0
        if reached > steps[name]:
            raise SystemExit(
                f"{out} reached step {reached}, more than the {steps[name]} asked for; pass --steps "
                f"{name}={reached} (or more), or use another WORK folder"
            )
        if reached == steps[name]:
            _log(f"{name}: {out} reached step {reached}; reusing it")
            init = out / f"checkpoint-{reached}.safetensors"
            continue
        if not reached:
            shutil.rmtree(out, ignore_errors=True)
            ledger.record["seconds"][name] = 0.0
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(built_on) + "\n")
        ledger.record[f"{name}_settings"] = dataclasses.asdict(run) | {"mask_weight": mask_weight}
        init = ledger.timed(
            name,
            functools.partial(
                run_stage, run.stage, data=data, data_root=data_root, sdxl=sdxl, mllm=mllm, out=out,
                steps=steps[name], init=init, seed=seed + run.seed_offset, batch_size=run.batch_size,
                learning_rate=run.learning_rate, lr_scheduler=run.lr_scheduler, resume=reached > 0,
                mask_weight=mask_weight,
            ),
            steps_from=reached, steps_to=steps[name],
        )  # fmt: skip
    return init


def build(
    work: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    install: bool = False,
    base_only: bool = False,
    base_from: Path | None = None,
    steps: dict[str, int] | None = None,
    base_loss: BaseLoss = BaseLoss(),
    mask_weight: float = STAGE_MASK_WEIGHT,
) -> dict:
    """Run the recipe in ``work`` (see the module docstring), continuing whatever an earlier run in
    ``work`` left; returns what ``build.json`` records."""
    planned = {k: max(2, v // 20) if quick else v for k, v in STEPS.items()} | (steps or {})
    work.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(work, {"seed": seed, "steps": planned, "lora_rank": LORA_RANK})

    # 1.-3. base models, VAE and base UNet; 4. the tiny Qwen2-VL taught to describe the pictures
    _build_base(work, ledger, planned, seed, base_from, base_loss)
    _place_base(work, ledger, planned, seed, base_loss)
    _pretrain_mllm(work, ledger, planned, seed)
    if base_only:
        return ledger.record

    # 5. EasyRef stages; 6. install
    init = _train_easyref(work, ledger, planned, seed, quick=quick, mask_weight=mask_weight)
    shutil.copyfile(init, work / "easyref.safetensors")
    ledger.save()
    if install:
        install_model(work)
    return ledger.record


def install_model(work: Path, target: Path = WEIGHTS_DIR) -> Path:
    """Copy the parts ``--model demo`` needs from a build folder into ``target`` (a demo ControlNet
    there is dropped: it belongs to the UNet it was trained on; ``demo.controlnet`` trains a new one)."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copytree(work / "sdxl", staging / "sdxl")
    shutil.copytree(work / "qwen2vl", staging / "qwen2vl")
    for name in ("easyref.safetensors", "build.json"):
        shutil.copyfile(work / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _log(f"installed into {target}")
    return target


def _steps_option(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in STEPS or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected STEP=N with STEP one of {', '.join(STEPS)}, got {text!r}")
    return name, int(value)


_TERMINATED = False


def _interrupt(signum, frame) -> None:
    global _TERMINATED
    _TERMINATED = True
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easyref_cli.demo.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="build folder (models, data, training runs); a rerun continues it")
    parser.add_argument(
        "--quick", action="store_true", help="1/20 of the steps: checks the recipe runs, trains nothing useful"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true", help=f"copy the result into {WEIGHTS_DIR}")
    parser.add_argument(
        "--base-from", type=Path, metavar="BUILD",
        help="start from a previous build (or the installed weights): its VAE, text encoders and Qwen2-VL, a new UNet",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=_steps_option, action="append", default=[], metavar="STEP=N",
        help=f"another step count (defaults: {', '.join(f'{k}={v}' for k, v in STEPS.items())}); "
        "a stage given more steps than it reached resumes",
    )  # fmt: skip
    parser.add_argument("--base-only", action="store_true", help="stop after the base models (steps 1-4)")
    parser.add_argument(
        "--attribute-loss", type=float, default=BaseLoss.attribute_loss, metavar="W",
        help="base pre-training also trains heads reading the caption's cell, size, colour and shape off the "
        "pooled text embedding, at weight W (0 turns it off; it made the base use position words; docs/DEMO.md)",
    )  # fmt: skip
    parser.add_argument(
        "--shape-weight", type=float, default=BaseLoss.shape_weight, metavar="W",
        help="base pre-training weights the diffusion loss 1 + W on and around the drawn shape (0: plain loss)",
    )  # fmt: skip
    parser.add_argument(
        "--mask-weight", type=float, default=STAGE_MASK_WEIGHT, metavar="W",
        help="the EasyRef stages train with easyref train --mask-weight W: the loss weighted 1 + W on and around "
        "the drawn shape (default 0: the official plain loss, as the shipped weights)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops a step as Ctrl-C does: its time is recorded
    record = build(
        args.work, quick=args.quick, seed=args.seed, install=args.install, base_only=args.base_only,
        base_from=args.base_from, steps=dict(args.steps),
        base_loss=BaseLoss(args.attribute_loss, args.shape_weight), mask_weight=args.mask_weight,
    )  # fmt: skip
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
