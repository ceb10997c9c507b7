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

#: The most nodes aliases (``*name``) may add to a document when expanded. Nested anchors that
#: repeat each other ("billion laughs": 9 levels of 9 aliases are 9**9 strings) are refused before
#: any Python object is built; ``<<: *defaults`` and other ordinary reuse stay far below it.
MAX_ALIAS_NODES = 100_000


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


def read_text(path: Path, what: str) -> str:
    """A text file's contents (UTF-8, a BOM dropped); a UsageError naming ``what`` and ``path`` when it is
    missing, a directory, unreadable or not UTF-8."""
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


class _AliasBudget:
    """Counts the nodes aliases add to a composed node graph, refusing more than ``limit``.

    Each node's expanded size (itself plus everything under it, aliases expanded) is computed once
    and memoised by node identity, so the count costs one pass over the nodes as written, however
    large the expansion; an alias that points into its own node (a recursive structure) is refused.
    """

    def __init__(self, path: Path, what: str, limit: int = MAX_ALIAS_NODES):
        self.path, self.what, self.limit = path, what, limit
        self.added = 0
        self._sizes: dict[int, int | None] = {}  # id(node) → expanded size; None while being counted

    def count(self, n: yaml.Node, line: int) -> int:
        """The expanded size of ``n``, reached from a node starting on ``line`` (where an alias sits)."""
        key = id(n)
        if key in self._sizes:
            size = self._sizes[key]
            if size is None:
                raise UsageError(
                    f"{self.path}:{line}: YAML alias in {self.what} refers to a node that contains it (a recursive "
                    f"structure, anchored on line {n.start_mark.line + 1}); write the value out instead"
                )
            self.added += size  # a second reference: an alias repeating the whole node
            if self.added > self.limit:
                raise UsageError(
                    f"{self.path}:{line}: YAML aliases in {self.what} expand to more than {self.limit:,} nodes "
                    "(anchors repeating anchors, as in a 'billion laughs' file); write the values out or repeat "
                    "less"
                )
            return size
        self._sizes[key] = None
        here = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            size = 1 + sum(self.count(k, here) + self.count(v, k.start_mark.line + 1) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            size = 1 + sum(self.count(item, here) for item in n.value)
        else:
            size = 1
        self._sizes[key] = size
        return size


def load_yaml_with_lines(path: Path, *, what: str = "YAML file") -> tuple[Any, dict[tuple, int]]:
    """``yaml.safe_load`` a file, also returning 1-based line numbers per data path.

    ``lines[("prompts", 2, "steps")]`` is the line of the ``steps`` key of the third prompt;
    ``lines[("prompts", 2)]`` is where that item starts; ``lines[()]`` the document start.
    Duplicate mapping keys, which PyYAML would silently collapse, are errors, and so are aliases
    that would expand to more than :data:`MAX_ALIAS_NODES` nodes, or into themselves.

    Raises:
        UsageError: missing/unreadable file, YAML syntax error (with ``file:line``), several
            documents, duplicate keys, runaway or recursive aliases, nesting too deep.
    """
    path = Path(path)
    return load_yaml_text_with_lines(read_text(path, what), path, what=what)


def load_yaml_text_with_lines(text: str, path: Path, *, what: str = "YAML file") -> tuple[Any, dict[tuple, int]]:
    """:func:`load_yaml_with_lines` for text already read (standard input); ``path`` names it in errors."""
    walker = _LineWalker(path)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        # Walk the node tree before constructing: construction flattens '<<' merges in place,
        # which would look like duplicate keys; and count what aliases expand to before building it.
        if node is not None:
            _AliasBudget(path, what).count(node, node.start_mark.line + 1)
            walker.walk(node, ())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise UsageError(f"{_yaml_error_message(e, path)} in {what}: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: YAML error in {what}: {e}") from None
    except RecursionError:
        raise UsageError(f"{path}: {what} is nested too deeply to read; flatten its lists and mappings") from None
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
