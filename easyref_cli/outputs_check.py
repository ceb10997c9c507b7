"""Planning checks on where a plan writes and how much text its MLLM reads. Torch-free.

Each raises :class:`~easyref_cli.errors.UsageError` before any model loads:

* :func:`check_out_dir`: ``-o`` and the folders of the outputs are (or can become) folders;
* :func:`check_outputs_outside_references`: no output goes into a reference folder, where the next
  run would read it as a reference;
* :func:`check_text_lengths`: every caption and instruction fits :data:`MAX_CAPTION_TOKENS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref_cli.errors import UsageError

if TYPE_CHECKING:
    from easyref_cli.jobs import Job
    from easyref_cli.prompts import PromptFile

#: The most tokens the MLLM reads for one caption (``--prompt`` / a prompt's text), and for one
#: instruction. The reference images' tokens and the chat template come on top, counted apart.
MAX_CAPTION_TOKENS = 1024


# ----------------------------------------------------------------------------------------------
# -o and the output folders
# ----------------------------------------------------------------------------------------------


def _first_existing(path: Path) -> Path | None:
    """``path`` or its nearest existing ancestor (None if none can be looked at)."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError:
            return None
    return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return True  # cannot tell: let the write report it


def _is_existing_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False  # cannot tell: let the write report it


