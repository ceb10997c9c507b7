"""A :class:`Job`: one image to generate, with its id and output name. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref_cli.files import Group
from easyref_cli.inputs import JobInputs
from easyref_cli.models import ModelIds
from easyref_cli.naming import DEFAULT_NAME_TEMPLATE, INPUT_NAME_TEMPLATE, make_job_id, render_name
from easyref_cli.settings import GenerationSettings, identity_values


@dataclass(frozen=True)
class Job:
    """One image to generate. Everything needed to reproduce it, nothing about how to run it.

    ``caption`` is what the MLLM reads after ``settings.instruction`` (the prompt, or ``""`` for
    ``ref_text: none``); ``settings.seed`` is this image's seed and ``index`` its 0-based place
    among the prompt's seeds; ``output`` is relative to the plan's ``out_dir``. ``job_id`` hashes
    the group name, prompt id, texts, every identity setting, the references' sha256s and the
    models' content ids (:mod:`easyref_cli.identity`); ``legacy_id`` is the id easyref-cli 0.2 and
    earlier gave the same job (model paths, no reference content), so their images still resume.
    ``inputs`` holds its control, init and mask images (:mod:`easyref_cli.inputs`), ``None`` for
    text-to-image.
    """

    job_id: str
    group: Group
    prompt_id: str
    prompt: str
    caption: str
    index: int
    settings: GenerationSettings
    output: Path
    preset: str | None = None
    reference_sha256: tuple[str | None, ...] = ()
    legacy_id: str = ""
    inputs: JobInputs | None = None

    @property
    def seed(self) -> int:
        return self.settings.seed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (group as name, directory and image paths; identity settings)."""
        return {
            "job_id": self.job_id,
            "group": self.group.name,
            "group_path": str(self.group.path),
            "images": [str(p) for p in self.group.images],
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "caption": self.caption,
            "index": self.index,
            **identity_values(self.settings),
            **({"inputs": self.inputs.record()} if self.inputs is not None else {}),
            "output": self.output.as_posix(),
            "preset": self.preset,
        }


def uses_controlnets(inputs: JobInputs | None) -> bool:
    return inputs is not None and bool(inputs.control)


def job_models(identity: Mapping[str, Any], inputs: JobInputs | None) -> dict[str, Any]:
    """The run's model identity as one job uses it: the ControlNets only for a job with control images
    (so a plain prompt's id and record stay those of a run without ``--controlnet``)."""
    if uses_controlnets(inputs):
        return dict(identity)
    return {k: v for k, v in identity.items() if k != "controlnets"}


def make_job(
    *, group: Group, prompt_id: str, prompt: str, caption: str, index: int,
    settings: GenerationSettings, template: str, preset: str | None, models: ModelIds,
    identity: Mapping[str, Any], references: tuple[str | None, ...], inputs: JobInputs | None = None,
) -> Job:  # fmt: skip
    """One :class:`Job`: its id from everything that changes pixels, its output from the template.

    ``identity`` holds the models' content ids and ``references`` the group's image sha256s (see
    :mod:`easyref_cli.identity`). With ``seed_mode: official`` the image's place in its noise stream
    (``index``) changes pixels too, and so does the content of ``inputs`` (never their paths). A job
    whose input came from a folder is named by it (``{input}``) under the default template."""
    stream = {"noise_index": index} if settings.seed_mode == "official" else {}
    if inputs is not None:
        stream["inputs"] = inputs.identity()
    identity = job_models(identity, inputs)  # a job without a control image uses no ControlNet
    common = dict(group=group.name, prompt_id=prompt_id, prompt=prompt, caption=caption,
                  **identity_values(settings), **stream)  # fmt: skip
    job_id = make_job_id(**common, models=dict(identity), references=list(references))
    extras = {k: v for k, v in models.extras().items() if k != "controlnets"}
    plain = not extras and inputs is None  # 0.2 had no vae/LoRA/ControlNet/init image
    legacy_id = make_job_id(**common, **models.as_dict()) if plain else ""
    name = inputs.name if inputs is not None else None
    if name is not None and template == DEFAULT_NAME_TEMPLATE:
        template = INPUT_NAME_TEMPLATE
    output = render_name(
        template, group=group.name, prompt_id=prompt_id, seed=settings.seed, index=index, preset=preset, input=name
    )
    return Job(job_id, group, prompt_id, prompt, caption, index, settings, output, preset, references, legacy_id,
               inputs)  # fmt: skip
