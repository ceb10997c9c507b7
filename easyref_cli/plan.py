"""Planning: reference groups × prompts × seeds → a frozen :class:`Plan` of :class:`Job` s.

Pure Python, no torch (DESIGN §4): ``--dry-run`` prints a plan built here, and every usage error
(bad YAML, unknown keys, bad values, missing groups) is raised here, before any model loads.

Settings precedence, lowest to highest (one function, :func:`resolve_settings`)::

    built-in defaults < preset < prompt-file ``defaults:`` < command-line flags < per-prompt fields

``None`` in any layer means "not given" and never overrides.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from easyref_cli import __version__
from easyref_cli.constants import (
    DEFAULT_ADAPTER,
    DEFAULT_BASE_MODEL,
    DEFAULT_MLLM,
    INSTRUCTION,
)
from easyref_cli.errors import InputError, UsageError
from easyref_cli.files import Group, find_groups, sha256_file

# ----------------------------------------------------------------------------------------------
# Generation options
# ----------------------------------------------------------------------------------------------

#: Scheduler names accepted by ``--scheduler`` / ``scheduler:``.
SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "ddim", "pndm", "lms")
#: ``ref_text: prompt`` gives the prompt to the MLLM as caption; ``none`` gives an empty caption.
REF_TEXT_CHOICES = ("prompt", "none")
ATTENTION_CHOICES = ("auto", "sdpa", "xformers")
#: dtype spellings accepted → canonical name.
DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
#: torch.Generator.manual_seed accepts 0 … 2**64-1.
MAX_SEED = 2**64 - 1

#: Built-in defaults: the lowest precedence layer. Its keys are *the* generation option keys.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "steps": 30,
    "guidance": 5.0,
    "scale": 1.0,
    "width": 1024,
    "height": 1024,
    "seed": 0,
    "images_per_prompt": 1,
    "negative_prompt": "",
    "scheduler": "euler",
    "ref_text": "prompt",
    "instruction": INSTRUCTION,
    "batch_size": 1,
}
OPTION_KEYS: tuple[str, ...] = tuple(BUILTIN_DEFAULTS)

#: Generation options a single prompt may override.
PER_PROMPT_OPTION_KEYS = (
    "negative_prompt",
    "seed",
    "images_per_prompt",
    "steps",
    "guidance",
    "scale",
    "width",
    "height",
    "ref_text",
    "scheduler",
)
#: Every key a prompt mapping may hold.
PROMPT_KEYS = (
    "prompt",
    "id",
    "negative_prompt",
    "seed",
    "seeds",
    "images_per_prompt",
    "steps",
    "guidance",
    "scale",
    "width",
    "height",
    "groups",
    "ref_text",
    "scheduler",
)
PROMPT_FILE_KEYS = ("defaults", "prompts")

DEFAULT_NAME_TEMPLATE = "{group}/{prompt_id}_{seed}.png"
NAME_FIELDS = ("group", "prompt_id", "seed", "index", "preset")
SLUG_MAX_LEN = 40
#: Version of the record layout written into PNGs.
RECORD_SCHEMA = 1


class _Invalid(ValueError):
    """A value failed validation; the message reads after ``field: ``."""


def _as_int(value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _Invalid(f"must be ≥ {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _Invalid(f"must be ≤ {maximum}, got {value}")
    return value


def _as_float(value: Any, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _Invalid(f"must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise _Invalid(f"must be ≥ {minimum}, got {value}")
    return value


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {value!r}")
    return value


def _as_choice(value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise _Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
    return value.strip().lower()


def _as_size(value: Any) -> int:
    value = _as_int(value)
    if value <= 0 or value % 8:
        raise _Invalid(f"must be a positive multiple of 8, got {value}")
    return value


_VALIDATORS = {
    "steps": lambda v: _as_int(v, minimum=1),
    "guidance": lambda v: _as_float(v, minimum=0.0),
    "scale": lambda v: _as_float(v),
    "width": _as_size,
    "height": _as_size,
    "seed": lambda v: _as_int(v, minimum=0, maximum=MAX_SEED),
    "images_per_prompt": lambda v: _as_int(v, minimum=1),
    "negative_prompt": _as_str,
    "scheduler": lambda v: _as_choice(v, SCHEDULERS),
    "ref_text": lambda v: _as_choice(v, REF_TEXT_CHOICES),
    "instruction": _as_str,
    "batch_size": lambda v: _as_int(v, minimum=1),
}
assert set(_VALIDATORS) == set(OPTION_KEYS)


def check_option(key: str, value: Any) -> Any:
    """Validate and normalise one generation option (``guidance: 5`` → ``5.0``...).

    Raises:
        ValueError: with a message that reads after ``key: ``.
    """
    if key not in _VALIDATORS:
        raise _Invalid(f"unknown option (allowed: {', '.join(OPTION_KEYS)})")
    return _VALIDATORS[key](value)


def validate_options(
    values: Mapping[str, Any], *, allowed: Sequence[str] = OPTION_KEYS
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Validate a mapping of generation options.

    Returns the normalised options (``None`` values dropped) and a list of ``(key, message)``
    problems (unknown keys, wrong types, out-of-range values); callers add the location.
    """
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, value in values.items():
        if key not in allowed:
            problems.append((str(key), f"unknown key (allowed: {', '.join(allowed)})"))
            continue
        if value is None:
            continue
        try:
            out[key] = check_option(key, value)
        except ValueError as e:
            problems.append((key, str(e)))
    return out, problems


