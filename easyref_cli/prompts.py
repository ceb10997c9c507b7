"""The prompt file: ``defaults:`` (any setting) and ``prompts:`` (strings or mappings). Torch-free.

Three formats make the same :class:`PromptFile` (so the same plan):

* **YAML** — a mapping with an optional ``defaults:`` (any setting) and a ``prompts:`` list of
  strings or mappings (keys in :data:`PROMPT_KEYS`);
* **text** — one prompt per line; blank lines and lines starting with ``#`` are skipped, a ``#``
  later in a line is part of the prompt, leading and trailing whitespace is stripped;
* **JSON Lines** — one JSON object per line with the keys of a YAML ``prompts:`` item, or a bare
  JSON string (a prompt); blank lines (and ``#`` lines) are skipped.

Text and JSON Lines have no ``defaults:``: settings come from the command line and the preset.

The format: by extension — ``.yaml``/``.yml`` YAML, ``.txt`` text, ``.jsonl``/``.ndjson`` JSON
Lines; for standard input (``--prompts -``) or any other extension, by content — JSON Lines if
every non-blank line not starting with ``#`` starts with ``{``; else YAML if the text parses to a
mapping with a ``prompts:`` (or ``defaults:``) key, or does not parse but has such a top-level key
line (so its YAML error is reported); otherwise text.

Every problem is reported at once, each as ``file:line: where: message`` (standard input is
``<stdin>``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from easyref_cli.errors import UsageError
from easyref_cli.settings import MAX_SEED, PER_PROMPT_KEYS, Invalid, as_int, validate_settings
from easyref_cli.yamlio import Problem, format_problems, line_of, load_yaml_text_with_lines, read_text

#: ``control:`` — the ControlNet settings of a prompt (or of ``defaults:``) in one key: a control image, a
#: mapping of these fields, or a list of such mappings (one per ControlNet, in ``--controlnet`` order).
CONTROL_FIELDS = {"image": "control_image", "scale": "control_scale", "start": "control_start",
                  "end": "control_end", "preprocess": "control_preprocess"}  # fmt: skip
#: Every key a prompt mapping may hold: the text, its id, the per-prompt settings, seeds and groups.
PROMPT_KEYS: tuple[str, ...] = ("prompt", "id", *PER_PROMPT_KEYS, "control", "seeds", "groups")
PROMPT_FILE_KEYS = ("defaults", "prompts")

#: ``--prompts -``: read the prompt file from standard input, named ``<stdin>`` in errors.
STDIN = "-"
STDIN_NAME = "<stdin>"
#: The prompt file formats, by file extension; another extension (or stdin) is told by content.
FORMAT_BY_SUFFIX = {".yaml": "yaml", ".yml": "yaml", ".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: The extension that makes a file of each format read as that format.
SUFFIX_BY_FORMAT = {"yaml": ".yaml", "txt": ".txt", "jsonl": ".jsonl"}


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


def expand_control(item: Mapping[str, Any], problem) -> dict[str, Any]:
    """``item`` with its ``control:`` key spelled out as the flat ``control_*`` settings
    (:data:`CONTROL_FIELDS`); ``problem(key, message)`` for a malformed one."""
    if "control" not in item:
        return dict(item)
    out = {k: v for k, v in item.items() if k != "control"}
    flat = sorted(k for k in CONTROL_FIELDS.values() if k in item)
    if flat:
        problem("control", f"give either 'control' or {', '.join(flat)}, not both")
        return out
    raw = item["control"]
    nets = raw if isinstance(raw, list) else [raw]
    if not nets or not all(isinstance(n, (str, dict)) for n in nets):
        problem("control", f"must be a control image, a mapping of {', '.join(CONTROL_FIELDS)}, or a list of them")
        return out
    nets = [{"image": n} if isinstance(n, str) else n for n in nets]
    unknown = sorted({str(k) for n in nets for k in n} - set(CONTROL_FIELDS))
    if unknown or not all("image" in n for n in nets):
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else "each ControlNet needs an 'image'"
        problem("control", f"{what} (allowed: {', '.join(CONTROL_FIELDS)})")
        return out
    for field_name, key in CONTROL_FIELDS.items():
        given = [field_name in n for n in nets]
        if any(given) and not all(given):  # a default for the others would silently win over flags and defaults
            problem("control", f"give '{field_name}' for every ControlNet of the list, or for none")
        elif all(given):
            out[key] = [n[field_name] for n in nets]
    return out


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
    item = expand_control(item, problem)
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
    if at + ("control",) in lines:
        key_lines.update({k: lines[at + ("control",)] for k in CONTROL_FIELDS.values() if k in item})
    spec = PromptSpec(index, item["prompt"], prompt_id, options, seeds, groups, line, key_lines)
    return spec, []


def _check_defaults(data: Mapping[str, Any], lines) -> tuple[dict[str, Any], list[Problem]]:
    raw = data.get("defaults")
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [(line_of(lines, ("defaults",)), "defaults", "must be a mapping of options")]
    problems: list[Problem] = []
    raw = expand_control(
        raw, lambda key, msg: problems.append((line_of(lines, ("defaults", key)), f"defaults.{key}", msg))
    )
    defaults, option_problems = validate_settings(raw)
    where = {k: "control" if k in CONTROL_FIELDS.values() and "control" in data["defaults"] else k for k in raw}
    return defaults, problems + [
        (line_of(lines, ("defaults", where.get(k, k))), f"defaults.{k}", msg) for k, msg in option_problems
    ]


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
    return specs, problems + _check_unique_ids(specs, lines)


def _check_unique_ids(specs: list[PromptSpec], lines: Mapping[tuple, int]) -> list[Problem]:
    problems: list[Problem] = []
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
    return problems


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
    return _yaml_prompt_file(read_text(path, "prompt file"), path)


def _yaml_prompt_file(text: str, path: Path) -> PromptFile:
    data, lines = load_yaml_text_with_lines(text, path, what="prompt file")
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


# ----------------------------------------------------------------------------------------------
# Text, JSON Lines, standard input; the format by extension or content
# ----------------------------------------------------------------------------------------------

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: A top-level ``prompts:``/``defaults:`` key line: YAML even when the document does not parse.
_YAML_TOP_KEY = re.compile(r"^(prompts|defaults)[ \t]*:(\s|$)", re.MULTILINE)


@dataclass(frozen=True)
class PromptText:
    """A prompt file read already — standard input, read once by the command line — and its name in errors."""

    text: str
    name: str = STDIN_NAME

    @property
    def format(self) -> str:
        """``yaml``, ``txt`` or ``jsonl``, told by content (:func:`detect_format`)."""
        return detect_format(self.text)

    @property
    def suffix(self) -> str:
        """The extension a file holding this text needs to be read as the same format."""
        return SUFFIX_BY_FORMAT[self.format]


def is_stdin(source: Any) -> bool:
    """True for ``--prompts -`` (``"-"`` or ``Path("-")``), not yet read."""
    return source is not None and not isinstance(source, PromptText) and str(source) == STDIN


def read_stdin(stream: IO[Any] | None = None) -> PromptText:
    """Read all of standard input (or ``stream``) once, as UTF-8 (a BOM dropped).

    Raises:
        UsageError: standard input closed, unreadable, or not UTF-8.
    """
    stream = sys.stdin if stream is None else stream
    if stream is None:
        raise UsageError(f"--prompts {STDIN}: standard input is closed; pipe a prompt file in")
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError, OSError):
        interactive = False
    if interactive:  # reading would wait for typing: say how it is meant to be used instead
        raise UsageError(f"--prompts {STDIN} reads a prompt file piped in (… | easyref generate … --prompts -)")
    try:
        raw = getattr(stream, "buffer", stream).read()
    except OSError as e:
        raise UsageError(f"cannot read prompt file {STDIN_NAME} (--prompts {STDIN}): {e.strerror or e}") from None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UsageError(f"prompt file {STDIN_NAME} (--prompts {STDIN}) is not UTF-8 text ({e.reason})") from None
    return PromptText(raw.removeprefix("\ufeff"))


def _content_lines(text: str):
    """(line number, line, stripped line) of each line that is neither blank nor a ``#`` comment."""
    for number, raw in enumerate(_LINE_BREAK.split(text), 1):
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            yield number, raw, stripped