def check_out_dir(out_dir: Path, jobs: Iterable[Job] = ()) -> None:
    """``-o`` must be a folder or not exist yet, below folders; so must each output's own folder.

    Raises:
        UsageError: ``-o`` is a file, one of its parents is a file, a file stands where an output
            needs a folder, or a folder stands where an output file goes.
    """
    out_dir = Path(out_dir)
    found = _first_existing(out_dir)
    if found is not None and not _is_dir(found):
        if found == out_dir:
            raise UsageError(f"-o {out_dir} is a file; give a folder")
        raise UsageError(f"-o {out_dir}: {found} is a file, not a folder; give a folder whose parents are folders")
    if found != out_dir:
        return  # -o does not exist yet: nothing inside it does either
    seen: set[Path] = set()
    for job in jobs:
        path = out_dir / job.output
        if path.parent not in seen:
            seen.add(path.parent)
            found = _first_existing(path.parent)
            if found is not None and not _is_dir(found):
                raise UsageError(
                    f"-o {out_dir}: {found} is a file, but output {job.output.as_posix()} needs a folder there; "
                    "move the file away or change --name-template"
                )
        if _is_existing_dir(path):
            raise UsageError(
                f"-o {out_dir}: {path} is a folder, where output {job.output.as_posix()} goes; "
                "move the folder away or change --name-template"
            )


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Path(os.path.abspath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs_outside_references(out_dir: Path, jobs: Sequence[Job], group_args: Sequence[Path] = ()) -> None:
    """No output may land in a reference folder: the next run would take it for a reference.

    Refused: ``-o`` (resolved, symlinks followed) equal to or below a group's folder or a GROUPS
    argument (a folder of groups included), and any output whose folder is equal to or below a
    group's folder (``-o`` above the groups with a template such as ``{group}/...``).

    Raises:
        UsageError: naming ``-o``, the reference folder and what to do.
    """
    out = _resolved(out_dir)
    groups: dict[Path, Path] = {}  # resolved → as given
    for path in dict.fromkeys(job.group.path for job in jobs):
        groups.setdefault(_resolved(path), path)
    folders = dict(groups)  # the groups first: the message names the innermost folder
    for arg in group_args:
        folders.setdefault(_resolved(arg), Path(arg))
    for resolved, shown in folders.items():
        if _inside(out, resolved):
            raise UsageError(
                f"-o {out_dir} is inside the reference folder {shown}; outputs would become references on the "
                "next run; choose an output folder outside it"
            )
    seen: set[Path] = set()
    for job in jobs:
        if job.output.parent in seen:
            continue
        seen.add(job.output.parent)
        folder = _resolved((out / job.output).parent)
        for resolved, shown in groups.items():
            if _inside(folder, resolved):
                raise UsageError(
                    f"-o {out_dir}: output {job.output.as_posix()} would go into the reference folder {shown}; "
                    "outputs would become references on the next run; choose an output folder outside it"
                )


# ----------------------------------------------------------------------------------------------
# How much text the MLLM reads
# ----------------------------------------------------------------------------------------------


def _local_tokenizer_file(mllm: str) -> Path | None:
    """The MLLM's ``tokenizer.json`` if it is on this machine (a local folder or the hub cache); never downloads."""
    folder = Path(mllm).expanduser()
    if folder.is_dir():
        candidate = folder / "tokenizer.json"
        return candidate if candidate.is_file() else None
    from easyref_cli.model.hub import is_repo_id  # torch-free

    if not is_repo_id(mllm):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(mllm, "tokenizer.json")
    except Exception:  # noqa: BLE001 - no cache, odd id: count without a tokenizer
        return None
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


@lru_cache(maxsize=4)
def _load_tokenizer(path: Path):
    """A ``tokenizers.Tokenizer`` (torch-free), or None when the file cannot be read."""
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - a broken file: the model load reports it later
        return None


class TokenCounter:
    """Tells whether a text exceeds ``limit`` MLLM tokens, loading the tokenizer only when needed.

    Qwen2's byte-level BPE never gives more tokens than the text has UTF-8 bytes, so a text of at most
    ``limit`` bytes passes without counting. A longer one is counted with the MLLM's own
    ``tokenizer.json`` when it is on this machine; when it is not, the byte count stands in for the
    token count (so the check never lets through a text over the limit).
    """

    def __init__(self, mllm: str, limit: int = MAX_CAPTION_TOKENS) -> None:
        self.mllm = mllm
        self.limit = limit
        self._tokenizer: Any = None
        self._looked = False

    def _get_tokenizer(self):
        if not self._looked:
            self._looked = True
            path = _local_tokenizer_file(self.mllm)
            self._tokenizer = _load_tokenizer(path) if path is not None else None
        return self._tokenizer

    def excess(self, text: str) -> str | None:
        """None when ``text`` fits; else how long it is (``"1500 tokens"`` or ``"1500 bytes (…)"``)."""
        size = len(text.encode("utf-8", "surrogateescape"))
        if size <= self.limit:
            return None
        tokenizer = self._get_tokenizer()
        if tokenizer is None:
            return (
                f"{size} bytes in UTF-8, each counted as a token (the most Qwen2's byte-level tokenizer can give) "
                "as the MLLM's tokenizer.json is not on this machine; to count tokens exactly, give --mllm a local "
                "folder holding it or download the model into the Hugging Face cache"
            )
        count = len(tokenizer.encode(text, add_special_tokens=False).ids)
        return f"{count} tokens" if count > self.limit else None


def check_text_lengths(
    jobs: Sequence[Job], mllm: str, prompt_file: PromptFile | None = None, *, limit: int = MAX_CAPTION_TOKENS
) -> None:
    """Every job's caption and instruction fit ``limit`` MLLM tokens (see :class:`TokenCounter`).

    ``prompt_file``, when given, locates the prompt (``file:line``) in the message.

    Raises:
        UsageError: naming the prompt id, where it comes from, its length and the limit.
    """
    counter = TokenCounter(mllm, limit)
    locate = _locator(prompt_file)
    checked: set[tuple[str, str, str]] = set()
    for job in jobs:
        for key, what, other, text in (
            ("prompt", "text", "instruction", job.caption),
            ("instruction", "instruction", "prompt", job.settings.instruction),
        ):
            if (job.prompt_id, key, text) in checked:
                continue
            checked.add((job.prompt_id, key, text))
            excess = counter.excess(text)
            if excess is None:
                continue
            raise UsageError(
                f"{locate(job.prompt_id, key)}prompt {job.prompt_id!r}: its {what} is {excess}; the MLLM takes at "
                f"most {limit} tokens of it (MAX_CAPTION_TOKENS; the reference images and the {other} count apart): "
                f"shorten the {what}"
            )


def _locator(prompt_file: PromptFile | None) -> Callable[[str, str], str]:
    """``(prompt_id, key) -> "file:line: "`` for the message ('' when unknown)."""
    if prompt_file is None:
        return lambda prompt_id, key: ""
    from easyref_cli.naming import assign_prompt_ids

    specs = dict(zip(assign_prompt_ids(prompt_file.prompts), prompt_file.prompts, strict=True))

    def locate(prompt_id: str, key: str) -> str:
        spec = specs.get(prompt_id)
        if spec is None:
            return ""
        if spec.line is None:  # --prompt TEXT
            return "--prompt: " if key == "prompt" else ""
        if key != "prompt" and key not in spec.key_lines:
            return ""  # not set by this prompt: --instruction, a preset or defaults:
        return f"{prompt_file.location(spec, key)}: "

    return locate