def resolve_settings(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge settings layers: later layers win; ``None`` values (and ``None`` layers) are skipped.

    The one precedence function. :func:`build_plan` calls it as
    ``resolve_settings(BUILTIN_DEFAULTS, preset, file_defaults, cli, per_prompt)``.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            if value is not None:
                merged[key] = value
    return merged


# ----------------------------------------------------------------------------------------------
# YAML with line numbers
# ----------------------------------------------------------------------------------------------


def _yaml_error_message(e, path) -> str:
    """``file:line: YAML syntax error`` at the line where the parser gave up."""
    mark = e.problem_mark or e.context_mark
    return f"{path}:{mark.line + 1}: YAML syntax error" if mark is not None else f"{path}: YAML syntax error"


def _yaml_problem(e) -> str:
    """PyYAML's problem, plus where the construct it was parsing began when that is another line
    (an unclosed ``[`` is reported where the parser noticed, often lines later)."""
    start, end = e.context_mark, e.problem_mark
    if e.context and start is not None and end is not None and start.line != end.line:
        return f"{e.problem} ({e.context} that starts at line {start.line + 1}, column {start.column + 1})"
    return " ".join(p for p in (e.context, e.problem) if p)


def load_yaml_with_lines(path: Path, *, what: str = "YAML file") -> tuple[Any, dict[tuple, int]]:
    """``yaml.safe_load`` a file, also returning 1-based line numbers per data path.

    ``lines[("prompts", 2, "steps")]`` is the line of the ``steps`` key of the third prompt;
    ``lines[("prompts", 2)]`` is where that item starts; ``lines[()]`` the document start.
    Duplicate mapping keys, which PyYAML would silently collapse, are errors.

    Raises:
        UsageError: missing/unreadable file, YAML syntax error (with ``file:line``), several
            documents, or duplicate keys.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None

    lines: dict[tuple, int] = {}
    duplicates: list[str] = []
    seen_nodes: set[int] = set()

    def walk(n: yaml.Node, at: tuple) -> None:
        lines.setdefault(at, n.start_mark.line + 1)
        if id(n) in seen_nodes:  # aliases (and recursive documents) are walked once
            return
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                key_line = key_node.start_mark.line + 1
                if key in first_line and key != "<<":
                    duplicates.append(
                        f"{path}:{key_line}: duplicate key {key!r} "
                        f"(first on line {first_line[key]})"
                    )
                first_line.setdefault(key, key_line)
                lines.setdefault(at + (key,), key_line)
                walk(value_node, at + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, at + (i,))

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        # Walk the node tree before constructing: construction flattens '<<' merges in place,
        # which would look like duplicate keys.
        if node is not None:
            walk(node, ())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise UsageError(f"{_yaml_error_message(e, path)} in {what}: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: YAML error in {what}: {e}") from None
    finally:
        loader.dispose()
    if duplicates:
        raise UsageError("\n".join(duplicates))
    return data, lines


def _line_of(lines: Mapping[tuple, int], at: tuple) -> int | None:
    """The line of ``at`` or of its closest recorded ancestor."""
    while True:
        if at in lines:
            return lines[at]
        if not at:
            return None
        at = at[:-1]


def _format_problems(path: Path, header: str, problems: list[tuple[int | None, str, str]]) -> str:
    rendered = [
        f"{path}:{line}: {where}: {msg}" if line else f"{path}: {where}: {msg}"
        for line, where, msg in problems
    ]
    if len(rendered) == 1:
        return rendered[0]
    return f"{header} {path} ({len(rendered)} problems):\n" + "\n".join(f"  {r}" for r in rendered)


# ----------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """One entry of ``prompts:`` (or the ``--prompt`` text), validated.

    ``options`` holds the per-prompt generation options given (normalised); ``seeds`` the explicit
    seed list if any; ``groups`` the group-name filter if any; ``index`` is 0-based and ``line``
    1-based (``None`` for ``--prompt``); ``key_lines`` maps each given key to its line.
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
    """A validated prompt file: ``defaults`` (normalised options) and its prompts."""

    path: Path
    defaults: Mapping[str, Any]
    prompts: tuple[PromptSpec, ...]


def _check_prompt_item(
    item: Any, index: int, lines: Mapping[tuple, int]
) -> tuple[PromptSpec | None, list[tuple[int | None, str, str]]]:
    at = ("prompts", index)
    where = f"prompts[{index}]"
    line = _line_of(lines, at)
    problems: list[tuple[int | None, str, str]] = []

    if isinstance(item, str):
        if not item.strip():
            return None, [(line, where, "empty prompt")]
        return PromptSpec(index=index, prompt=item, line=line), []
    if not isinstance(item, dict):
        return None, [(line, where, f"must be a string or a mapping with 'prompt:', got {item!r}")]

    def problem(key: str, msg: str) -> None:
        problems.append((_line_of(lines, at + (key,)), f"{where}.{key}", msg))

    for key in item:
        if key not in PROMPT_KEYS:
            problem(str(key), f"unknown key (allowed: {', '.join(PROMPT_KEYS)})")

    prompt = item.get("prompt")
    if prompt is None:
        problems.append((line, where, "missing required key 'prompt'"))
    elif not isinstance(prompt, str):
        problem("prompt", f"must be a string, got {prompt!r}")
    elif not prompt.strip():
        problem("prompt", "empty prompt")

    prompt_id = item.get("id")
    if prompt_id is not None:
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
            problem("id", f"must be a string, got {prompt_id!r}")
            prompt_id = None
        else:
            prompt_id = str(prompt_id)
            if not prompt_id.strip():
                problem("id", "must not be empty")
                prompt_id = None

    options_in = {k: item[k] for k in PER_PROMPT_OPTION_KEYS if k in item}
    options, option_problems = validate_options(options_in, allowed=PER_PROMPT_OPTION_KEYS)
    for key, msg in option_problems:
        problem(key, msg)

    seeds: tuple[int, ...] | None = None
    if item.get("seeds") is not None:
        raw = item["seeds"]
        if "seed" in item and item["seed"] is not None:
            problem("seeds", "give either 'seed' or 'seeds', not both")
        if "images_per_prompt" in item and item["images_per_prompt"] is not None:
            problem("seeds", "give either 'images_per_prompt' or 'seeds', not both")
        if not isinstance(raw, list) or not raw:
            problem("seeds", f"must be a non-empty list of integers, got {raw!r}")
        else:
            try:
                seeds = tuple(_as_int(s, minimum=0, maximum=MAX_SEED) for s in raw)
            except _Invalid as e:
                problem("seeds", f"each seed {e}")
            else:
                dupes = sorted({s for s in seeds if seeds.count(s) > 1})
                if dupes:
                    problem("seeds", f"repeated seeds {dupes} would produce the same image twice")

    groups: tuple[str, ...] | None = None
    if item.get("groups") is not None:
        raw = item["groups"]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw or not all(isinstance(g, str) for g in raw):
            problem("groups", f"must be a non-empty list of group names, got {item['groups']!r}")
        else:
            groups = tuple(raw)

    if problems:
        return None, problems
    key_lines = {k: lines[at + (k,)] for k in item if at + (k,) in lines}
    return (
        PromptSpec(
            index=index,
            prompt=prompt,
            id=prompt_id,
            options=options,
            seeds=seeds,
            groups=groups,
            line=line,
            key_lines=key_lines,
        ),
        [],
    )


def load_prompt_file(path: Path) -> PromptFile:
    """Read and validate a prompt file (``yaml.safe_load``).

    Layout: a mapping with an optional ``defaults:`` mapping (any generation option) and a required
    non-empty ``prompts:`` list of strings or mappings (keys in :data:`PROMPT_KEYS`).

    Raises:
        UsageError: every problem found, each as ``file:line: where: message`` (``where`` is e.g.
            ``prompts[2].steps``), for a missing file, YAML syntax errors, unknown keys, wrong
            types, ``seed`` with ``seeds``, an empty list, or duplicate ids.
    """
    path = Path(path)
    data, lines = load_yaml_with_lines(path, what="prompt file")
    header = "invalid prompt file"
    if data is None:
        raise UsageError(f"{path}: the prompt file is empty (it needs a 'prompts:' list)")
    if not isinstance(data, dict):
        hint = " (put the list under a 'prompts:' key)" if isinstance(data, list) else ""
        raise UsageError(
            f"{path}:{_line_of(lines, ())}: the top level must be a mapping with 'prompts:' "
            f"and optional 'defaults:'{hint}"
        )

    problems: list[tuple[int | None, str, str]] = []
    for key in data:
        if key not in PROMPT_FILE_KEYS:
            problems.append(
                (
                    _line_of(lines, (key,)),
                    str(key),
                    f"unknown top-level key (allowed: {', '.join(PROMPT_FILE_KEYS)})",
                )
            )

    defaults: dict[str, Any] = {}
    raw_defaults = data.get("defaults")
    if raw_defaults is not None:
        if not isinstance(raw_defaults, dict):
            problems.append(
                (_line_of(lines, ("defaults",)), "defaults", "must be a mapping of options")
            )
        else:
            defaults, option_problems = validate_options(raw_defaults)
            for key, msg in option_problems:
                problems.append((_line_of(lines, ("defaults", key)), f"defaults.{key}", msg))

    specs: list[PromptSpec] = []
    raw_prompts = data.get("prompts")
    if raw_prompts is None:
        problems.append((_line_of(lines, ()), "prompts", "missing required key 'prompts'"))
    elif not isinstance(raw_prompts, list):
        problems.append((_line_of(lines, ("prompts",)), "prompts", "must be a list of prompts"))
    elif not raw_prompts:
        problems.append((_line_of(lines, ("prompts",)), "prompts", "the list is empty"))
    else:
        for index, item in enumerate(raw_prompts):
            spec, item_problems = _check_prompt_item(item, index, lines)
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
                    _line_of(lines, ("prompts", spec.index, "id")),
                    f"prompts[{spec.index}].id",
                    f"duplicate id {spec.id!r} (also prompts[{first.index}], line {first.line})",
                )
            )
        else:
            first_by_id[spec.id] = spec

    if problems:
        raise UsageError(_format_problems(path, header, problems))
    return PromptFile(path=path, defaults=defaults, prompts=tuple(specs))


