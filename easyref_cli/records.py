"""Provenance records: Job → the ``easyref`` JSON stored in each PNG, and back for ``--from-image``.

Torch-free. The record's setting keys are the schema's identity settings
(:func:`easyref_cli.settings.identity_values`); the run adds ``adapter_sha256``, ``versions``,
``attention``, ``device``, ``dtype`` and ``compile``. See :mod:`easyref_cli.files` for the layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref_cli import __version__
from easyref_cli.constants import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, DEFAULT_MLLM
from easyref_cli.errors import InputError
from easyref_cli.files import Group, sha256_file
from easyref_cli.jobs import Job
from easyref_cli.model.hub import is_hub_spec  # torch-free
from easyref_cli.naming import slugify
from easyref_cli.settings import (
    CONTROL_SCHEMA,
    IDENTITY_KEYS,
    SPECS,
    GenerationSettings,
    Invalid,
    as_int,
    from_record,
    identity_values,
    record_types,
    validate_settings,
)

logger = logging.getLogger(__name__)

#: The record layout this version writes and reads: 1, or 2 (3) once it carries a setting added since
#: (3: control, init or mask images — a reader that does not know them must not regenerate it without).
RECORD_SCHEMA = CONTROL_SCHEMA
#: The record's ``inputs`` keys: the paired name, control images (a list), init image, mask.
INPUT_ENTRIES = ("control", "init", "mask")
_TEXTS = {"prompt": (str,), "caption": (str,)}


#: ``--record-paths``: ``relative`` (default) keeps locations in a shareable form — references as
#: ``group/file`` under the groups root, local models by their folder or file name, hub ids as they
#: are — ``absolute`` writes the full paths into every PNG.
RECORD_PATHS_CHOICES = ("relative", "absolute")


def reference_entries(group: Group) -> list[dict[str, str]]:
    """``[{"path": absolute path, "sha256": hex}]`` for a group's images, in encoding order."""
    return [{"path": str(p.resolve()), "sha256": sha256_file(p)} for p in group.images]


def model_label(spec: str) -> str:
    """How a record names a model without its location: a hub id (``owner/name`` or
    ``owner/name/file``) as given, a local path by its name."""
    return spec if is_hub_spec(spec) else Path(spec).name


