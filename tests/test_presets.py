"""easyref_cli.presets: built-ins, user files, strict validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from easyref_cli import presets
from easyref_cli.errors import UsageError
from easyref_cli.settings import DEFAULTS as BUILTIN_DEFAULTS
from easyref_cli.settings import SETTING_KEYS as OPTION_KEYS

BUILTINS = ("character", "identity", "style")


def test_list_presets():
    infos = presets.list_presets()
    assert tuple(i.name for i in infos) == BUILTINS
    for info in infos:
        assert info.path.is_file() and info.path.stem == info.name
        assert info.description and "\n" not in info.description


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_presets_are_valid_and_explained(name):
    options = presets.load_preset(name)
    assert options and set(options) <= set(OPTION_KEYS)
    assert "description" not in options
    # every value is explained: its block of consecutive lines starts with a comment
    lines = presets.find_preset(name).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line or line.startswith(("#", " ", "description:")):
            continue
        j = i
        while j > 0 and lines[j - 1].strip() and not lines[j - 1].startswith("#"):
            j -= 1
        assert j > 0 and lines[j - 1].startswith("#"), f"{name}.yaml:{i + 1} unexplained: {line}"


@pytest.mark.parametrize(
    "name, key, expected",
    [
        ("style", "scale", 1.0),
        ("style", "ref_text", "prompt"),
        ("style", "guidance", 5.0),
        ("style", "steps", 30),
        ("style", "width", 1024),
        ("identity", "steps", 40),
        ("character", "width", 896),
        ("character", "height", 1152),
    ],
)
def test_builtin_values(name, key, expected):
    assert presets.load_preset(name)[key] == expected


def test_identity_negative_prompt_targets_faces():
    assert "deformed face" in presets.load_preset("identity")["negative_prompt"]


def test_builtin_dir_prefers_installed_copy(tmp_path, monkeypatch):
    pkg = tmp_path / "easyref_cli"
    (pkg / "presets").mkdir(parents=True)
    (pkg / "presets" / "mine.yaml").write_text("steps: 3\n")
    monkeypatch.setattr(presets, "__file__", str(pkg / "presets.py"))
    assert presets.builtin_dir() == pkg / "presets"
    assert presets.load_preset("mine") == {"steps": 3}


def test_builtin_dir_falls_back_to_source_tree():
    root = Path(presets.__file__).resolve().parent.parent
    if not (Path(presets.__file__).resolve().parent / "presets").is_dir():
        assert presets.builtin_dir() == root / "presets"


@pytest.mark.parametrize(
    "arg, is_path",
    [
        ("style", False),
        ("my.yaml", True),
        ("my.YML", True),
        ("./style", True),
        ("dir/style", True),
    ],
)
def test_is_preset_path(arg, is_path):
    assert presets.is_preset_path(arg) is is_path


def test_user_preset_by_path(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text("description: mine\nsteps: 12\nguidance: 3\nscheduler: DDIM\n")
    assert presets.load_preset(str(path)) == {"steps": 12, "guidance": 3.0, "scheduler": "ddim"}
    monkeypatch.chdir(tmp_path)
    assert presets.load_preset("mine.yaml")["steps"] == 12
    info = presets.preset_info("mine.yaml")
    assert info.description == "mine" and info.path == Path("mine.yaml")


def test_empty_user_preset(tmp_path):
    (tmp_path / "e.yaml").write_text("# nothing\n")
    assert presets.load_preset(str(tmp_path / "e.yaml")) == {}
    assert presets.preset_info(str(tmp_path / "e.yaml")).description == ""


@pytest.mark.parametrize(
    "text, lines",
    [
        ("stepz: 3\n", ["1: stepz: unknown key for a preset (allowed: steps, "]),
        ("steps: many\n", ["1: steps: must be an integer, got 'many'"]),
        ("width: 1001\n", ["1: width: must be a positive multiple of 8, got 1001"]),
        ("scheduler: heun\n", ["1: scheduler: must be one of euler, euler_a, dpmpp_2m, ddim, pndm, lms"]),
        ("description: [a]\n", ["1: description: must be a string"]),
        ("prompts: [a]\n", ["1: prompts: unknown key for a preset"]),
        (
            "steps: 0\nguidance: x\nfoo: 1\n",
            ["1: steps: must be ≥ 1, got 0", "2: guidance: must be a number", "3: foo: unknown key"],
        ),
    ],
)
def test_user_preset_errors(tmp_path, text, lines):
    """One format with prompt files: ``file:line: key: message``, several under one header."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        presets.load_preset(str(path))
    message = str(info.value)
    body = message.splitlines()
    if len(lines) > 1:
        assert body.pop(0) == f"invalid preset {path} ({len(lines)} problems):"
    assert len(body) == len(lines)
    for got, want in zip(body, lines, strict=False):
        assert got.strip().startswith(f"{path}:{want}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: [1\n", r"bad\.yaml:2: YAML syntax error in preset"),
        ("steps: 1\n  guidance: 2\n", r"bad\.yaml:2: YAML syntax error in preset"),
        ("- a\n", r"must hold a mapping"),
        ("steps: 1\nsteps: 2\n", r"bad\.yaml:2: duplicate key 'steps'"),
    ],
)
def test_user_preset_yaml_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        presets.load_preset(str(path))


@pytest.mark.parametrize(
    "arg, message",
    [
        ("nope", r"unknown preset 'nope'; available: character, identity, style"),
        ("Style", r"unknown preset 'Style'"),
        ("missing.yaml", r"preset file not found: missing.yaml"),
        ("dir/missing", r"preset file not found: dir/missing"),
    ],
)
def test_unknown_presets(arg, message):
    with pytest.raises(UsageError, match=message):
        presets.load_preset(arg)


def test_preset_may_set_every_option(tmp_path):
    assert set(presets.PRESET_KEYS) == set(BUILTIN_DEFAULTS) | {"description"}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({**BUILTIN_DEFAULTS, "description": "all"}))
    given = {k: v for k, v in BUILTIN_DEFAULTS.items() if v is not None}  # None: "not given" (init_image, mask)
    assert presets.load_preset(str(path)) == given