# ----------------------------------------------------------------------------------------------
# Ids and names
# ----------------------------------------------------------------------------------------------


def slugify(text: str, max_len: int = SLUG_MAX_LEN) -> str:
    """Lowercase ``[a-z0-9-]`` slug, ≤ ``max_len`` chars; accents folded; ``prompt`` if empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "prompt"


def assign_prompt_ids(specs: Sequence[PromptSpec]) -> list[str]:
    """Prompt ids in spec order: explicit ``id`` as given, else a slug of the prompt.

    Explicit ids are reserved first; slugs are deduplicated against everything used so far with
    ``-2``, ``-3``... (kept within :data:`SLUG_MAX_LEN`).

    Raises:
        UsageError: two explicit ids are equal.
    """
    used: set[str] = set()
    for spec in specs:
        if spec.id is not None:
            if spec.id in used:
                raise UsageError(f"duplicate prompt id {spec.id!r} (prompts[{spec.index}])")
            used.add(spec.id)
    ids: list[str] = []
    for spec in specs:
        if spec.id is not None:
            ids.append(spec.id)
            continue
        base = slugify(spec.prompt)
        candidate, n = base, 1
        while candidate in used:
            n += 1
            suffix = f"-{n}"
            candidate = base[: SLUG_MAX_LEN - len(suffix)].rstrip("-") + suffix
        used.add(candidate)
        ids.append(candidate)
    return ids


_UNSAFE_CHARS = re.compile(r'[/\\<>:"|?*]')
_COMPONENT_MAX_BYTES = 150


def sanitize_component(value: str) -> str:
    """Make one path component safe: no separators, ``..``, control chars or leading dots.

    Unicode letters are kept (NFC-normalised); ``/ \\ < > : " | ? *`` and control/format
    characters become ``_``; runs of dots collapse to one; leading dots/spaces and trailing
    dots/spaces are stripped; the result is cut to 150 UTF-8 bytes and is never empty (``_``).
    """
    text = unicodedata.normalize("NFC", str(value))
    text = "".join("_" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c for c in text)
    text = _UNSAFE_CHARS.sub("_", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = text.lstrip(". ").rstrip(". ")
    encoded = text.encode("utf-8")
    if len(encoded) > _COMPONENT_MAX_BYTES:
        text = encoded[:_COMPONENT_MAX_BYTES].decode("utf-8", "ignore").rstrip(". ")
    return text or "_"


def _preset_label(preset: str | None) -> str:
    if not preset:
        return "default"
    return PurePosixPath(preset.replace("\\", "/")).stem or preset


def render_name(
    template: str,
    *,
    group: str,
    prompt_id: str,
    seed: int,
    index: int,
    preset: str | None,
) -> Path:
    """Render an output name template into a safe path relative to the output directory.

    Fields: ``{group} {prompt_id} {seed} {index} {preset}`` (format specs like ``{seed:05d}``
    allowed). Each rendered field is passed through :func:`sanitize_component`, so values cannot
    add directories or escape; the template's literal text may use ``/`` for sub-directories but
    not ``\\``, ``:``, absolute paths, empty, ``.``/``..`` or hidden components. ``.png`` is
    appended when missing.

    Raises:
        UsageError: unknown field, bad format spec, or a template whose literal text escapes.
    """
    values = {
        "group": group,
        "prompt_id": prompt_id,
        "seed": seed,
        "index": index,
        "preset": _preset_label(preset),
    }
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"invalid name template {template!r}: {e}") from None
    pieces: list[str] = []
    for literal, field_name, spec, conversion in parsed:
        if (
            "\\" in literal
            or ":" in literal
            or any(unicodedata.category(c) == "Cc" for c in literal)
        ):
            raise UsageError(
                f"invalid name template {template!r}: use '/' between directories and no "
                "'\\', ':' or control characters"
            )
        pieces.append(literal)
        if field_name is None:
            continue
        if field_name not in NAME_FIELDS or conversion:
            raise UsageError(
                f"unknown field {{{field_name}{'!' + conversion if conversion else ''}}} in name "
                f"template {template!r} (allowed: {', '.join('{' + f + '}' for f in NAME_FIELDS)})"
            )
        try:
            formatted = format(values[field_name], spec or "")
        except (ValueError, TypeError) as e:
            raise UsageError(
                f"invalid format {{{field_name}:{spec}}} in name template {template!r}: {e}"
            ) from None
        pieces.append(sanitize_component(formatted))
    name = "".join(pieces)
    if not name.lower().endswith(".png"):
        name += ".png"
    parts = name.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise UsageError(
            f"invalid name template {template!r}: it must give a relative path inside the output "
            "directory, with no empty, '.', '..' or hidden (leading '.') components"
        )
    return Path(*parts)


def check_name_template(template: str) -> None:
    """Raise UsageError now if ``template`` cannot render (done before any work)."""
    render_name(template, group="g", prompt_id="p", seed=0, index=0, preset=None)


# ----------------------------------------------------------------------------------------------
# Jobs and plans
# ----------------------------------------------------------------------------------------------


def make_job_id(**fields: Any) -> str:
    """16 hex chars of sha256 over the JSON of ``fields`` (sorted keys): stable across runs."""
    payload = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """One image to generate. Everything needed to reproduce it, nothing about how to run it.

    ``caption`` is what the MLLM reads after ``instruction`` (the prompt, or ``""`` for
    ``ref_text: none``); ``index`` is 0-based within the prompt's seeds; ``output`` is relative
    to the plan's ``out_dir``. ``job_id`` hashes the group name, prompt id, seed, texts, all
    settings and the model ids, so changing any of them makes a new job.
    """

    job_id: str
    group: Group
    prompt_id: str
    prompt: str
    negative_prompt: str
    caption: str
    instruction: str
    seed: int
    index: int
    steps: int
    guidance: float
    scale: float
    width: int
    height: int
    scheduler: str
    output: Path
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (group as name, directory and image paths)."""
        return {
            "job_id": self.job_id,
            "group": self.group.name,
            "group_path": str(self.group.path),
            "images": [str(p) for p in self.group.images],
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "caption": self.caption,
            "instruction": self.instruction,
            "seed": self.seed,
            "index": self.index,
            "steps": self.steps,
            "guidance": self.guidance,
            "scale": self.scale,
            "width": self.width,
            "height": self.height,
            "scheduler": self.scheduler,
            "output": self.output.as_posix(),
            "preset": self.preset,
        }


