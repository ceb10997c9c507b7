"""Which models a run uses: ``--model`` families and the ``--base-model/--mllm/--adapter`` ids.

Torch-free: a plan only needs the ids (paths or hub ids). The tiny family's weights are built by
:func:`ensure_built` when a run first needs them (never for ``--dry-run``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref_cli.constants import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, DEFAULT_MLLM
from easyref_cli.env import easyref_home
from easyref_cli.errors import UsageError
from easyref_cli.settings import choice_error

#: ``--model`` families. ``tiny``: random tiny models built locally (pictures are noise);
#: ``demo``: the tiny EasyRef shipped in the package, trained on synthetic coloured shapes.
MODEL_CHOICES = ("tiny", "demo")
TINY_DEFAULTS = {"width": 64, "height": 64, "steps": 4}
#: The demo model's domain is 64² pictures; the settings ``easyref_cli.demo.evidence`` measured it with.
#: It was trained and measured with an encoded empty negative prompt (its SDXL config does not zero
#: empty negatives, so ``zero_negative: empty`` encodes ``""`` and keeps the job ids it always had).
DEMO_DEFAULTS = {
    "width": 64,
    "height": 64,
    "steps": 25,
    "guidance": 5.0,
    "negative_prompt": "",
    "zero_negative": "empty",
}
#: A family's settings rank with the built-in defaults, below the preset.
MODEL_DEFAULTS = {"tiny": TINY_DEFAULTS, "demo": DEMO_DEFAULTS}
MODEL_NOTICES = {
    "tiny": "--model tiny: tiny RANDOM models built locally for a smoke run — the pipeline is real, "
    "the pictures are noise.",
    "demo": "--model demo: a tiny EasyRef trained on synthetic coloured shapes (64×64): it takes the colour "
    "from the references and the position and size from the prompt ('a large shape at the top left'), and "
    "the references' shape in most pictures (85% on held-out groups); a control image steers the outline "
    "(--controlnet demo --control-image FILE --control-preprocess canny; docs/DEMO.md).",
}


@dataclass(frozen=True)
class ModelIds:
    """The models of a run, as given (hub ids or local paths): the three EasyRef needs, and what the
    SDXL ecosystem adds — a ``vae`` to replace the base model's, the ``base_config`` folder a
    single-file base model takes its component configs from, and community ``loras`` as
    ``(file or hub id, weight)`` pairs fused in order after EasyRef's own LoRA, and the ``controlnets``
    (folders or hub ids; ``tiny``: the tiny family's) in order."""

    base_model: str = DEFAULT_BASE_MODEL
    mllm: str = DEFAULT_MLLM
    adapter: str = DEFAULT_ADAPTER
    vae: str | None = None
    base_config: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    controlnets: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, str]:
        """The three EasyRef models (what records and job ids always carried)."""
        return {"base_model": self.base_model, "mllm": self.mllm, "adapter": self.adapter}

    def extras(self) -> dict[str, Any]:
        """The ecosystem models given (none of them: ``{}``, so plain runs keep their ids and records)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in ("vae", "base_config") if getattr(self, k) is not None}
        if self.loras:
            out["loras"] = [[spec, weight] for spec, weight in self.loras]
        if self.controlnets:
            out["controlnets"] = list(self.controlnets)
        return out


def _tiny_ids() -> dict[str, str]:
    from easyref_cli.tiny import tiny_layout  # torch-free at import

    tiny = tiny_layout(easyref_home() / "tiny-models")
    return {"base_model": str(tiny.base_model), "mllm": str(tiny.mllm), "adapter": str(tiny.adapter_lora)}


def _demo_ids() -> dict[str, str]:
    from easyref_cli.demo import weights_dir

    root = weights_dir()
    parts = (root / "sdxl", root / "qwen2vl", root / "easyref.safetensors")
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise UsageError(
            f"--model demo: the demo weights are missing ({', '.join(missing)}); reinstall easyref-cli, "
            "or rebuild them with `python -m easyref_cli.demo.build WORK_DIR --install`"
        )
    return {"base_model": str(parts[0]), "mllm": str(parts[1]), "adapter": str(parts[2])}


def chosen_models(
    model: str | None = None,
    base_model: str | None = None,
    mllm: str | None = None,
    adapter: str | None = None,
) -> dict[str, str]:
    """The model ids the command line chose: a ``--model`` family's, or the ids given (a subset).

    The plan puts them over the defaults; a replay over the record's.

    Raises:
        UsageError: unknown family, a family together with explicit ids, missing demo weights.
    """
    if model is None:
        given = {"base_model": base_model, "mllm": mllm, "adapter": adapter}
        return {k: v for k, v in given.items() if v is not None}
    if model not in MODEL_CHOICES:
        raise UsageError(choice_error("--model", model, MODEL_CHOICES))
    if any(v is not None for v in (base_model, mllm, adapter)):
        raise UsageError(f"--model {model} replaces --base-model/--mllm/--adapter; give one or the other")
    return _demo_ids() if model == "demo" else _tiny_ids()


def ensure_built(family: str | None, controlnet: bool = False) -> None:
    """Build the tiny family's models on first use (once per ``EASYREF_HOME``), and its ControlNet
    when ``controlnet``."""
    if family == "tiny":
        from easyref_cli.tiny import ensure_tiny_controlnet, ensure_tiny_models

        home = easyref_home()
        folder = home / "tiny-models"
        try:
            ensure_tiny_models(folder)
            if controlnet:
                ensure_tiny_controlnet(folder)
        except OSError as exc:  # a read-only or foreign EASYREF_HOME: say where and what to change
            detail = exc.strerror or str(exc) or type(exc).__name__
            if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
                detail = f"{exc.filename} is not a folder"  # mkdir(exist_ok=True) met a file
            elif exc.strerror and exc.filename:
                detail = f"{exc.strerror}: {exc.filename}"
            raise UsageError(
                f"--model tiny cannot build its models in {folder} ({detail}); they are built there on first use: "
                f"set EASYREF_HOME (now {home}) to a writable folder, or pass --base-model/--mllm/--adapter"
            ) from None


#: ``--controlnet tiny`` / ``--controlnet demo``: a ``--model`` family's own ControlNet (tiny: random,
#: built next to its models on first use; demo: the canny ControlNet shipped with the demo weights).
FAMILY_CONTROLNETS = ("tiny", "demo")


def check_controlnet_family(controlnets: tuple[str, ...], family: str | None) -> None:
    """A family's ControlNet only goes with that ``--model`` family (it fits only that base)."""
    for spec in controlnets:
        if spec in FAMILY_CONTROLNETS and spec != family:
            raise UsageError(f"--controlnet {spec} is the {spec} family's ControlNet: use it with --model {spec}")
    if "demo" in controlnets and not family_controlnet_path("demo").is_dir():
        raise UsageError(
            f"--controlnet demo: the demo ControlNet is missing ({family_controlnet_path('demo')}); reinstall "
            "easyref-cli, or rebuild it with `python -m easyref_cli.demo.controlnet WORK_DIR --install`"
        )