def relative_references(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The record's references as ``group/file`` (relative to the groups root), hashes kept."""
    return [{**ref, "path": f"{record['group']}/{Path(ref['path']).name}"} for ref in record.get("references", [])]


def shareable(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with no absolute path in it: references as ``group/file`` (relative to the groups
    root), local models by name. Hashes, settings and everything else are kept."""
    out = dict(record)
    out["references"] = relative_references(record)
    for key in ("base_model", "mllm", "adapter", "vae", "base_config"):
        if isinstance(out.get(key), str):
            out[key] = model_label(out[key])
    if isinstance(out.get("loras"), list):
        out["loras"] = [{**lora, "path": model_label(lora["path"])} for lora in out["loras"]]
    if isinstance(out.get("controlnets"), list):
        out["controlnets"] = [{**c, "path": model_label(c["path"])} for c in out["controlnets"]]
    if isinstance(out.get("inputs"), dict):
        out["inputs"] = {k: _relative_inputs(v) if k in INPUT_ENTRIES else v for k, v in out["inputs"].items()}
    return out


def _relative_inputs(entry: Any) -> Any:
    """An input image's path relative to the current folder (where a replay looks first)."""
    if isinstance(entry, list):
        return [_relative_inputs(e) for e in entry]
    import os

    try:
        shown = Path(os.path.relpath(entry["path"], Path.cwd().resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        shown = Path(entry["path"]).name
    return {**entry, "path": shown}


def job_record(
    job: Job, models: Mapping[str, str], *, references: Sequence[Mapping[str, str]] | None = None
) -> dict[str, Any]:
    """The planning part of the provenance record for ``job``.

    ``models`` maps ``base_model``, ``mllm`` and ``adapter`` to the ids the plan used;
    ``references`` defaults to :func:`reference_entries` (hashing the files): pass it in to hash
    each group once.
    """
    if references is None:
        references = reference_entries(job.group)
    settings = identity_values(job.settings)
    inputs = {"inputs": job.inputs.record()} if job.inputs is not None else {}
    return {
        # 1 while it means what 0.1 records meant; 3 with input images
        "schema": max([1, *(SPECS[k].since for k in settings), *([CONTROL_SCHEMA] if inputs else [])]),
        "job_id": job.job_id,
        "group": job.group.name,
        "prompt_id": job.prompt_id,
        "index": job.index,
        "output": job.output.as_posix(),
        "prompt": job.prompt,
        "caption": job.caption,
        **settings,
        **{k: models[k] for k in ("base_model", "mllm", "adapter")},
        "preset": job.preset,
        "references": [dict(r) for r in references],
        **inputs,
        "version": __version__,
    }


@dataclass(frozen=True)
class Replay:
    """What a record says about the image it describes: enough to make it again."""

    prompt: str
    caption: str
    settings: GenerationSettings
    group: str
    prompt_id: str
    index: int
    models: Mapping[str, str]
    preset: str | None
    references: tuple[Path, ...]
    reference_sha256: tuple[str | None, ...]
    #: the record's ``inputs``: ``{"name": str?, "control": [(path, sha256)], "init": (path, sha256), "mask": ...}``
    inputs: Mapping[str, Any] | None = None


def _problems(record: Mapping[str, Any]) -> list[str]:
    """Missing or mistyped keys; settings newer than schema 1 are optional."""
    problems = []
    kinds = {**_TEXTS, **record_types(), "references": (list,)}
    for key, kind in kinds.items():
        if key not in record:
            if key not in SPECS or SPECS[key].since == 1:
                problems.append(f"{key}: missing")
        elif isinstance(record[key], bool) or not isinstance(record[key], kind):
            problems.append(f"{key}: unexpected value {record[key]!r}")
    for key, minimum in (("schema", 1), ("index", 0)):  # optional: a missing one means 1 and 0
        if key in record:
            try:
                as_int(record[key], minimum=minimum)
            except Invalid as e:
                problems.append(f"{key}: {e}")
    for key in ("group", "prompt_id", "preset"):
        if record.get(key) is not None and not isinstance(record[key], str):
            problems.append(f"{key}: must be a string, got {record[key]!r}")
    refs = record.get("references") if isinstance(record.get("references"), list) else []
    if not refs and "references" in record:
        problems.append("references: empty")
    for i, ref in enumerate(refs):
        if not isinstance(ref, Mapping) or not isinstance(ref.get("path"), str):
            problems.append(f"references[{i}]: needs a 'path'")
    return problems + _input_problems(record.get("inputs"))


def _input_problems(inputs: Any) -> list[str]:
    if inputs is None:
        return []
    if not isinstance(inputs, Mapping):
        return [f"inputs: unexpected value {inputs!r}"]
    problems = []
    for key in INPUT_ENTRIES:
        entries = inputs.get(key)
        if entries is None:
            continue
        if key == "control" and not isinstance(entries, list):
            problems.append("inputs.control: must be a list of {path, sha256}")
            continue
        for i, entry in enumerate(entries if key == "control" else [entries]):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
                problems.append(f"inputs.{key}{f'[{i}]' if key == 'control' else ''}: needs a 'path' and a 'sha256'")
    if inputs.get("name") is not None and not isinstance(inputs["name"], str):
        problems.append(f"inputs.name: must be a string, got {inputs['name']!r}")
    return problems


def recorded_inputs(record: Mapping[str, Any], *, log: logging.Logger = logger) -> list[tuple[str, str, str | None]]:
    """``(label, path as recorded, sha256)`` of each input image in a record's ``inputs``, in order:
    ``control`` (``control 1``, ``control 2``… when several), ``init``, ``mask``; ``[]`` for text-to-image.
    Malformed values are skipped (logged at debug on ``log``), never raised: the image itself is fine."""
    inputs = record.get("inputs")
    if inputs is None:
        return []
    if not isinstance(inputs, dict):
        log.debug("record %s: 'inputs' is not an object (%r), ignored", record.get("job_id"), inputs)
        return []
    control = inputs.get("control") or []
    if not isinstance(control, list):
        log.debug("record %s: inputs.control is not a list (%r), ignored", record.get("job_id"), control)
        control = []
    entries = [(f"control {i + 1}" if len(control) > 1 else "control", e) for i, e in enumerate(control)]
    entries += [(key, inputs[key]) for key in ("init", "mask") if inputs.get(key) is not None]
    out = []
    for label, entry in entries:
        raw = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(raw, str) or not raw:
            log.debug("record %s: input %s has no path (%r), ignored", record.get("job_id"), label, entry)
            continue
        digest = entry.get("sha256")
        out.append((label, raw, digest if isinstance(digest, str) and digest else None))
    return out


def _recorded_inputs(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """A (checked) record's inputs for replay: ``{"name", "control": [(path, sha256)], "init", "mask"}``."""
    entries = recorded_inputs(record)
    if not entries:
        return None
    out: dict[str, Any] = {"name": record["inputs"].get("name"), "control": []}
    for label, raw, digest in entries:
        if label.startswith("control"):
            out["control"].append((Path(raw), digest))
        else:
            out[label] = (Path(raw), digest)
    return out


def _settings(record: Mapping[str, Any], problems: list[str]) -> GenerationSettings:
    """The recorded settings, checked by the validation a prompt file's ``defaults:`` gets."""
    recorded = {key: record[key] for key in record_types() if key in record}
    values, invalid = validate_settings(recorded, allowed=IDENTITY_KEYS)
    problems.extend(f"{key}: {message}" for key, message in invalid)
    values["ref_text"] = "prompt" if record["caption"] == record["prompt"] else "none"
    return from_record(values)


def extras_record(models: Any, identity: Mapping[str, Any]) -> dict[str, Any]:
    """The record's part for the ecosystem models a run used (:meth:`ModelIds.extras`): ``vae`` and
    ``base_config`` as given, each LoRA with its weight and content id (``sha256:…`` or a hub id), each
    ControlNet with its content id when ``identity`` (the job's models) has them."""
    out: dict[str, Any] = {k: v for k, v in models.extras().items() if k not in ("loras", "controlnets")}
    if models.controlnets and "controlnets" in identity:  # a job with control images (jobs.job_models)
        ids = identity["controlnets"]
        out["controlnets"] = [{"path": spec, "content": c} for spec, c in zip(models.controlnets, ids, strict=True)]
    if models.loras:
        ids = identity.get("loras") or [[None, w] for _, w in models.loras]
        out["loras"] = [
            {"path": spec, "weight": weight, "content": content}
            for (spec, weight), (content, _) in zip(models.loras, ids, strict=True)
        ]
    return out


def _recorded_extras(record: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: record[k] for k in ("vae", "base_config") if isinstance(record.get(k), str)}
    controlnets = record.get("controlnets")
    if isinstance(controlnets, list) and controlnets:
        out["controlnets"] = tuple(str(c["path"]) for c in controlnets if isinstance(c, Mapping) and "path" in c)
    loras = record.get("loras")
    if isinstance(loras, list) and loras:
        out["loras"] = tuple((str(item["path"]), float(item.get("weight", 1.0))) for item in loras
                             if isinstance(item, Mapping) and isinstance(item.get("path"), str))  # fmt: skip
    return out


def parse_record(record: Mapping[str, Any], *, source: str = "record") -> Replay:
    """The texts, settings, models and reference files a record describes.

    Raises:
        InputError: naming ``source`` when keys are missing, mistyped or out of range.
    """
    schema = record.get("schema", 1)
    if isinstance(schema, int) and schema > RECORD_SCHEMA:
        raise InputError(
            f"{source}: the easyref record has schema {schema}, newer than this easyref-cli reads "
            f"({RECORD_SCHEMA}); upgrade easyref-cli to regenerate it"
        )
    problems = _problems(record)
    settings = None if problems else _settings(record, problems)
    if problems:
        raise InputError(
            f"{source}: the easyref record cannot be used to regenerate:\n" + "\n".join(f"  {p}" for p in problems)
        )
    defaults = {"base_model": DEFAULT_BASE_MODEL, "mllm": DEFAULT_MLLM, "adapter": DEFAULT_ADAPTER}
    refs = record["references"]
    return Replay(
        prompt=record["prompt"],
        caption=record["caption"],
        settings=settings,
        group=str(record.get("group") or "from-image"),
        prompt_id=str(record.get("prompt_id") or slugify(record["prompt"])),
        index=int(record.get("index") or 0),
        models={**{k: str(record.get(k) or d) for k, d in defaults.items()}, **_recorded_extras(record)},
        preset=record.get("preset") if isinstance(record.get("preset"), str) else None,
        references=tuple(Path(r["path"]) for r in refs),
        reference_sha256=tuple(r.get("sha256") for r in refs),
        inputs=_recorded_inputs(record),
    )
