"""``--from-image``: what a recorded image needs to be made again — its record read and checked, its
reference files found (relative ones under ``--groups-root``) with their recorded sha256, its models
(the command line's, else the recorded family's, else the record's) and its noise device. Torch-free;
:func:`easyref_cli.plan.build_plan` turns the result into a one-job plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from easyref_cli import files
from easyref_cli.errors import UsageError
from easyref_cli.files import Group, sha256_file
from easyref_cli.inputs import JobInputs
from easyref_cli.model.hub import is_hub_spec  # torch-free
from easyref_cli.models import FAMILY_CONTROLNETS, MODEL_DEFAULTS, ModelIds, chosen_models
from easyref_cli.records import Replay, parse_record
from easyref_cli.runtime import Runtime


@dataclass(frozen=True)
class ReplayInputs:
    """A record's image, ready to plan: the parsed record, its group, models and runtime."""

    replay: Replay
    group: Group
    models: ModelIds
    family: str | None
    runtime: Runtime
    recorded_identity: dict[str, Any]  # the record's ``model_identity`` ({} before 0.3)
    inputs: JobInputs | None = None  # its control/init/mask images, found with their recorded content

    def check_identity(self, identity: dict[str, Any], source: str) -> None:
        """The ``--vae``, ``--base-config``, LoRAs and ControlNets found have the recorded content."""
        for key in ("vae", "base_config", "loras", "controlnets"):
            if key in self.recorded_identity and identity.get(key) != self.recorded_identity[key]:
                raise UsageError(
                    f"{source}: its {key.replace('_', ' ')} had other content ({self.recorded_identity[key]}); "
                    f"the one found is {identity.get(key)} — pass the file it was made with"
                )


def read_replay(
    image: Path, chosen: dict[str, Any], family: str | None, runtime: Runtime, groups_root: Path | None = None,
    refuse: Sequence[str] = (),
) -> ReplayInputs:  # fmt: skip
    """The record of ``image``, checked: references present and unchanged, models locatable, the
    noise device of ``seed_mode: official`` kept. ``refuse``: setting flags given on the command line,
    which a replay cannot take (said once the image is known to hold a record).

    Raises:
        UsageError: a missing or changed reference, a model to pass, another noise device, a setting flag.
        InputError: an unusable record.
    """
    record = files.read_png_record(image)
    if refuse:
        raise UsageError(
            f"--from-image takes its settings from the image's record; {', '.join(refuse)} cannot change them"
        )
    source = str(image)
    replay = parse_record(record, source=source)
    root = Path(groups_root) if groups_root is not None else Path.cwd()
    refs = _replay_references(replay, root, source)
    inputs = _replay_inputs(replay.inputs, root, source)
    recorded_device = record.get("device")
    if replay.settings.seed_mode == "official" and isinstance(recorded_device, str):
        # its noise stream was drawn on that kind of device: another kind gives another picture
        if runtime.device is None:
            runtime = replace(runtime, device=recorded_device)
        elif runtime.device.split(":")[0] != recorded_device:
            raise UsageError(
                f"{source}: its seed_mode official noise was drawn on {recorded_device}; replay it with "
                f"--device {recorded_device} (another device type draws another stream)"
            )
    if chosen.get("controlnets") and not replay.models.get("controlnets"):
        raise UsageError(f"{source}: the image was made without a ControlNet; give no --controlnet to replay it")
    models, family = _replay_models(record, replay, chosen, family, source)
    group = Group(name=replay.group, path=refs[0].parent, images=refs, ignored=())
    recorded = record.get("model_identity") if isinstance(record.get("model_identity"), dict) else {}
    return ReplayInputs(replay, group, models, family, runtime, recorded, inputs)


def _replay_references(replay, root: Path, source: str) -> tuple[Path, ...]:
    """The recorded references, relative ones under ``root``, each present with its recorded sha256."""
    hint = f" under {root} (--groups-root sets where references are)"
    return tuple(
        _found(recorded, digest, [root], "reference image", source, hint=hint, its="")
        for recorded, digest in zip(replay.references, replay.reference_sha256, strict=True)
    )


def _found(
    recorded: Path, digest: str | None, roots: list[Path], what: str, source: str, *, hint: str, its: str = "its "
) -> Path:  # fmt: skip
    """A recorded file — a relative one under the first of ``roots`` that has it — present with its
    recorded sha256 (``hint`` says where relative ones were looked for)."""
    candidates = [recorded] if recorded.is_absolute() else [r / recorded for r in roots]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UsageError(f"{source}: {its}{what} {recorded}{'' if recorded.is_absolute() else hint} no longer exists")
    if digest and sha256_file(path) != digest:
        raise UsageError(
            f"{source}: {its}{what} {path} has changed since the image was made (sha256 {digest[:12]}… recorded)"
        )
    return path


def _replay_inputs(recorded: dict[str, Any] | None, root: Path, source: str) -> JobInputs | None:
    """The recorded control/init/mask images, found and unchanged."""
    if recorded is None:
        return None
    roots, hint = [Path.cwd(), root], f" (looked in the current folder and under {root})"
    control = [(_found(p, d, roots, "control image", source, hint=hint), d) for p, d in recorded["control"]]
    found = {k: (_found(recorded[k][0], recorded[k][1], roots, what, source, hint=hint), recorded[k][1])
             for k, what in (("init", "init image"), ("mask", "mask")) if k in recorded}  # fmt: skip
    return JobInputs(
        name=recorded.get("name"), control=tuple(p for p, _ in control), control_sha256=tuple(d for _, d in control),
        init=found["init"][0] if "init" in found else None, init_sha256=found["init"][1] if "init" in found else None,
        mask=found["mask"][0] if "mask" in found else None, mask_sha256=found["mask"][1] if "mask" in found else None,
    )  # fmt: skip


def _replay_models(record: dict, replay, chosen: dict[str, str], family: str | None, source: str):
    """Models: those chosen on the command line, else the record's family, else the record's ids; a
    model the record names without its path (records leave paths out) must be given."""
    if not chosen and family is None and record.get("model") in MODEL_DEFAULTS:
        family = record["model"]
        chosen = chosen_models(family)
    models = ModelIds(**{**replay.models, **chosen})
    given = [(key, getattr(models, key), flag) for key, flag in _MODEL_FLAGS if getattr(models, key) is not None]
    given += [("loras", spec, "--lora") for spec, _ in models.loras]
    given += [("controlnets", spec, "--controlnet") for spec in models.controlnets if spec not in FAMILY_CONTROLNETS]
    for key, value, flag in given:
        if key not in chosen and not Path(value).is_absolute() and not Path(value).exists() and not is_hub_spec(value):
            what = {"loras": "LoRA", "controlnets": "ControlNet"}.get(key, key.replace("_", " "))
            raise UsageError(
                f"{source}: the record names its {what} {value!r} without its location "
                f"(records leave local paths out); pass {flag} PATH"
            )
    return models, family


_MODEL_FLAGS = (("base_model", "--base-model"), ("mllm", "--mllm"), ("adapter", "--adapter"), ("vae", "--vae"),
                ("base_config", "--base-config"))  # fmt: skip