def _job_id_for(
    *,
    group: str,
    prompt_id: str,
    seed: int,
    prompt: str,
    negative_prompt: str,
    caption: str,
    instruction: str,
    steps: int,
    guidance: float,
    scale: float,
    width: int,
    height: int,
    scheduler: str,
    base_model: str,
    mllm: str,
    adapter: str,
) -> str:
    return make_job_id(
        group=group,
        prompt_id=prompt_id,
        seed=seed,
        prompt=prompt,
        negative_prompt=negative_prompt,
        caption=caption,
        instruction=instruction,
        steps=steps,
        guidance=float(guidance),
        scale=float(scale),
        width=width,
        height=height,
        scheduler=scheduler,
        base_model=base_model,
        mllm=mllm,
        adapter=adapter,
    )


def _make_job(
    *,
    group: Group,
    prompt_id: str,
    seed: int,
    index: int,
    template: str,
    preset: str | None,
    models: tuple[str, str, str],
    settings: Mapping[str, Any],
) -> Job:
    """One :class:`Job`: its id from everything that changes pixels, its output from the template."""
    base_model, mllm, adapter = models
    return Job(
        job_id=_job_id_for(
            group=group.name, prompt_id=prompt_id, seed=seed,
            base_model=base_model, mllm=mllm, adapter=adapter, **settings,
        ),
        group=group,
        prompt_id=prompt_id,
        seed=seed,
        index=index,
        output=render_name(template, group=group.name, prompt_id=prompt_id, seed=seed, index=index, preset=preset),
        preset=preset,
        **settings,
    )


