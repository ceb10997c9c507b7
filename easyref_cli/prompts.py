"""The prompt file: ``defaults:`` (any setting) and ``prompts:`` (strings or mappings). Torch-free.

Every problem is reported at once, each as ``file:line: where: message``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easyref_cli.errors import UsageError
from easyref_cli.settings import MAX_SEED, PER_PROMPT_KEYS, Invalid, as_int, validate_settings
from easyref_cli.yamlio import Problem, format_problems, line_of, load_yaml_with_lines

#: Every key a prompt mapping may hold: the text, its id, the per-prompt settings, seeds and groups.
PROMPT_KEYS: tuple[str, ...] = ("prompt", "id", *PER_PROMPT_KEYS, "seeds", "groups")
PROMPT_FILE_KEYS = ("defaults", "prompts")


@dataclass(frozen=True)
class PromptSpec:
    """One entry of ``prompts:`` (or the ``--prompt`` text), validated.

    ``options`` holds the per-prompt settings given (normalised); ``seeds`` the explicit seed list
    if any; ``groups`` the group-name filter if any; ``index`` is 0-based and ``line`` 1-based
    (``None`` for ``--prompt``); ``key_lines`` maps each given key to its line.
    """

    index: int
    prompt: str
    id: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None
    groups: tuple[str, ...] | None = None
    line: int | None = None
    key_lines: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptFile:
    """A validated prompt file: ``defaults`` (normalised settings) and its prompts."""

    path: Path
    defaults: Mapping[str, Any]
    prompts: tuple[PromptSpec, ...]

    @classmethod
    def single(cls, prompt: str) -> PromptFile:
        """The prompt file equivalent of ``--prompt TEXT``."""
        return cls(path=Path("<--prompt>"), defaults={}, prompts=(PromptSpec(index=0, prompt=prompt),))

    def location(self, spec: PromptSpec, key: str) -> str:
        """``file:line`` of ``key`` in ``spec`` (or of the prompt), for error messages."""
        line = spec.key_lines.get(key, spec.line)
        return f"{self.path}:{line}" if line else str(self.path)


def _check_id(value: Any, problem) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problem("id", f"must be a string, got {value!r}")
        return None
    if not str(value).strip():
        problem("id", "must not be empty")
        return None
    return str(value)


def _check_seeds(item: Mapping[str, Any], problem) -> tuple[int, ...] | None:
    raw = item.get("seeds")
    if raw is None:
        return None
    if item.get("seed") is not None:
        problem("seeds", "give either 'seed' or 'seeds', not both")
    if item.get("images_per_prompt") is not None:
        problem("seeds", "give either 'images_per_prompt' or 'seeds', not both")
    if not isinstance(raw, list) or not raw:
        problem("seeds", f"must be a non-empty list of integers, got {raw!r}")
        return None
    try:
        seeds = tuple(as_int(s, minimum=0, maximum=MAX_SEED) for s in raw)
    except Invalid as e:
        problem("seeds", f"each seed {e}")
        return None
    dupes = sorted({s for s in seeds if seeds.count(s) > 1})
    if dupes:
        problem("seeds", f"repeated seeds {dupes} would produce the same image twice")
    return seeds


def _check_groups(item: Mapping[str, Any], problem) -> tuple[str, ...] | None:
    raw = item.get("groups")
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(g, str) for g in raw):
        problem("groups", f"must be a non-empty list of group names, got {item['groups']!r}")
        return None
    return tuple(raw)


def _check_text(item: Mapping[str, Any], line: int | None, where: str, problem) -> list[Problem]:
    prompt = item.get("prompt")
    if prompt is None:
        return [(line, where, "missing required key 'prompt'")]
    if not isinstance(prompt, str):
        problem("prompt", f"must be a string, got {prompt!r}")
    elif not prompt.strip():
        problem("prompt", "empty prompt")
    return []


def check_prompt_item(item: Any, index: int, lines: Mapping[tuple, int]) -> tuple[PromptSpec | None, list[Problem]]:
    """One ``prompts:`` entry → a :class:`PromptSpec`, or the problems found (never both)."""
    at, where = ("prompts", index), f"prompts[{index}]"
    line = line_of(lines, at)
    if isinstance(item, str):
        if not item.strip():
            return None, [(line, where, "empty prompt")]
        return PromptSpec(index=index, prompt=item, line=line), []
    if not isinstance(item, dict):
        return None, [(line, where, f"must be a string or a mapping with 'prompt:', got {item!r}")]

    problems: list[Problem] = []

    def problem(key: str, msg: str) -> None:
        problems.append((line_of(lines, at + (key,)), f"{where}.{key}", msg))

    for key in item:
        if key not in PROMPT_KEYS:
            problem(str(key), f"unknown key (allowed: {', '.join(PROMPT_KEYS)})")
    problems += _check_text(item, line, where, problem)
    prompt_id = _check_id(item.get("id"), problem)
    options, option_problems = validate_settings(
        {k: item[k] for k in PER_PROMPT_KEYS if k in item}, allowed=PER_PROMPT_KEYS
    )
    for key, msg in option_problems:
        problem(key, msg)
    seeds = _check_seeds(item, problem)
    groups = _check_groups(item, problem)
    if problems:
        return None, problems
    key_lines = {k: lines[at + (k,)] for k in item if at + (k,) in lines}
    spec = PromptSpec(index, item["prompt"], prompt_id, options, seeds, groups, line, key_lines)
    return spec, []


def _check_defaults(data: Mapping[str, Any], lines) -> tuple[dict[str, Any], list[Problem]]:
    raw = data.get("defaults")
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [(line_of(lines, ("defaults",)), "defaults", "must be a mapping of options")]
    defaults, option_problems = validate_settings(raw)
    return defaults, [(line_of(lines, ("defaults", k)), f"defaults.{k}", msg) for k, msg in option_problems]


def _check_prompts(data: Mapping[str, Any], lines) -> tuple[list[PromptSpec], list[Problem]]:
    raw = data.get("prompts")
    if raw is None:
        return [], [(line_of(lines, ()), "prompts", "missing required key 'prompts'")]
    if not isinstance(raw, list):
        return [], [(line_of(lines, ("prompts",)), "prompts", "must be a list of prompts")]
    if not raw:
        return [], [(line_of(lines, ("prompts",)), "prompts", "the list is empty")]
    specs: list[PromptSpec] = []
    problems: list[Problem] = []
    for index, item in enumerate(raw):
        spec, item_problems = check_prompt_item(item, index, lines)
        problems.extend(item_problems)
        if spec is not None:
            specs.append(spec)
    first_by_id: dict[str, PromptSpec] = {}
    for spec in specs:
        if spec.id is None:
            continue
        if spec.id in first_by_id:
            first = first_by_id[spec.id]
            problems.append(
                (
                    line_of(lines, ("prompts", spec.index, "id")),
                    f"prompts[{spec.index}].id",
                    f"duplicate id {spec.id!r} (also prompts[{first.index}], line {first.line})",
                )
            )
        else:
            first_by_id[spec.id] = spec
    return specs, problems


def load_prompt_file(path: Path) -> PromptFile:
    """Read and validate a prompt file (``yaml.safe_load``).

    Layout: a mapping with an optional ``defaults:`` mapping (any setting) and a required
    non-empty ``prompts:`` list of strings or mappings (keys in :data:`PROMPT_KEYS`).

    Raises:
        UsageError: every problem found, each as ``file:line: where: message`` (``where`` is e.g.
            ``prompts[2].steps``), for a missing file, YAML syntax errors, unknown keys, wrong
            types, ``seed`` with ``seeds``, an empty list, or duplicate ids.
    """
    path = Path(path)
    data, lines = load_yaml_with_lines(path, what="prompt file")
    if data is None:
        raise UsageError(f"{path}: the prompt file is empty (it needs a 'prompts:' list)")
    if not isinstance(data, dict):
        hint = " (put the list under a 'prompts:' key)" if isinstance(data, list) else ""
        raise UsageError(
            f"{path}:{line_of(lines, ())}: the top level must be a mapping with 'prompts:' "
            f"and optional 'defaults:'{hint}"
        )
    problems: list[Problem] = [
        (line_of(lines, (key,)), str(key), f"unknown top-level key (allowed: {', '.join(PROMPT_FILE_KEYS)})")
        for key in data
        if key not in PROMPT_FILE_KEYS
    ]
    defaults, default_problems = _check_defaults(data, lines)
    specs, prompt_problems = _check_prompts(data, lines)
    problems += default_problems + prompt_problems
    if problems:
        raise UsageError(format_problems(path, "invalid prompt file", problems))
    return PromptFile(path=path, defaults=defaults, prompts=tuple(specs))