def detect_format(text: str) -> str:
    """The format of a prompt file's text (no extension to go by): ``jsonl``, ``yaml`` or ``txt``.

    JSON Lines if every non-blank line not starting with ``#`` starts with ``{``; YAML if the text
    parses to a mapping with ``prompts:`` or ``defaults:``, or fails to parse but has such a
    top-level key line; otherwise text (one prompt per line).
    """
    content = [stripped for _, _, stripped in _content_lines(text)]
    if content and all(line.startswith("{") for line in content):
        return "jsonl"
    try:
        data, _ = load_yaml_text_with_lines(text, Path(STDIN_NAME), what="prompt file")
    except UsageError:
        return "yaml" if _YAML_TOP_KEY.search(text) else "txt"
    if isinstance(data, dict) and any(key in data for key in PROMPT_FILE_KEYS):
        return "yaml"
    return "txt"


def _no_prompts(path: Path, what: str) -> UsageError:
    return UsageError(f"{path}: the prompt file has no prompts ({what})")


def _txt_prompt_file(text: str, path: Path) -> PromptFile:
    specs = tuple(
        PromptSpec(index=index, prompt=stripped, line=number)
        for index, (number, _, stripped) in enumerate(_content_lines(text))
    )
    if not specs:
        raise _no_prompts(path, "one prompt per line; blank lines and lines starting with '#' are skipped")
    return PromptFile(path=path, defaults={}, prompts=specs)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _jsonl_prompt_file(text: str, path: Path, *, detected: bool = False) -> PromptFile:
    lines: dict[tuple, int] = {}
    specs: list[PromptSpec] = []
    problems: list[Problem] = []
    malformed = False
    for index, (number, raw, stripped) in enumerate(_content_lines(text)):
        at, where = ("prompts", index), f"prompts[{index}]"
        try:
            item = json.loads(stripped, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            problems.append((number, where, f"duplicate key {e.args[0]!r} in the JSON object"))
            continue
        except json.JSONDecodeError as e:
            column = e.colno + len(raw) - len(raw.lstrip())
            problems.append((number, where, f"not valid JSON: {e.msg} (column {column})"))
            malformed = True
            continue
        except RecursionError:
            problems.append((number, where, "JSON nested too deeply"))
            continue
        lines[at] = number  # every key of a line is on that line
        if isinstance(item, dict):
            lines.update({at + (key,): number for key in item})
        spec, item_problems = check_prompt_item(item, index, lines)
        problems += item_problems
        if spec is not None:
            specs.append(spec)
    if not problems and not specs:
        raise _no_prompts(path, "one JSON object or string per line; blank lines are skipped")
    problems += _check_unique_ids(specs, lines)
    if problems:
        message = format_problems(path, "invalid prompt file", problems)
        if detected and malformed:
            message += (
                "\n(read as JSON Lines because every line starts with '{'; a .txt file is read as one prompt per line)"
            )
        raise UsageError(message)
    return PromptFile(path=path, defaults={}, prompts=tuple(specs))


def parse_prompts(text: str, path: Path, fmt: str | None = None) -> PromptFile:
    """A prompt file's text → :class:`PromptFile`; ``fmt`` (``yaml``/``txt``/``jsonl``) or, if
    ``None``, told by content (:func:`detect_format`). ``path`` names the file in errors."""
    detected = fmt is None
    fmt = detect_format(text) if fmt is None else fmt
    if fmt == "yaml":
        return _yaml_prompt_file(text, path)
    if fmt == "txt":
        return _txt_prompt_file(text, path)
    if fmt == "jsonl":
        return _jsonl_prompt_file(text, path, detected=detected)
    raise ValueError(f"unknown prompt file format {fmt!r}")


def load_prompts(source: str | Path | PromptText, *, stdin: IO[Any] | PromptText | None = None) -> PromptFile:
    """Read and validate ``--prompts``: a YAML, text or JSON Lines file, or ``-`` (standard input).

    ``source`` may also be a :class:`PromptText` (standard input read already, by the command line);
    for ``-``, ``stdin`` is that text or the stream to read (default ``sys.stdin``). The format is
    chosen by extension, else by content (see the module docstring).

    Raises:
        UsageError: a missing, unreadable or non-UTF-8 file, a directory, and every problem of its
            content, each as ``file:line: where: message`` (``<stdin>`` for standard input); a file
            without prompts.
    """
    if is_stdin(source):
        source = stdin if isinstance(stdin, PromptText) else read_stdin(stdin)
    if isinstance(source, PromptText):
        return parse_prompts(source.text, Path(source.name))
    path = Path(source)
    text = read_text(path, "prompt file")
    return parse_prompts(text, path, FORMAT_BY_SUFFIX.get(path.suffix.lower()))