@dataclass(frozen=True)
class Plan:
    """Everything ``easyref generate`` will do, decided before any model loads.

    ``jobs`` are group-major (group, then prompt, then seed) so each group is encoded once.
    """

    jobs: tuple[Job, ...]
    out_dir: Path
    base_model: str
    mllm: str
    adapter: str
    device: str | None = None
    dtype: str | None = None
    attention: str = "auto"
    batch_size: int = 1
    overwrite: bool = False
    fail_fast: bool = False
    preset: str | None = None
    name_template: str = DEFAULT_NAME_TEMPLATE

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
        todo = 0
        for job in self.jobs:
            exists = self.output_path(job).exists()
            will_run = self.overwrite or not exists
            todo += will_run
            status = "exists" if exists else "todo"
            lines.append(
                f"{status:<6}  {self.output_path(job)}  "
                f"[job {job.job_id} group={job.group.name} prompt={job.prompt_id} seed={job.seed} "
                f"{job.width}x{job.height} steps={job.steps}]"
            )
        exist = sum(self.output_path(j).exists() for j in self.jobs)
        fate = "overwritten" if self.overwrite else "skipped"
        lines.append(
            f"{len(self.jobs)} jobs in {len(self.groups)} groups: {todo} to generate, "
            f"{exist} already exist ({fate})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the whole plan."""
        return {
            "out_dir": str(self.out_dir),
            "base_model": self.base_model,
            "mllm": self.mllm,
            "adapter": self.adapter,
            "device": self.device,
            "dtype": self.dtype,
            "attention": self.attention,
            "batch_size": self.batch_size,
            "overwrite": self.overwrite,
            "fail_fast": self.fail_fast,
            "preset": self.preset,
            "name_template": self.name_template,
            "jobs": [job.to_dict() for job in self.jobs],
        }


def _check_attention(attention: str) -> str:
    value = str(attention).strip().lower()
    if value not in ATTENTION_CHOICES:
        raise UsageError(
            f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}"
        )
    return value


