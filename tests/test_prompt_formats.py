"""Prompts for shell pipelines: ``--prompts -`` (standard input) and .txt / .jsonl prompt files."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from easyref_cli import distributed, prompts
from easyref_cli import plan as P
from easyref_cli.cli import app
from easyref_cli.commands import generate as G
from easyref_cli.errors import UsageError

YAML = """\
prompts:
  - a lighthouse at dusk
  - "a knight # in armour"
  - prompt: a cat on a mat
    id: cat
    seeds: [1, 2]
    steps: 12
    groups: [cats]
"""
JSONL = """\
{"prompt": "a lighthouse at dusk"}

{"prompt": "a knight # in armour"}
{"prompt": "a cat on a mat", "id": "cat", "seeds": [1, 2], "steps": 12, "groups": ["cats"]}
"""
JSONL_STRINGS = JSONL.replace('{"prompt": "a lighthouse at dusk"}', '"a lighthouse at dusk"')  # .jsonl only
TXT_YAML = """\
prompts:
  - a lighthouse at dusk
  - "a knight # in armour"
"""
TXT = """\
# two prompts; this line is a comment

   a lighthouse at dusk\t
a knight # in armour
"""


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def refs(tmp_path):
    root = tmp_path / "refs"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i, i, i)).save(root / name / f"{i}.png")
    return root


def _jobs(tmp_path, refs, prompts_file):
    plan = P.build_plan(groups=[refs], out_dir=tmp_path / "out", prompts_file=prompts_file)
    return [(j.job_id, str(j.output), j.prompt, j.settings.seed, j.settings.steps) for j in plan.jobs]


def _stdin(monkeypatch, text: str | bytes) -> None:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# The same plan from every format and source
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, text, name",
    [
        (YAML, YAML, None),  # stdin YAML
        (YAML, JSONL, None),
        (TXT_YAML, TXT, None),
        (YAML, JSONL, "p.jsonl"),
        (YAML, JSONL, "p.ndjson"),
        (YAML, JSONL_STRINGS, "p.jsonl"),
        (TXT_YAML, TXT, "p.txt"),
        (YAML, YAML, "p.yml"),
        (YAML, JSONL, "p.prompts"),  # another extension: by content
        (TXT_YAML, TXT, "prompts"),
        (YAML, YAML, "p.in"),
    ],
    ids=[
        "stdin-yaml",
        "stdin-jsonl",
        "stdin-txt",
        "jsonl",
        "ndjson",
        "jsonl-strings",
        "txt",
        "yml",
        "jsonl-content",
        "txt-content",
        "yaml-content",
    ],  # fmt: skip
)
def test_every_format_and_stdin_plans_like_the_yaml_file(tmp_path, refs, monkeypatch, yaml_text, text, name):
    expected = _jobs(tmp_path, refs, _write(tmp_path / "equivalent.yaml", yaml_text))
    assert len(expected) == (6 if yaml_text == YAML else 4)
    if name is None:
        _stdin(monkeypatch, text)
        source = "-"
    else:
        source = _write(tmp_path / name, text)
    assert _jobs(tmp_path, refs, source) == expected


def test_stdin_read_once_by_the_cli_plans_like_the_file(tmp_path, refs, monkeypatch):
    expected = _jobs(tmp_path, refs, _write(tmp_path / "p.yaml", YAML))
    source = prompts.read_stdin(io.BytesIO(("\ufeff" + JSONL).encode("utf-8")))
    assert source.format == "jsonl" and source.suffix == ".jsonl"
    monkeypatch.setattr("sys.stdin", None)  # never read again
    assert _jobs(tmp_path, refs, source) == expected
    assert prompts.load_prompts(Path("-"), stdin=source).path == Path("<stdin>")


def test_txt_lines_comments_and_whitespace(tmp_path):
    text = "# header\n\n  first prompt  \r\n\t# indented comment\nsecond # with a hash\n#third\n  \nlast"
    pf = prompts.load_prompts(_write(tmp_path / "p.txt", text))
    assert [(s.index, s.prompt, s.line) for s in pf.prompts] == [
        (0, "first prompt", 3),
        (1, "second # with a hash", 5),
        (2, "last", 8),
    ]
    assert pf.defaults == {} and pf.path == tmp_path / "p.txt"


def test_txt_is_never_read_as_yaml_or_json(tmp_path):
    text = "- a: b\n[not, a, list]\nkey: value\n"
    pf = prompts.load_prompts(_write(tmp_path / "p.txt", text))
    assert [s.prompt for s in pf.prompts] == ["- a: b", "[not, a, list]", "key: value"]


def test_jsonl_items_keep_their_settings_and_lines(tmp_path):
    text = '\n{"prompt": "a", "seed": 4, "images_per_prompt": 2, "ref_text": "none"}\n\n"b"\n'
    pf = prompts.load_prompts(_write(tmp_path / "p.jsonl", text))
    first, second = pf.prompts
    assert (first.index, first.line, second.index, second.line) == (0, 2, 1, 4)
    assert first.options == {"seed": 4, "images_per_prompt": 2, "ref_text": "none"}
    assert first.key_lines == {"prompt": 2, "seed": 2, "images_per_prompt": 2, "ref_text": 2}
    assert second.prompt == "b" and second.options == {}


# ----------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (YAML, "yaml"),
        ("# a comment\ndefaults:\n  steps: 3\nprompts: [a]\n", "yaml"),
        ("---\nprompts:\n  - a\n", "yaml"),
        ("defaults:\n  steps: 3\n", "yaml"),  # YAML, so its missing prompts: is reported
        ("prompts:\n  - a\n - b\n", "yaml"),  # does not parse, but is meant as YAML: its error is reported
        (JSONL, "jsonl"),
        ('"a"\n{"prompt": "b"}\n', "txt"),  # a bare JSON string: not every line starts with '{'
        ('{"prompt": "a"}\n\n  {"prompt": "b"}\n', "jsonl"),
        ('# comment\n{"prompt": "a"}\n', "jsonl"),
        ("{broken\n", "jsonl"),
        (TXT, "txt"),
        ("a cat: on a mat\n", "txt"),  # a mapping without prompts:
        ("- a\n- b\n", "txt"),  # a YAML list
        ('a "quoted: thing\n  : x\n', "txt"),  # not YAML at all
        ("", "txt"),
    ],
)
def test_detect_format(text, expected):
    assert prompts.detect_format(text) == expected
    assert prompts.PromptText(text).suffix == prompts.SUFFIX_BY_FORMAT[expected]


def test_extension_wins_over_content(tmp_path):
    pf = prompts.load_prompts(_write(tmp_path / "p.txt", '{"prompt": "a"}\n'))
    assert [s.prompt for s in pf.prompts] == ['{"prompt": "a"}']
    with pytest.raises(UsageError, match=r"p\.jsonl:1: prompts\[0\]: must be a string or a mapping"):
        prompts.load_prompts(_write(tmp_path / "p.jsonl", "[1, 2]\n"))


# ----------------------------------------------------------------------------------------------
# Errors name the file and line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "a"}\n\n{"prompt": "b",}\n', r"p\.jsonl:3: prompts\[1\]: not valid JSON: .*\(column 16\)"),
        ('{"prompt": "a", "bogus": 1}\n', r"p\.jsonl:1: prompts\[0\]\.bogus: unknown key \(allowed: prompt, id"),
        ('"a"\n{"prompt": "b", "steps": "many"}\n', r"p\.jsonl:2: prompts\[1\]\.steps: "),
        ('{"prompt": "b", "seed": 1, "seeds": [1]}\n', r"p\.jsonl:1: prompts\[0\]\.seeds: give either 'seed'"),
        ('{"prompt": "a", "prompt": "b"}\n', r"p\.jsonl:1: prompts\[0\]: duplicate key 'prompt'"),
        ('{"steps": 3}\n', r"p\.jsonl:1: prompts\[0\]: missing required key 'prompt'"),
        ('"  "\n', r"p\.jsonl:1: prompts\[0\]: empty prompt"),
        ("null\n", r"p\.jsonl:1: prompts\[0\]: must be a string or a mapping"),
        (
            '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
            r"p\.jsonl:2: prompts\[1\]\.id: duplicate id 'x' \(also prompts\[0\], line 1\)",
        ),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        prompts.load_prompts(_write(tmp_path / "p.jsonl", text))


def test_jsonl_reports_every_problem_at_once(tmp_path):
    text = '{"prompt": "a", "bogus": 1}\n{nope\n{"prompt": "c", "steps": -1}\n'
    with pytest.raises(UsageError) as e:
        prompts.load_prompts(_write(tmp_path / "p.jsonl", text))
    msg = str(e.value)
    assert "(3 problems)" in msg
    assert [line.split(":")[1] for line in msg.splitlines()[1:]] == ["1", "2", "3"]


def test_stdin_errors_are_named_stdin_and_explain_the_detection(monkeypatch):
    _stdin(monkeypatch, '{"prompt": "a"}\n{a cat}\n')
    with pytest.raises(UsageError) as e:
        prompts.load_prompts("-")
    assert str(e.value).startswith("<stdin>:2: prompts[1]: not valid JSON")
    assert "read as JSON Lines because every line starts with '{'" in str(e.value)
    _stdin(monkeypatch, "prompts:\n  - a\n - b\n")
    with pytest.raises(UsageError, match=r"^<stdin>:3: YAML syntax error in prompt file"):
        prompts.load_prompts("-")


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl", None])
@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n\n"])
def test_a_file_without_prompts_is_an_error(tmp_path, monkeypatch, name, text):
    if name is None:
        _stdin(monkeypatch, text)
        source, shown = "-", "<stdin>"
    else:
        source = _write(tmp_path / name, text)
        shown = str(source)
    with pytest.raises(UsageError, match=rf"^{shown}: the prompt file has no prompts"):
        prompts.load_prompts(source)


def test_unusable_paths_are_named(tmp_path, monkeypatch):
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    with pytest.raises(UsageError, match=rf"prompt file {folder} is a directory"):
        prompts.load_prompts(folder)
    with pytest.raises(UsageError, match=r"prompt file not found: .*missing\.jsonl"):
        prompts.load_prompts(tmp_path / "missing.jsonl")
    latin = _write(tmp_path / "p.txt", "caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=rf"prompt file {latin} is not UTF-8 text"):
        prompts.load_prompts(latin)
    _stdin(monkeypatch, "caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"prompt file <stdin> \(--prompts -\) is not UTF-8 text"):
        prompts.load_prompts("-")
    monkeypatch.setattr("sys.stdin", None)
    with pytest.raises(UsageError, match="standard input is closed"):
        prompts.load_prompts("-")


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    path = _write(tmp_path / "p.jsonl", '"a"\n')

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # chmod binds no root
    with pytest.raises(UsageError, match=rf"cannot read prompt file {path}: Permission denied"):
        prompts.load_prompts(path)


def test_load_prompt_file_still_reads_yaml(tmp_path):
    pf = prompts.load_prompt_file(_write(tmp_path / "p.txt", YAML))  # YAML whatever the extension
    assert [s.prompt for s in pf.prompts] == ["a lighthouse at dusk", "a knight # in armour", "a cat on a mat"]


# ----------------------------------------------------------------------------------------------
# --num-processes: the launched processes read a copy of standard input
# ----------------------------------------------------------------------------------------------


def test_stdin_prompts_argv_rewrites_only_the_prompts_value(tmp_path):
    path = tmp_path / "stdin-prompts.txt"
    argv = ["generate", "g", "--prompt", "-", "--prompts", "-", "-o", "-", "--num-processes", "2"]
    assert G._stdin_prompts_argv(argv, path) == [
        "generate", "g", "--prompt", "-", "--prompts", str(path), "-o", "-", "--num-processes", "2",
    ]  # fmt: skip
    assert G._stdin_prompts_argv(["generate", "--prompts=-", "g"], path) == ["generate", f"--prompts={path}", "g"]
    assert G._stdin_prompts_argv(["generate", "--prompts", "p.yaml"], path) == ["generate", "--prompts", "p.yaml"]


@pytest.mark.parametrize("text, suffix", [(YAML, ".yaml"), (TXT, ".txt"), ('{"prompt": "a"}\n', ".jsonl")])
def test_relaunch_passes_a_copy_of_stdin_with_the_detected_format(tmp_path, monkeypatch, text, suffix):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = {}

    def fake_relaunch(num_processes, argv):
        path = Path(argv[argv.index("--prompts") + 1])
        seen.update(n=num_processes, argv=argv, path=path, text=path.read_text(encoding="utf-8"))
        seen["prompts"] = prompts.load_prompts(path).prompts  # what each launched process reads
        return 0

    monkeypatch.setattr(distributed, "relaunch", fake_relaunch)
    source = prompts.PromptText(text)
    argv = ["generate", "refs", "--prompts", "-", "-o", "out", "--num-processes", "2"]
    assert G._relaunch(2, argv, source) == 0
    assert seen["n"] == 2 and seen["path"].suffix == suffix and seen["text"] == text
    assert seen["argv"] == ["generate", "refs", "--prompts", str(seen["path"]), "-o", "out"]
    assert seen["prompts"] == prompts.load_prompts("-", stdin=source).prompts
    assert not seen["path"].parent.exists()  # the copy lives until the launcher returns


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def _cli_jobs(res) -> list[tuple[str, str]]:
    assert res.exit_code == 0, res.output
    return [(j["job_id"], j["output"]) for j in map(json.loads, res.stdout.splitlines())]


def test_cli_reads_prompts_from_stdin(tmp_path, refs, monkeypatch):
    runner = CliRunner()
    common = [str(refs), "-o", str(tmp_path / "out"), "--model", "demo", "--dry-run", "--json", "-q"]
    expected = _cli_jobs(runner.invoke(app, ["generate", "--prompts", str(_write(tmp_path / "p.yaml", YAML)), *common]))
    assert len(expected) == 6
    for text in (YAML, JSONL):
        assert _cli_jobs(runner.invoke(app, ["generate", "--prompts", "-", *common], input=text)) == expected
    res = runner.invoke(app, ["generate", "--prompts=-", *common], input='{"prompt": "a", "nope": 1}\n')
    assert res.exit_code == 2 and "<stdin>:1: prompts[0].nope: unknown key" in res.output

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = {}

    def fake_relaunch(num_processes, argv):
        seen["argv"], seen["text"] = argv, Path(argv[argv.index("--prompts") + 1]).read_text(encoding="utf-8")
        return 0

    monkeypatch.setattr(distributed, "relaunch", fake_relaunch)
    monkeypatch.setattr("sys.argv", ["easyref", "generate", "--prompts", "-", "--num-processes", "2", *common[:-3]])
    res = runner.invoke(app, ["generate", "--prompts", "-", "--num-processes", "2", *common[:-3]], input=TXT)
    assert res.exit_code == 0, res.output
    assert seen["text"] == TXT and seen["argv"][2].endswith(".txt") and "--num-processes" not in seen["argv"]


def test_prompts_help_gives_the_rule():
    res = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    text = " ".join(textwrap.dedent(res.output).split())
    for part in ("- for standard input", ".txt", ".jsonl", "starts with {", "mapping with prompts:"):
        assert part in text
