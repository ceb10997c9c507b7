"""A :class:`Job`: one image to generate, with its id and output name. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref_cli.files import Group
from easyref_cli.models import ModelIds
from easyref_cli.naming import make_job_id, render_name
from easyref_cli.settings import GenerationSettings, identity_values


@dataclass(frozen=True)
class Job:
    """One image to generate. Everything needed to reproduce it, nothing about how to run it.

    ``caption`` is what the MLLM reads after ``settings.instruction`` (the prompt, or ``""`` for
    ``ref_text: none``); ``settings.seed`` is this image's seed and ``index`` its 0-based place
    among the prompt's seeds; ``output`` is relative to the plan's ``out_dir``. ``job_id`` hashes
    the group name, prompt id, texts, every identity setting and the model ids.
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
            "output": self.output.as_posix(),
            "preset": self.preset,
        }


def make_job(
    *, group: Group, prompt_id: str, prompt: str, caption: str, index: int,
    settings: GenerationSettings, template: str, preset: str | None, models: ModelIds,
) -> Job:  # fmt: skip
    """One :class:`Job`: its id from everything that changes pixels, its output from the template.
    With ``seed_mode: official`` the image's place in its noise stream (``index``) changes pixels too."""
    stream = {"noise_index": index} if settings.seed_mode == "official" else {}
    job_id = make_job_id(
        group=group.name, prompt_id=prompt_id, prompt=prompt, caption=caption,
        **identity_values(settings), **stream, **models.as_dict(),
    )  # fmt: skip
    output = render_name(
        template, group=group.name, prompt_id=prompt_id, seed=settings.seed, index=index, preset=preset
    )
    return Job(job_id, group, prompt_id, prompt, caption, index, settings, output, preset)
