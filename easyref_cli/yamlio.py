"""YAML with line numbers, shared by prompt files and presets. Torch-free.

One error format everywhere: ``path:line: where: message`` (``where`` is a key path such as
``prompts[2].steps``); several problems are listed under one header line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from easyref_cli.errors import UsageError

#: One problem: (line or None, where, message).
Problem = tuple[int | None, str, str]


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


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None


class _LineWalker:
    """Records the 1-based line of every data path of a node tree, and duplicate mapping keys."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.duplicates: list[str] = []
        self._seen: set[int] = set()

    def walk(self, n: yaml.Node, at: tuple) -> None:
        self.lines.setdefault(at, n.start_mark.line + 1)
        if id(n) in self._seen:  # aliases (and recursive documents) are walked once
            return
        self._seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, key_line = key_node.value, key_node.start_mark.line + 1
                if key in first_line and key != "<<":
                    self.duplicates.append(
                        f"{self.path}:{key_line}: duplicate key {key!r} (first on line {first_line[key]})"
                    )
                first_line.setdefault(key, key_line)
                self.lines.setdefault(at + (key,), key_line)
                self.walk(value_node, at + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                self.walk(item, at + (i,))


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
    text = _read_text(path, what)
    walker = _LineWalker(path)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        # Walk the node tree before constructing: construction flattens '<<' merges in place,
        # which would look like duplicate keys.
        if node is not None:
            walker.walk(node, ())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise UsageError(f"{_yaml_error_message(e, path)} in {what}: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: YAML error in {what}: {e}") from None
    finally:
        loader.dispose()
    if walker.duplicates:
        raise UsageError("\n".join(walker.duplicates))
    return data, walker.lines


def line_of(lines: Mapping[tuple, int], at: tuple) -> int | None:
    """The line of ``at`` or of its closest recorded ancestor."""
    while True:
        if at in lines:
            return lines[at]
        if not at:
            return None
        at = at[:-1]


def format_problems(path: Path, header: str, problems: list[Problem]) -> str:
    """``path:line: where: message``, one line per problem (under ``header path (N problems):``)."""
    rendered = [
        f"{path}:{line}: {where}: {msg}" if line else f"{path}: {where}: {msg}" for line, where, msg in problems
    ]
    if len(rendered) == 1:
        return rendered[0]
    return f"{header} {path} ({len(rendered)} problems):\n" + "\n".join(f"  {r}" for r in rendered)
