"""Planning: reference groups × prompts × seeds → a frozen :class:`Plan` of :class:`Job` s.

Pure Python, no torch (DESIGN §4). :func:`build_plan` is the one entry: it raises every usage
error (bad options, files, presets, groups, names, control tokens) before any model loads, so a
built plan is a valid plan; ``--from-image`` replays go through it too.

Settings precedence, lowest to highest (:func:`easyref_cli.settings.resolve_settings`)::

    built-in defaults < --model family < preset < prompt-file ``defaults:`` < command line < per prompt

``None`` in any layer means "not given" and never overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from easyref_cli import inputs as inputs_mod
from easyref_cli.errors import UsageError
from easyref_cli.files import Group, find_groups
from easyref_cli.identity import FileHashes, model_identity, reference_digests
from easyref_cli.jobs import Job, make_job
from easyref_cli.models import MODEL_DEFAULTS, ModelIds, check_controlnet_family, check_extra_models, chosen_models
from easyref_cli.naming import DEFAULT_NAME_TEMPLATE, assign_prompt_ids
from easyref_cli.presets import load_preset
from easyref_cli.prompts import PromptFile, PromptSpec, load_prompts
from easyref_cli.replay import read_replay
from easyref_cli.runtime import Runtime, check_runtime
from easyref_cli.settings import (
    MAX_SEED,
    SCHEDULERS,
    GenerationSettings,
    check_control_tokens,
    flag_of,
    resolve_settings,
    validate_settings,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything ``easyref generate`` will do, decided before any model loads.

    ``jobs`` are group-major (group, then prompt, then seed) so each group is encoded once.
    """

    jobs: tuple[Job, ...]
    out_dir: Path
    models: ModelIds = ModelIds()
    model_family: str | None = None
    device: str | None = None
    dtype: str | None = None
    attention: str = "auto"
    offload: str = "none"
    batch_size: int | str = "auto"
    overwrite: bool = False
    fail_fast: bool = False
    preset: str | None = None
    name_template: str = DEFAULT_NAME_TEMPLATE
    metadata: str = "full"
    record_paths: str = "relative"
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None
    shard: tuple[int, int] | None = None
    model_identity: Mapping[str, Any] = field(default_factory=dict)  # content ids (easyref_cli.identity)

    @property
    def groups(self) -> tuple[Group, ...]:
        """The distinct groups of the jobs, in job order."""
        seen: dict[str, Group] = {}
        for job in self.jobs:
            seen.setdefault(job.group.name, job.group)
        return tuple(seen.values())

    def output_path(self, job: Job) -> Path:
        """Where ``job``'s PNG goes: ``out_dir / job.output``."""
        return self.out_dir / job.output

    def pending(self) -> list[Job]:
        """Jobs still to do: those whose output file does not exist (all with ``overwrite``)."""
        if self.overwrite:
            return list(self.jobs)
        return [job for job in self.jobs if not self.output_path(job).exists()]

    def describe(self) -> str:
        """Dry-run listing: a line per job (todo/exists, output path, what), then a summary."""
        lines: list[str] = []
        todo = exist = 0
        for job in self.jobs:
            exists = self.output_path(job).exists()
            todo += self.overwrite or not exists
            exist += exists
            s = job.settings
            lines.append(
                f"{'exists' if exists else 'todo':<6}  {self.output_path(job)}  "
                f"[job {job.job_id} group={job.group.name} prompt={job.prompt_id} seed={job.seed} "
                f"{s.width}x{s.height} steps={s.steps}{inputs_mod.describe(job.inputs)}]"
            )
        fate = "overwritten" if self.overwrite else "skipped"
        lines.append(
            f"{len(self.jobs)} jobs in {len(self.groups)} groups: {todo} to generate, {exist} already exist ({fate})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the whole plan."""
        scalars = ("model_family", "device", "dtype", "attention", "offload", "batch_size", "overwrite")
        return {
            "out_dir": str(self.out_dir),
            **self.models.as_dict(),
            **{k: getattr(self, k) for k in scalars},
            "fail_fast": self.fail_fast,
            "preset": self.preset,
            "name_template": self.name_template,
            "jobs": [job.to_dict() for job in self.jobs],
        }


# ----------------------------------------------------------------------------------------------
# build_plan: every usage check, then the expansion
# ----------------------------------------------------------------------------------------------


def _check_cli_settings(cli: Mapping[str, Any] | None) -> dict[str, Any]:
    values, problems = validate_settings(dict(cli or {}))
    if problems:
        raise UsageError("\n".join(f"{flag_of(key)}: {msg}" for key, msg in problems))
    return values


def _check_control_tokens(jobs: Sequence[Job]) -> None:
    """Qwen2-VL control tokens in a caption or instruction would be read as structure."""
    for job in jobs:
        for what, text in (("prompt", job.caption), ("instruction", job.settings.instruction)):
            check_control_tokens(text, f"the {what} of prompt {job.prompt_id!r}")


def _check_unique_outputs(jobs: Sequence[Job], template: str) -> None:
    first: dict[Path, Job] = {}
    for job in jobs:
        other = first.get(job.output)
        if other is not None:
            raise UsageError(
                f"name template {template!r} is not unique: group {other.group.name!r} prompt "
                f"{other.prompt_id!r} seed {other.seed} and group {job.group.name!r} prompt "
                f"{job.prompt_id!r} seed {job.seed} both go to {job.output.as_posix()} "
                "(add {group}, {prompt_id}, {seed}, {index} or {input} to --name-template)"
            )
        first[job.output] = job


def _finish(
    jobs: list[Job], runtime: Runtime, *, group_args: Sequence[Path] = (), prompt_file: PromptFile | None = None,
    **fields: Any,
) -> Plan:  # fmt: skip
    """The checks every plan passes, then the frozen Plan.

    Control tokens, unique outputs; ``-o`` a folder, output names and paths short enough to write, no
    output inside a reference folder (a group's, or a GROUPS argument of ``group_args``); captions and
    instructions within the MLLM's token limit (``prompt_file`` locates a prompt in the message).
    """
    from easyref_cli import outputs_check
    from easyref_cli.naming import check_output_names

    _check_control_tokens(jobs)
    _check_unique_outputs(jobs, runtime.name_template)
    out_dir = Path(fields["out_dir"])
    check_output_names(out_dir, jobs, runtime.name_template)
    outputs_check.check_out_dir(out_dir, jobs)
    outputs_check.check_outputs_outside_references(out_dir, jobs, group_args)
    models = fields.get("models") or ModelIds()
    outputs_check.check_text_lengths(jobs, models.mllm, prompt_file)
    return Plan(jobs=tuple(jobs), **asdict(runtime), **fields)


def _check_prompt_source(prompts_file: Path | None, prompt: str | None) -> None:
    if (prompts_file is None) == (prompt is None):
        raise UsageError("give exactly one of --prompts FILE.yaml or --prompt TEXT")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty")


def _find_groups(paths: Sequence[Path], prompt_file: PromptFile) -> list[Group]:
    found = find_groups([Path(g) for g in paths])
    names = {g.name for g in found}
    for spec in prompt_file.prompts:
        unknown = [g for g in spec.groups or () if g not in names]
        if unknown:
            raise UsageError(
                f"{prompt_file.location(spec, 'groups')}: prompts[{spec.index}].groups: unknown group(s) "
                f"{', '.join(unknown)} (groups found: {', '.join(g.name for g in found)})"
            )
    for group in found:
        for path in group.ignored:
            logger.info("group %s: ignoring %s (hidden or not an image)", group.name, path)
    return found


def _seeds(spec: PromptSpec, settings: GenerationSettings) -> tuple[int, ...]:
    if settings.seed_mode == "official":
        if spec.seeds is not None:
            raise UsageError(
                f"prompts[{spec.index}]: seed_mode official draws a prompt's images from one stream seeded by "
                "'seed', as the official generate(num_samples=n, seed=s): give seed and images_per_prompt, not seeds"
            )
        if SCHEDULERS[settings.scheduler].stochastic:
            raise UsageError(
                f"prompts[{spec.index}]: seed_mode official cannot replay the per-step noise of the "
                f"{settings.scheduler} scheduler (the official call draws it from one stream for all its images); "
                "use a deterministic scheduler"
            )
    if spec.seeds is not None:
        return spec.seeds
    first, count = settings.seed, settings.images_per_prompt
    if first + count - 1 > MAX_SEED:
        raise UsageError(f"prompts[{spec.index}]: seeds {first}…{first + count - 1} exceed the maximum seed {MAX_SEED}")
    return tuple(range(first, first + count))


def _expand(
    groups: Sequence[Group], prompt_file: PromptFile, base: GenerationSettings, *,
    template: str, preset: str | None, models: ModelIds, identity: Mapping[str, Any],
) -> list[Job]:  # fmt: skip
    """Jobs, group-major: each prompt's own settings over ``base``, one job per input image (control,
    init, mask: :mod:`easyref_cli.inputs`) and seed."""
    per_prompt = []
    hashes = FileHashes(None)  # each input file read once per plan (not remembered: inputs come and go)
    for spec, prompt_id in zip(prompt_file.prompts, assign_prompt_ids(prompt_file.prompts), strict=True):
        settings = replace(base, **spec.options)
        where = f"{prompt_file.location(spec, 'prompt')}: prompts[{spec.index}] ({prompt_id!r})"
        if inputs_mod.uses_inputs(settings):
            inputs_mod.check_control_settings(settings, len(models.controlnets), where)
        per_prompt.append((spec, prompt_id, _seeds(spec, settings), inputs_mod.expand_inputs(settings, where, hashes)))
    jobs = []
    for group in groups:
        references = reference_digests(group)
        for spec, prompt_id, seeds, items in per_prompt:
            if spec.groups is not None and group.name not in spec.groups:
                continue
            for inputs, settings in items:
                for index, seed in enumerate(seeds):
                    jobs.append(
                        make_job(
                            group=group, prompt_id=prompt_id, prompt=spec.prompt, caption=settings.caption(spec.prompt),
                            index=index, settings=replace(settings, seed=seed), template=template, preset=preset,
                            models=models, identity=identity, references=references, inputs=inputs,
                        )
                    )  # fmt: skip
    _check_controlnets_used(jobs, models)
    return jobs


def _check_controlnets_used(jobs: Sequence[Job], models: ModelIds) -> None:
    if models.controlnets and not any(job.inputs is not None and job.inputs.control for job in jobs):
        raise UsageError(
            "ControlNets given (--controlnet, or controlnets: in a preset or the prompt file's defaults) but no "
            "prompt has a control image: pass --control-image FILE_OR_FOLDER (or control: in the prompt file)"
        )


def build_plan(
    *,
    out_dir: Path,
    groups: Sequence[Path] = (),
    prompts_file: Path | None = None,
    prompt: str | None = None,
    from_image: Path | None = None,
    groups_root: Path | None = None,
    preset: str | None = None,
    cli: Mapping[str, Any] | None = None,
    model: str | None = None,
    base_model: str | None = None,
    mllm: str | None = None,
    adapter: str | None = None,
    vae: str | None = None,
    base_config: str | None = None,
    **runtime_options: Any,
) -> Plan:
    """Validate everything and expand groups × prompts × seeds (or one recorded image) into a Plan.

    ``cli`` holds the settings given on the command line (``None`` = not given); ``runtime_options``
    are :func:`easyref_cli.runtime.check_runtime`'s (device, dtype, name template, metadata, ...);
    ``groups_root`` is where a replay finds references its record names relatively (default: the
    current folder).

    Raises:
        UsageError: for anything wrong: options, model choice, prompt source, groups, presets,
            prompt files, settings, name templates, group filters, colliding outputs, control
            tokens; a replay's missing or changed reference. InputError: an unusable record.
    """
    runtime = check_runtime(**runtime_options)
    chosen = chosen_models(model, base_model, mllm, adapter)
    if from_image is not None:
        if groups or prompts_file or prompt or preset:
            raise UsageError(
                "--from-image regenerates one recorded image: give no GROUPS, --prompts, --prompt or --preset"
            )
        chosen.update({k: v for k, v in (("vae", vae), ("base_config", base_config)) if v is not None})
        return _replay_plan(Path(from_image), out_dir, dict(cli or {}), chosen, model, runtime, groups_root)
    if not groups:
        raise UsageError("give at least one GROUPS folder (or --from-image IMAGE.png)")
    _check_prompt_source(prompts_file, prompt)
    cli_settings = _check_cli_settings(cli)
    preset_settings: Mapping[str, Any] = {}
    if preset is not None:
        preset_settings = load_preset(preset)
    prompt_file = load_prompts(prompts_file) if prompts_file is not None else PromptFile.single(prompt)
    found = _find_groups(groups, prompt_file)
    base = resolve_settings(MODEL_DEFAULTS.get(model or ""), preset_settings, prompt_file.defaults, cli_settings)
    check_controlnet_family(base.controlnets, model)
    models = ModelIds(**chosen, vae=vae, base_config=base_config, loras=base.loras, controlnets=base.controlnets)
    check_extra_models(models)
    identity = model_identity(models, model)
    jobs = _expand(
        found, prompt_file, base, template=runtime.name_template, preset=preset, models=models, identity=identity
    )
    return _finish(
        jobs, runtime, out_dir=Path(out_dir), models=models, model_family=model, batch_size=base.batch_size,
        preset=preset, model_identity=identity, group_args=[Path(g) for g in groups], prompt_file=prompt_file,
    )  # fmt: skip


def _replay_plan(
    image: Path, out_dir: Path, cli: dict[str, Any], chosen: dict[str, str], family: str | None, runtime: Runtime,
    groups_root: Path | None = None,
) -> Plan:  # fmt: skip
    """A one-job plan that regenerates the image ``image``'s record describes (:mod:`easyref_cli.replay`)."""
    locations = ("loras", "controlnets")  # where the recorded models are (their content is checked)
    given = sorted(k for k, v in cli.items() if v is not None and k not in ("batch_size", *locations))
    for key in locations:
        if cli.get(key):
            chosen = {**chosen, key: _check_cli_settings({key: cli[key]})[key]}
    r = read_replay(Path(image), chosen, family, runtime, groups_root, refuse=[flag_of(k) for k in given])
    identity = model_identity(r.models, r.family)
    r.check_identity(identity, str(image))
    settings = r.replay.settings
    if r.inputs is not None:
        settings = replace(settings, control_image=tuple(str(p) for p in r.inputs.control),
                           init_image=_str_or_none(r.inputs.init), mask=_str_or_none(r.inputs.mask))  # fmt: skip
    job = make_job(
        group=r.group, prompt_id=r.replay.prompt_id, prompt=r.replay.prompt, caption=r.replay.caption,
        index=r.replay.index, settings=settings, template=r.runtime.name_template, preset=r.replay.preset,
        models=r.models, identity=identity, references=reference_digests(r.group), inputs=r.inputs,
    )  # fmt: skip
    batch_size = _check_cli_settings({"batch_size": cli.get("batch_size")}).get("batch_size", "auto")
    return _finish(
        [job], r.runtime, out_dir=Path(out_dir), models=r.models, model_family=r.family, batch_size=batch_size,
        preset=r.replay.preset, model_identity=identity,
    )  # fmt: skip


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)