def _check_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    value = DTYPE_ALIASES.get(str(dtype).strip().lower())
    if value is None:
        raise UsageError(
            f"--dtype must be one of {', '.join(sorted(set(DTYPE_ALIASES)))}, got {dtype!r}"
        )
    return value


def _check_unique_outputs(jobs: Sequence[Job], template: str) -> None:
    first: dict[Path, Job] = {}
    for job in jobs:
        other = first.get(job.output)
        if other is not None:
            raise UsageError(
                f"name template {template!r} is not unique: group {other.group.name!r} prompt "
                f"{other.prompt_id!r} seed {other.seed} and group {job.group.name!r} prompt "
                f"{job.prompt_id!r} seed {job.seed} both go to {job.output.as_posix()} "
                "(add {group}, {prompt_id}, {seed} or {index} to --name-template)"
            )
        first[job.output] = job


def build_plan(
    *,
    groups: Sequence[Path],
    out_dir: Path,
    prompts_file: Path | None = None,
    prompt: str | None = None,
    preset: str | None = None,
    cli: Mapping[str, Any] | None = None,
    base_model: str = DEFAULT_BASE_MODEL,
    mllm: str = DEFAULT_MLLM,
    adapter: str = DEFAULT_ADAPTER,
    device: str | None = None,
    dtype: str | None = None,
    attention: str = "auto",
    overwrite: bool = False,
    fail_fast: bool = False,
    name_template: str | None = None,
    model_defaults: Mapping[str, Any] | None = None,
) -> Plan:
    """Validate everything and expand groups × prompts × seeds into a :class:`Plan`.

    ``model_defaults`` replace built-in defaults for a model family (``--model tiny`` uses a
    64² size); they rank with the built-ins, below the preset.

    Settings precedence: built-in < preset < prompt-file ``defaults`` < ``cli`` < per-prompt
    fields (``None`` = not given). ``cli`` holds generation options (keys of
    :data:`OPTION_KEYS`) from the command line.

    Raises:
        UsageError: for anything wrong (both or neither of ``prompts_file``/``prompt``, bad
            groups, presets, prompt files, options, name templates, unknown group filters,
            colliding output names).
    """
    # 1. Exactly one prompt source.
    if (prompts_file is None) == (prompt is None):
        raise UsageError("give exactly one of --prompts FILE.yaml or --prompt TEXT")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty")

    # 2. Cheap checks on plain options, then the name template, before touching files.
    attention = _check_attention(attention)
    dtype = _check_dtype(dtype)
    template = DEFAULT_NAME_TEMPLATE if name_template is None else name_template
    check_name_template(template)
    cli_options, cli_problems = validate_options(dict(cli or {}))
    if cli_problems:
        raise UsageError(
            "\n".join(f"--{key.replace('_', '-')}: {msg}" for key, msg in cli_problems)
        )

    # 3. Preset, prompts, groups.
    preset_options: Mapping[str, Any] = {}
    if preset is not None:
        from easyref_cli.presets import load_preset  # presets imports this module

        preset_options = load_preset(preset)
    if prompts_file is not None:
        prompt_file = load_prompt_file(Path(prompts_file))
    else:
        prompt_file = PromptFile(
            path=Path("<--prompt>"), defaults={}, prompts=(PromptSpec(index=0, prompt=prompt),)
        )
    found_groups = find_groups([Path(g) for g in groups])
    group_names = {g.name for g in found_groups}
    for spec in prompt_file.prompts:
        unknown = [g for g in spec.groups or () if g not in group_names]
        if unknown:
            line = spec.key_lines.get("groups", spec.line)
            where = f"{prompt_file.path}:{line}" if line else str(prompt_file.path)
            raise UsageError(
                f"{where}: prompts[{spec.index}].groups: unknown group(s) {', '.join(unknown)} "
                f"(groups found: {', '.join(g.name for g in found_groups)})"
            )

    # 4. Resolve settings per prompt (the one precedence function) and expand seeds.
    base = resolve_settings(BUILTIN_DEFAULTS, model_defaults, preset_options, prompt_file.defaults, cli_options)
    prompt_ids = assign_prompt_ids(prompt_file.prompts)
    expanded: list[tuple[PromptSpec, str, dict[str, Any], tuple[int, ...]]] = []
    for spec, prompt_id in zip(prompt_file.prompts, prompt_ids, strict=True):
        settings = resolve_settings(base, spec.options)
        if spec.seeds is not None:
            seeds = spec.seeds
        else:
            first_seed, count = settings["seed"], settings["images_per_prompt"]
            if first_seed + count - 1 > MAX_SEED:
                raise UsageError(
                    f"prompts[{spec.index}]: seeds {first_seed}…{first_seed + count - 1} exceed "
                    f"the maximum seed {MAX_SEED}"
                )
            seeds = tuple(range(first_seed, first_seed + count))
        expanded.append((spec, prompt_id, settings, seeds))

    # 5. Jobs, group-major.
    jobs: list[Job] = []
    for group in found_groups:
        for spec, prompt_id, settings, seeds in expanded:
            if spec.groups is not None and group.name not in spec.groups:
                continue
            caption = spec.prompt if settings["ref_text"] == "prompt" else ""
            for index, seed in enumerate(seeds):
                common = dict(
                    prompt=spec.prompt,
                    negative_prompt=settings["negative_prompt"],
                    caption=caption,
                    instruction=settings["instruction"],
                    steps=settings["steps"],
                    guidance=settings["guidance"],
                    scale=settings["scale"],
                    width=settings["width"],
                    height=settings["height"],
                    scheduler=settings["scheduler"],
                )
                jobs.append(
                    _make_job(
                        group=group, prompt_id=prompt_id, seed=seed, index=index, template=template,
                        preset=preset, models=(base_model, mllm, adapter), settings=common,
                    )
                )
    _check_unique_outputs(jobs, template)

    return Plan(
        jobs=tuple(jobs),
        out_dir=Path(out_dir),
        base_model=base_model,
        mllm=mllm,
        adapter=adapter,
        device=device,
        dtype=dtype,
        attention=attention,
        batch_size=base["batch_size"],
        overwrite=overwrite,
        fail_fast=fail_fast,
        preset=preset,
        name_template=template,
    )