def family_controlnet_path(spec: str) -> Path:
    """Where a family's ControlNet is (:func:`ensure_built` builds the tiny one)."""
    if spec == "demo":
        from easyref_cli.demo import weights_dir

        return weights_dir() / "controlnet"
    return easyref_home() / "tiny-models" / "controlnet"


def check_extra_models(models: ModelIds) -> None:
    """``--vae``, ``--base-config`` and each LoRA name an existing path or a hub id (checked at planning).

    Raises:
        UsageError: naming the flag and the value.
    """
    from pathlib import Path

    from easyref_cli.model.hub import is_hub_spec  # torch-free

    if models.base_config is not None and Path(models.base_model).expanduser().is_dir():
        raise UsageError(
            f"--base-config is for a single-file --base-model; {models.base_model} is a diffusers folder with its own configs"
        )
    given = [("--vae", models.vae), ("--base-config", models.base_config)]
    given += [("--lora", spec) for spec, _ in models.loras]
    given += [("--controlnet", spec) for spec in models.controlnets if spec not in FAMILY_CONTROLNETS]
    for flag, spec in given:
        if spec is None or Path(spec).expanduser().exists() or is_hub_spec(spec):
            continue
        raise UsageError(f"{flag} {spec}: no such file or folder (and not a hub id like owner/name or owner/name/file)")
    base = Path(models.base_model).expanduser()
    for spec in models.controlnets:  # a local ControlNet for another base: exit 2 now, not after encoding
        if spec not in FAMILY_CONTROLNETS and Path(spec).expanduser().is_dir():
            from easyref_cli.model.control import check_controlnet  # torch-free

            check_controlnet(Path(spec).expanduser(), base if base.is_dir() else None)
