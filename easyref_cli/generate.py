"""``easyref generate``: options → Plan → (dry-run listing | run). Torch-free at import.

Kept out of ``cli.py`` so tests reach it without Typer, and so ``--dry-run`` never imports torch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from easyref_cli import files
from easyref_cli.constants import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, DEFAULT_MLLM, OFFLOAD_CHOICES, QWEN_SPECIAL_TOKENS
from easyref_cli.errors import UsageError
from easyref_cli.plan import Plan, build_plan, plan_from_record

logger = logging.getLogger(__name__)

#: ``--model`` families. ``tiny``: random tiny models built locally (pictures are noise);
#: ``demo``: the tiny EasyRef shipped in the package, trained on synthetic coloured shapes.
MODEL_CHOICES = ("tiny", "demo")
TINY_DEFAULTS = {"width": 64, "height": 64, "steps": 4}
#: The demo model's domain is 64² pictures; the settings ``easyref_cli.demo.evidence`` measured it with.
DEMO_DEFAULTS = {"width": 64, "height": 64, "steps": 25, "guidance": 5.0}
MODEL_DEFAULTS = {"tiny": TINY_DEFAULTS, "demo": DEMO_DEFAULTS}
MODEL_NOTICES = {
    "tiny": "--model tiny: tiny RANDOM models built locally for a smoke run — the pipeline is real, "
    "the pictures are noise.",
    "demo": "--model demo: a tiny EasyRef trained on synthetic coloured shapes (64×64): it takes the colour "
    "from the references; prompts name only a size and a position ('a large shape at the top left'); it "
    "follows the size, the position loosely, and draws blobs rather than the references' shape (docs/DEMO.md).",
}


_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|npu|meta)(:\d+)?$")


def check_device_name(device: str | None) -> None:
    """Spelling only (torch-free); whether the device exists is checked before models load."""
    if device is not None and not _DEVICE.match(device):
        raise UsageError(f"--device {device!r} is not a device name: use cpu, cuda, cuda:N, mps…")


def check_special_tokens(plan: Plan) -> None:
    """Qwen2-VL control tokens in a prompt would be read as structure (an extra image slot…)."""
    for job in plan.jobs:
        for what, text in (("prompt", job.caption), ("instruction", job.instruction)):
            found = [t for t in QWEN_SPECIAL_TOKENS if t in text]
            if found:
                raise UsageError(
                    f"the {what} of prompt {job.prompt_id!r} contains Qwen2-VL control token(s) "
                    f"{', '.join(found)}; remove them"
                )


def easyref_home() -> Path:
    """User state (tiny models, condition cache): ``$EASYREF_HOME`` or ``~/.cache/easyref``."""
    env = os.environ.get("EASYREF_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "easyref"


def tiny_model_paths(*, build: bool = True) -> tuple[str, str, str]:
    """``(base_model, mllm, adapter)`` of the tiny smoke models, built once unless ``build=False``
    (a dry run only needs the paths)."""
    from easyref_cli.tiny import ensure_tiny_models, tiny_layout

    root = easyref_home() / "tiny-models"
    tiny = ensure_tiny_models(root) if build else tiny_layout(root)
    return str(tiny.base_model), str(tiny.mllm), str(tiny.adapter_lora)


def demo_model_paths() -> tuple[str, str, str]:
    """``(base_model, mllm, adapter)`` of the demo model shipped in the package."""
    from easyref_cli.demo import weights_dir

    root = weights_dir()
    parts = (root / "sdxl", root / "qwen2vl", root / "easyref.safetensors")
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise UsageError(
            f"--model demo: the demo weights are missing ({', '.join(missing)}); reinstall easyref-cli, "
            "or rebuild them with `python -m easyref_cli.demo.build WORK_DIR --install`"
        )
    return str(parts[0]), str(parts[1]), str(parts[2])


def model_paths(model: str, *, dry_run: bool) -> tuple[str, str, str]:
    """``(base_model, mllm, adapter)`` of a ``--model`` family (one of :data:`MODEL_CHOICES`)."""
    if model == "demo":
        return demo_model_paths()
    return tiny_model_paths(build=not dry_run)


def make_plan(
    *,
    groups: Sequence[Path],
    out_dir: Path,
    prompts_file: Path | None,
    prompt: str | None,
    from_image: Path | None,
    preset: str | None,
    options: Mapping[str, Any],
    model: str | None,
    base_model: str | None,
    mllm: str | None,
    adapter: str | None,
    device: str | None,
    dtype: str | None,
    attention: str | None,
    name_template: str | None,
    overwrite: bool,
    fail_fast: bool,
    dry_run: bool = False,
) -> Plan:
    """Every usage/config check happens here, before any model loads."""
    check_device_name(device)
    model_defaults: Mapping[str, Any] | None = None
    if model is not None:
        if model not in MODEL_CHOICES:
            raise UsageError(f"--model must be one of {', '.join(MODEL_CHOICES)}, got {model!r}")
        if any(v is not None for v in (base_model, mllm, adapter)):
            raise UsageError(f"--model {model} replaces --base-model/--mllm/--adapter; give one or the other")
        base_model, mllm, adapter = model_paths(model, dry_run=dry_run)
        model_defaults = MODEL_DEFAULTS[model]
    if from_image is not None:
        if groups or prompts_file or prompt or preset:
            raise UsageError("--from-image regenerates one recorded image: give no GROUPS, --prompts, --prompt or --preset")
        record = files.read_png_record(Path(from_image))
        given = sorted(k for k, v in options.items() if v is not None and k != "batch_size")
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageError(f"--from-image takes its settings from the image's record; {flags} cannot change them")
        plan = plan_from_record(
            record,
            out_dir=out_dir,
            source=str(from_image),
            base_model=base_model,
            mllm=mllm,
            adapter=adapter,
            device=device,
            dtype=dtype,
            attention=attention or "auto",
            batch_size=int(options.get("batch_size") or 1),
            overwrite=overwrite,
            fail_fast=fail_fast,
            name_template=name_template,
        )
        check_special_tokens(plan)
        return plan
    if not groups:
        raise UsageError("give at least one GROUPS folder (or --from-image IMAGE.png)")
    plan = build_plan(
        groups=groups,
        out_dir=out_dir,
        prompts_file=prompts_file,
        prompt=prompt,
        preset=preset,
        cli=options,
        base_model=base_model or DEFAULT_BASE_MODEL,
        mllm=mllm or DEFAULT_MLLM,
        adapter=adapter or DEFAULT_ADAPTER,
        device=device,
        dtype=dtype,
        attention=attention or "auto",
        overwrite=overwrite,
        fail_fast=fail_fast,
        name_template=name_template,
        model_defaults=model_defaults,
    )
    check_special_tokens(plan)
    for group in plan.groups:
        for path in group.ignored:
            logger.info("group %s: ignoring %s (hidden or not an image)", group.name, path)
    return plan


def generate(
    *,
    dry_run: bool = False,
    json_lines: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    no_cache: bool = False,
    compile: bool = False,
    offload: str | None = None,
    num_processes: int | None = None,
    argv: list[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    **plan_kwargs: Any,
) -> int:
    """Plan, then either describe (``dry_run``) or run. Returns the exit code."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if offload is not None and offload not in OFFLOAD_CHOICES:
        raise UsageError(f"--offload must be one of {', '.join(OFFLOAD_CHOICES)}, got {offload!r}")
    plan = make_plan(dry_run=dry_run, **plan_kwargs)
    if plan_kwargs.get("model") in MODEL_NOTICES and progress:
        print(MODEL_NOTICES[plan_kwargs["model"]], file=stderr)
    if dry_run:
        if json_lines:
            import json

            for job in plan.jobs:
                entry = job.to_dict()
                entry["exists"] = plan.output_path(job).exists()
                stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")
        else:
            stdout.write(plan.describe() + "\n")
        return 0

    if num_processes is not None and num_processes > 1:
        from easyref_cli import distributed

        if distributed.is_distributed():
            raise UsageError("--num-processes is for a plain `easyref generate`; under accelerate launch, give accelerate --num_processes")
        args = distributed.strip_option(sys.argv[1:] if argv is None else argv, "--num-processes")
        return distributed.relaunch(num_processes, args)

    from easyref_cli import runner

    options = runner.RunOptions(
        cache_dir=None if no_cache else (cache_dir or easyref_home() / "conditions"),
        compile=compile,
        offload=offload or "none",
    )
    summary = runner.run_plan(plan, progress=progress, json_out=stdout if json_lines else None, options=options)
    if summary.worker:
        return summary.exit_code
    if progress or summary.failed or summary.interrupted:
        print(summary.line(), file=stderr)
        for err in summary.errors[:20]:
            print(f"  failed: {err}", file=stderr)
    from easyref_cli import distributed

    if distributed.report_status(summary.exit_code):
        return 0
    return summary.exit_code