# ----------------------------------------------------------------------------------------------
# Records (PNG metadata) and --from-image
# ----------------------------------------------------------------------------------------------


def reference_entries(group: Group) -> list[dict[str, str]]:
    """``[{"path": absolute path, "sha256": hex}]`` for a group's images, in encoding order."""
    return [{"path": str(p.resolve()), "sha256": sha256_file(p)} for p in group.images]


def job_record(
    job: Job, plan: Plan, *, references: Sequence[Mapping[str, str]] | None = None
) -> dict[str, Any]:
    """The planning part of the provenance record for ``job`` (see :mod:`easyref_cli.files`).

    ``references`` defaults to :func:`reference_entries` (hashing the files); pass it in to hash
    each group once. The runner adds ``adapter_sha256``, ``versions``, ``attention``, ``timings``.
    """
    if references is None:
        references = reference_entries(job.group)
    return {
        "schema": RECORD_SCHEMA,
        "job_id": job.job_id,
        "group": job.group.name,
        "prompt_id": job.prompt_id,
        "index": job.index,
        "output": job.output.as_posix(),
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "caption": job.caption,
        "instruction": job.instruction,
        "seed": job.seed,
        "steps": job.steps,
        "guidance": job.guidance,
        "scale": job.scale,
        "width": job.width,
        "height": job.height,
        "scheduler": job.scheduler,
        "base_model": plan.base_model,
        "mllm": plan.mllm,
        "adapter": plan.adapter,
        "preset": job.preset,
        "references": [dict(r) for r in references],
        "version": __version__,
    }


_RECORD_REQUIRED = {
    "prompt": str,
    "negative_prompt": str,
    "caption": str,
    "instruction": str,
    "seed": int,
    "steps": int,
    "guidance": (int, float),
    "scale": (int, float),
    "width": int,
    "height": int,
    "scheduler": str,
    "references": list,
}


def parse_from_record(record: Mapping[str, Any], *, source: str = "record") -> dict[str, Any]:
    """Settings, texts and reference files needed to regenerate the image a record describes.

    Returns a dict with ``prompt, negative_prompt, caption, instruction, seed, steps, guidance,
    scale, width, height, scheduler, ref_text`` (derived from the caption), ``group``,
    ``prompt_id``, ``index``, ``base_model``, ``mllm``, ``adapter``, ``preset``, ``references``
    (list of Path) and ``reference_sha256`` (list of str or None).

    Raises:
        InputError: naming ``source`` when keys are missing or mistyped.
    """
    problems = []
    for key, kind in _RECORD_REQUIRED.items():
        if key not in record:
            problems.append(f"{key}: missing")
        elif isinstance(record[key], bool) or not isinstance(record[key], kind):
            problems.append(f"{key}: unexpected value {record[key]!r}")
    refs = record.get("references") if isinstance(record.get("references"), list) else []
    if not refs and "references" in record:
        problems.append("references: empty")
    for i, ref in enumerate(refs):
        if not isinstance(ref, Mapping) or not isinstance(ref.get("path"), str):
            problems.append(f"references[{i}]: needs a 'path'")
    if problems:
        raise InputError(
            f"{source}: the easyref record cannot be used to regenerate:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    out = {key: record[key] for key in _RECORD_REQUIRED if key != "references"}
    out["guidance"] = float(out["guidance"])
    out["scale"] = float(out["scale"])
    out["ref_text"] = "prompt" if record["caption"] == record["prompt"] else "none"
    out["group"] = str(record.get("group") or "from-image")
    out["prompt_id"] = str(record.get("prompt_id") or slugify(record["prompt"]))
    out["index"] = int(record.get("index") or 0)
    for key, default in (
        ("base_model", DEFAULT_BASE_MODEL),
        ("mllm", DEFAULT_MLLM),
        ("adapter", DEFAULT_ADAPTER),
    ):
        out[key] = str(record.get(key) or default)
    out["preset"] = record.get("preset")
    out["references"] = [Path(r["path"]) for r in refs]
    out["reference_sha256"] = [r.get("sha256") for r in refs]
    return out


def plan_from_record(
    record: Mapping[str, Any],
    *,
    out_dir: Path,
    source: str = "record",
    base_model: str | None = None,
    mllm: str | None = None,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention: str = "auto",
    batch_size: int = 1,
    overwrite: bool = False,
    fail_fast: bool = False,
    name_template: str | None = None,
    check_hashes: bool = True,
) -> Plan:
    """A one-job :class:`Plan` that regenerates the image described by ``record``.

    The instruction and caption are reused verbatim; model ids come from the record unless
    given. With ``check_hashes`` every reference file must still have its recorded sha256.

    Raises:
        InputError: the record is incomplete. UsageError: a reference file is missing or changed.
    """
    info = parse_from_record(record, source=source)
    for path, digest in zip(info["references"], info["reference_sha256"], strict=True):
        if not path.is_file():
            raise UsageError(f"{source}: reference image {path} no longer exists")
        if check_hashes and digest and sha256_file(path) != digest:
            raise UsageError(
                f"{source}: reference image {path} has changed since the image was made "
                f"(sha256 {digest[:12]}… recorded)"
            )
    refs = info["references"]
    group = Group(name=info["group"], path=refs[0].parent, images=tuple(refs), ignored=())
    base_model = base_model or info["base_model"]
    mllm = mllm or info["mllm"]
    adapter = adapter or info["adapter"]
    template = DEFAULT_NAME_TEMPLATE if name_template is None else name_template
    check_name_template(template)
    preset = info["preset"] if isinstance(info["preset"], str) else None
    setting_keys = (
        "prompt",
        "negative_prompt",
        "caption",
        "instruction",
        "steps",
        "guidance",
        "scale",
        "width",
        "height",
        "scheduler",
    )
    common = {k: info[k] for k in setting_keys}
    job = _make_job(
        group=group, prompt_id=info["prompt_id"], seed=info["seed"], index=info["index"],
        template=template, preset=preset, models=(base_model, mllm, adapter), settings=common,
    )
    return Plan(
        jobs=(job,),
        out_dir=Path(out_dir),
        base_model=base_model,
        mllm=mllm,
        adapter=adapter,
        device=device,
        dtype=_check_dtype(dtype),
        attention=_check_attention(attention),
        batch_size=batch_size,
        overwrite=overwrite,
        fail_fast=fail_fast,
        preset=preset,
        name_template=template,
    )
