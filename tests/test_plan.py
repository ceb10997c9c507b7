"""Planning: settings precedence, prompt files, ids, seeds, names, plans, records and replay."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from PIL import Image

from easyref_cli import naming, prompts, records
from easyref_cli import plan as P
from easyref_cli.constants import INSTRUCTION, OFFICIAL_NEGATIVE_PROMPT
from easyref_cli.errors import InputError, UsageError
from easyref_cli.settings import DEFAULTS, GenerationSettings, resolve_settings


def _group(root: Path, name: str, n: int = 2) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i, i, i)).save(d / f"{i}.png")
    return d


def _yaml(tmp_path: Path, text: str, name: str = "prompts.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def refs(tmp_path):
    root = tmp_path / "refs"
    _group(root, "cats")
    _group(root, "dogs")
    return root


def _plan(tmp_path, refs, **kw):
    kw.setdefault("out_dir", tmp_path / "out")
    kw.setdefault("groups", [refs])
    if "prompts_file" not in kw:
        kw.setdefault("prompt", "a red car")
    return P.build_plan(**kw)


# ----------------------------------------------------------------------------------------------
# resolve_settings
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, expected",
    [
        ((), {}),
        (({"steps": 30},), {"steps": 30}),
        (({"steps": 30}, {"steps": 40}), {"steps": 40}),
        (({"steps": 30}, {"steps": None}), {"steps": 30}),
        (({"steps": 30}, None, {}, {"guidance": 7.0}), {"steps": 30, "guidance": 7.0}),
        (({"steps": 1, "scale": 1.0}, {"steps": 2}, {"scale": None}, {"steps": 3}), {"steps": 3, "scale": 1.0}),
        (({"negative_prompt": "x"}, {"negative_prompt": ""}), {"negative_prompt": ""}),
        (({"seed": 5}, {"seed": 0}), {"seed": 0}),
    ],
)
def test_resolve_settings(layers, expected):
    assert resolve_settings(*layers) == GenerationSettings(**{**DEFAULTS, **expected})


def test_resolve_settings_does_not_mutate():
    a = {"steps": 1}
    resolve_settings(a, {"steps": 2})
    assert a == {"steps": 1}


# The full precedence chain through build_plan: built-in < preset < defaults < cli < per-prompt.
# identity preset: steps 40, guidance 5.0, negative prompt set, 1024x1024.
PRECEDENCE = [
    # (preset, yaml defaults, cli, per-prompt, key, expected)
    (None, {}, {}, {}, "steps", 30),
    ("identity", {}, {}, {}, "steps", 40),
    ("identity", {"steps": 12}, {}, {}, "steps", 12),
    ("identity", {"steps": 12}, {"steps": 8}, {}, "steps", 8),
    ("identity", {"steps": 12}, {"steps": 8}, {"steps": 3}, "steps", 3),
    ("identity", {"steps": 12}, {"steps": None}, {}, "steps", 12),
    (None, {}, {}, {}, "guidance", 5.0),
    ("character", {}, {}, {}, "guidance", 6.0),
    ("character", {"guidance": 2}, {}, {}, "guidance", 2.0),
    ("character", {"guidance": 2}, {"guidance": 9.5}, {}, "guidance", 9.5),
    ("character", {"guidance": 2}, {"guidance": 9.5}, {"guidance": 1.5}, "guidance", 1.5),
    (None, {}, {}, {}, "width", 1024),
    ("character", {}, {}, {}, "width", 896),
    ("character", {"width": 512}, {}, {}, "width", 512),
    ("character", {"width": 512}, {"width": 768}, {}, "width", 768),
    ("character", {"width": 512}, {"width": 768}, {"width": 640}, "width", 640),
    (None, {}, {}, {}, "negative_prompt", OFFICIAL_NEGATIVE_PROMPT),
    ("identity", {}, {}, {}, "negative_prompt", "deformed face"),
    ("identity", {"negative_prompt": "yaml"}, {}, {}, "negative_prompt", "yaml"),
    ("identity", {"negative_prompt": "yaml"}, {"negative_prompt": ""}, {}, "negative_prompt", ""),
    ("identity", {}, {"negative_prompt": "cli"}, {"negative_prompt": "p"}, "negative_prompt", "p"),
    (None, {}, {}, {}, "scale", 1.0),
    ("character", {}, {}, {}, "scale", 0.9),
    ("character", {"scale": 0.5}, {"scale": 0.7}, {}, "scale", 0.7),
    ("character", {"scale": 0.5}, {"scale": 0.7}, {"scale": 0}, "scale", 0.0),
    (None, {}, {}, {}, "scheduler", "euler"),
    (None, {"scheduler": "ddim"}, {"scheduler": "DPMPP_2M"}, {}, "scheduler", "dpmpp_2m"),
    (None, {"scheduler": "ddim"}, {}, {"scheduler": "lms"}, "scheduler", "lms"),
    (None, {}, {}, {}, "seed", 0),
    (None, {"seed": 5}, {}, {}, "seed", 5),
    (None, {"seed": 5}, {"seed": 7}, {}, "seed", 7),
    (None, {"seed": 5}, {"seed": 7}, {"seed": 9}, "seed", 9),
    (None, {}, {}, {}, "caption", "PROMPT"),
    (None, {"ref_text": "none"}, {}, {}, "caption", ""),
    (None, {"ref_text": "none"}, {"ref_text": "prompt"}, {}, "caption", "PROMPT"),
    (None, {}, {"ref_text": "prompt"}, {"ref_text": "none"}, "caption", ""),
    (None, {}, {}, {}, "instruction", INSTRUCTION),
    (None, {"instruction": "Look: "}, {}, {}, "instruction", "Look: "),
    (None, {"instruction": "Look: "}, {"instruction": "See: "}, {}, "instruction", "See: "),
]


@pytest.mark.parametrize("preset, defaults, cli, per_prompt, key, expected", PRECEDENCE)
def test_precedence(tmp_path, refs, preset, defaults, cli, per_prompt, key, expected):
    import yaml

    doc = {"prompts": [{"prompt": "PROMPT", **per_prompt}]}
    if defaults:
        doc["defaults"] = defaults
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    plan = _plan(tmp_path, refs, prompts_file=path, preset=preset, cli=cli)
    job = plan.jobs[0]
    value = getattr(job, key) if key in ("seed", "caption") else getattr(job.settings, key)
    if expected == "deformed face":  # the identity preset's negative prompt starts so
        assert value.startswith(expected)
    else:
        assert value == expected


@pytest.mark.parametrize(
    "preset, defaults, cli, expected",
    [
        (None, {}, {}, "auto"),
        (None, {"batch_size": 4}, {}, 4),
        (None, {"batch_size": 4}, {"batch_size": 2}, 2),
    ],
)
def test_batch_size_precedence(tmp_path, refs, preset, defaults, cli, expected):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, "prompts": ["x"]}))
    assert _plan(tmp_path, refs, prompts_file=path, preset=preset, cli=cli).batch_size == expected


# ----------------------------------------------------------------------------------------------
# prompt files
# ----------------------------------------------------------------------------------------------


def test_load_prompt_file(tmp_path):
    path = _yaml(
        tmp_path,
        """
        defaults:
          steps: 20
          guidance: 4
        prompts:
          - a cat
          - prompt: a dog
            id: doggo
            seeds: [1, 5]
            groups: cats
          - prompt: a bird
            seed: 3
            images_per_prompt: 2
            ref_text: none
        """,
    )
    pf = prompts.load_prompt_file(path)
    assert pf.defaults == {"steps": 20, "guidance": 4.0}
    assert [s.prompt for s in pf.prompts] == ["a cat", "a dog", "a bird"]
    assert [s.line for s in pf.prompts] == [5, 6, 10]
    assert pf.prompts[1].id == "doggo" and pf.prompts[1].seeds == (1, 5)
    assert pf.prompts[1].groups == ("cats",)
    assert pf.prompts[2].options == {"seed": 3, "images_per_prompt": 2, "ref_text": "none"}


PROMPT_FILE_ERRORS = [
    # (yaml text, regex the message must match)
    (
        "prompts:\n  - a\n  - prompt: b\n    stepz: 3\n",
        r"p\.yaml:4: prompts\[1\]\.stepz: unknown key",
    ),
    (
        "prompts:\n  - prompt: b\n    steps: ten\n",
        r"p\.yaml:3: prompts\[0\]\.steps: must be an integer",
    ),
    ("prompts:\n  - prompt: b\n    steps: 0\n", r"p\.yaml:3: prompts\[0\]\.steps: must be ≥ 1"),
    ("prompts:\n  - prompt: b\n    width: 1001\n", r":3: prompts\[0\]\.width: .*multiple of 8"),
    ("prompts:\n  - prompt: b\n    height: -8\n", r":3: prompts\[0\]\.height: .*positive"),
    (
        "prompts:\n  - prompt: b\n    guidance: yes\n",
        r":3: prompts\[0\]\.guidance: must be a number",
    ),
    (
        "prompts:\n  - prompt: b\n    scheduler: heun\n",
        r":3: prompts\[0\]\.scheduler: must be one of",
    ),
    (
        "prompts:\n  - prompt: b\n    ref_text: caption\n",
        r":3: prompts\[0\]\.ref_text: must be one",
    ),
    ("prompts:\n  - prompt: b\n    images_per_prompt: 0\n", r":3: prompts\[0\]\.images_per_prompt"),
    (
        "prompts:\n  - x\n  - prompt: b\n    seed: 1\n    seeds: [2]\n",
        r":5: prompts\[1\]\.seeds: .*not both",
    ),
    (
        "prompts:\n  - prompt: b\n    seeds: []\n",
        r":3: prompts\[0\]\.seeds: must be a non-empty list",
    ),
    ("prompts:\n  - prompt: b\n    seeds: [1, 1]\n", r":3: prompts\[0\]\.seeds: repeated seeds"),
    ("prompts:\n  - prompt: b\n    seeds: [1, x]\n", r":3: prompts\[0\]\.seeds: each seed"),
    ("prompts:\n  - prompt: b\n    seed: -1\n", r":3: prompts\[0\]\.seed: must be ≥ 0"),
    (
        "prompts:\n  - prompt: b\n    instruction: hi\n",
        r":3: prompts\[0\]\.instruction: unknown key",
    ),
    ("prompts:\n  - prompt: b\n    groups: [1]\n", r":3: prompts\[0\]\.groups: must be"),
    ("prompts:\n  - id: x\n", r":2: prompts\[0\]: missing required key 'prompt'"),
    ("prompts:\n  - a\n  - ''\n", r":3: prompts\[1\]: empty prompt"),
    ("prompts:\n  - a\n  - 42\n", r":3: prompts\[1\]: must be a string or a mapping"),
    ("prompts:\n  - prompt: 42\n", r":2: prompts\[0\]\.prompt: must be a string"),
    ("prompts: []\n", r"p\.yaml:1: prompts: the list is empty"),
    ("prompts: a cat\n", r":1: prompts: must be a list"),
    ("defaults:\n  steps: 3\n", r"prompts: missing required key 'prompts'"),
    ("defaults:\n  stepz: 3\nprompts: [a]\n", r":2: defaults\.stepz: unknown key"),
    ("defaults:\n  width: 100\nprompts: [a]\n", r":2: defaults\.width: .*multiple of 8"),
    ("defaults: 3\nprompts: [a]\n", r":1: defaults: must be a mapping"),
    ("prompt: [a]\n", r":1: prompt: unknown top-level key"),
    ("- a\n- b\n", r":1: the top level must be a mapping.*under a 'prompts:' key"),
    ("", r"the prompt file is empty"),
    (
        "prompts:\n  - prompt: a\n    id: x\n  - prompt: b\n    id: x\n",
        r":5: prompts\[1\]\.id: duplicate id 'x' \(also prompts\[0\], line 2\)",
    ),
    ("prompts:\n  - prompt: a\n    steps: 3\n    steps: 4\n", r"p\.yaml:4: duplicate key 'steps'"),
    ("prompts:\n  - a\n  - prompt: [unclosed\n", r"p\.yaml:\d+: YAML syntax error"),
    (  # an unclosed [ fails lines later: the message also names where it was opened
        "prompts:\n  - prompt: [a cat\n  - prompt: dog\n",
        r"p\.yaml:3: YAML syntax error.*flow sequence that starts at line 2, column 13",
    ),
    ("prompts:\n  - a\n bad: indent\n", r"p\.yaml:3: YAML syntax error"),
    ("prompts:\n\t- a\n", r"p\.yaml:2: YAML syntax error"),
    ("prompts: [a]\n---\nprompts: [b]\n", r"p\.yaml:\d+: YAML syntax error.*single document"),
]


@pytest.mark.parametrize("text, message", PROMPT_FILE_ERRORS)
def test_prompt_file_errors(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        prompts.load_prompt_file(path)


def test_prompt_file_merge_keys_and_bom(tmp_path):
    path = tmp_path / "p.yaml"
    text = "\ufeffdefaults: &d\n  steps: 3\n  guidance: 2\nprompts:\n  - prompt: a\n    <<: *d\n    steps: 4\n"
    path.write_text(text, encoding="utf-8")
    pf = prompts.load_prompt_file(path)
    assert pf.defaults == {"steps": 3, "guidance": 2.0}
    assert pf.prompts[0].options == {"steps": 4, "guidance": 2.0}


def test_prompt_file_reports_every_problem(tmp_path):
    path = _yaml(
        tmp_path,
        """
        prompts:
          - prompt: a
            steps: 0
          - prompt: b
            colour: red
        """,
    )
    with pytest.raises(UsageError) as info:
        prompts.load_prompt_file(path)
    text = str(info.value)
    assert "2 problems" in text
    assert f"{path}:3: prompts[0].steps" in text
    assert f"{path}:5: prompts[1].colour" in text


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "missing.yaml", "prompt file not found: .*missing.yaml"),
        (lambda t: t, "is a directory"),
        (lambda t: (t / "b.yaml").write_bytes(b"\xff\xfe\x00") and t / "b.yaml", "not UTF-8"),
    ],
)
def test_prompt_file_unreadable(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        prompts.load_prompt_file(make(tmp_path))


def test_prompt_file_unsafe_yaml_rejected(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("prompts:\n  - !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UsageError, match="p.yaml:2"):
        prompts.load_prompt_file(path)


# ----------------------------------------------------------------------------------------------
# ids and slugs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, slug",
    [
        ("A red car", "a-red-car"),
        ("  Hello,   World!! ", "hello-world"),
        ("Café crème brûlée", "cafe-creme-brulee"),
        ("猫", "prompt"),
        ("", "prompt"),
        ("../../etc/passwd", "etc-passwd"),
        ("x" * 50, "x" * 40),
        ("word " * 20, ("word-" * 8).rstrip("-")),
        ("a photo of a cat, 4k, masterpiece, trending", "a-photo-of-a-cat-4k-masterpiece-trending"),
    ],
)
def test_slugify(text, slug):
    assert naming.slugify(text) == slug
    assert len(naming.slugify(text)) <= 40


@pytest.mark.parametrize(
    "specs, ids",
    [
        ([("a cat", None)], ["a-cat"]),
        ([("a cat", None), ("A cat!", None), ("a cat", None)], ["a-cat", "a-cat-2", "a-cat-3"]),
        ([("a cat", None), ("dog", "a-cat")], ["a-cat-2", "a-cat"]),
        ([("猫", None), ("犬", None)], ["prompt", "prompt-2"]),
        ([("x" * 60, None), ("x" * 60, None)], ["x" * 40, "x" * 38 + "-2"]),
        ([("a", "7"), ("b", None)], ["7", "b"]),
    ],
)
def test_assign_prompt_ids(specs, ids):
    got = naming.assign_prompt_ids([prompts.PromptSpec(index=i, prompt=p, id=pid) for i, (p, pid) in enumerate(specs)])
    assert got == ids


def test_assign_prompt_ids_duplicate_explicit():
    specs = [prompts.PromptSpec(index=0, prompt="a", id="x"), prompts.PromptSpec(index=1, prompt="b", id="x")]
    with pytest.raises(UsageError, match="duplicate prompt id 'x'"):
        naming.assign_prompt_ids(specs)


def test_integer_id_accepted(tmp_path):
    pf = prompts.load_prompt_file(_yaml(tmp_path, "prompts:\n  - prompt: a\n    id: 7\n"))
    assert pf.prompts[0].id == "7"


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "defaults, cli, item, seeds",
    [
        ({}, {}, {}, [0]),
        ({}, {"images_per_prompt": 3}, {}, [0, 1, 2]),
        ({"seed": 10, "images_per_prompt": 2}, {}, {}, [10, 11]),
        ({}, {"seed": 100}, {"images_per_prompt": 3}, [100, 101, 102]),
        ({}, {"seed": 100, "images_per_prompt": 3}, {"seed": 5}, [5, 6, 7]),
        ({}, {"images_per_prompt": 4}, {"seeds": [9, 3, 2**64 - 1]}, [9, 3, 2**64 - 1]),
        ({"seed": 2**64 - 2}, {"images_per_prompt": 2}, {}, [2**64 - 2, 2**64 - 1]),
    ],
)
def test_seed_expansion(tmp_path, refs, defaults, cli, item, seeds):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, "prompts": [{"prompt": "x", **item}]}))
    plan = _plan(tmp_path, refs, groups=[refs / "cats"], prompts_file=path, cli=cli)
    assert [j.seed for j in plan.jobs] == seeds
    assert [j.index for j in plan.jobs] == list(range(len(seeds)))


def test_seed_overflow(tmp_path, refs):
    with pytest.raises(UsageError, match="exceed the maximum seed"):
        _plan(tmp_path, refs, cli={"seed": 2**64 - 1, "images_per_prompt": 2})


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, safe",
    [
        ("cats", "cats"),
        ("../x", "_x"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("..", "_"),
        ("...", "_"),
        (".hidden", "hidden"),
        ("a..b", "a.b"),
        ("tab\there\n", "tab_here_"),
        ("C:evil", "C_evil"),
        ("chat noir 猫 — été", "chat noir 猫 — été"),
        ("e\u0301te\u0301", "été"),  # NFC
        ("zero\u200bwidth", "zero_width"),
        ("trailing. ", "trailing"),
        ("", "_"),
        ("é" * 200, "é" * 75),
    ],
)
def test_sanitize_component(value, safe):
    assert naming.sanitize_component(value) == safe


@pytest.mark.parametrize(
    "template, fields, expected",
    [
        (naming.DEFAULT_NAME_TEMPLATE, {}, "cats/a-cat_42.png"),
        ("{group}/{prompt_id}_{seed}", {}, "cats/a-cat_42.png"),
        ("{preset}/{group}-{index:03d}-{seed:08d}.png", {}, "default/cats-001-00000042.png"),
        ("{preset}/{seed}.png", {"preset": "identity"}, "identity/42.png"),
        ("{preset}/{seed}.png", {"preset": "../my presets/x.yaml"}, "x/42.png"),
        ("{group}/{prompt_id}.png", {"group": "../x", "prompt_id": "a/b"}, "_x/a_b.png"),
        (
            "{group}/{prompt_id}.png",
            {"group": "..", "prompt_id": "../../etc/passwd"},
            "_/_._etc_passwd.png",
        ),
        (
            "{group}/{prompt_id}.png",
            {"group": "références", "prompt_id": "猫"},
            "références/猫.png",
        ),
        ("out/{group}/{prompt_id}_{seed}.PNG", {}, "out/cats/a-cat_42.PNG"),
        ("{seed}.jpg", {}, "42.jpg.png"),
    ],
)
def test_render_name(template, fields, expected):
    kwargs = {
        "group": "cats",
        "prompt_id": "a-cat",
        "seed": 42,
        "index": 1,
        "preset": None,
        **fields,
    }
    path = naming.render_name(template, **kwargs)
    assert path.as_posix() == expected
    assert not path.is_absolute() and ".." not in path.parts


@pytest.mark.parametrize(
    "template, message",
    [
        ("{grp}/{seed}", r"unknown field \{grp\}"),
        ("{group.__class__}/{seed}", r"unknown field"),
        ("{}/{seed}", r"unknown field"),
        ("{seed!r}", r"unknown field"),
        ("{seed:zz}", r"invalid format"),
        ("{group", r"invalid name template"),
        ("/abs/{seed}", r"relative path"),
        ("../{seed}", r"relative path"),
        ("a/../{seed}", r"relative path"),
        ("a//{seed}", r"relative path"),
        (".hidden/{seed}", r"relative path"),
        ("a\\{seed}", r"use '/'"),
        ("C:/{seed}", r"use '/'"),
    ],
)
def test_render_name_errors(template, message):
    with pytest.raises(UsageError, match=message):
        naming.render_name(template, group="g", prompt_id="p", seed=0, index=0, preset=None)


def test_name_template_must_be_unique(tmp_path, refs):
    with pytest.raises(UsageError, match="not unique"):
        _plan(tmp_path, refs, name_template="{prompt_id}_{seed}.png")
    with pytest.raises(UsageError, match="not unique"):
        _plan(tmp_path, refs, cli={"images_per_prompt": 2}, name_template="{group}/{prompt_id}")
    plan = _plan(tmp_path, refs, cli={"images_per_prompt": 2}, name_template="{group}-{prompt_id}-{index}")
    assert [j.output.as_posix() for j in plan.jobs][:2] == [
        "cats-a-red-car-0.png",
        "cats-a-red-car-1.png",
    ]


def test_sanitised_ids_collide_is_an_error(tmp_path, refs):
    path = _yaml(tmp_path, "prompts:\n  - prompt: a\n    id: x/y\n  - prompt: b\n    id: x_y\n")
    with pytest.raises(UsageError, match="not unique"):
        _plan(tmp_path, refs, prompts_file=path)


# ----------------------------------------------------------------------------------------------
# build_plan
# ----------------------------------------------------------------------------------------------


def test_build_plan_group_major_order(tmp_path, refs):
    path = _yaml(
        tmp_path,
        """
        defaults: {images_per_prompt: 2, seed: 10}
        prompts:
          - a cat
          - prompt: a dog
            seeds: [7]
          - prompt: only dogs
            groups: [dogs]
        """,
    )
    plan = _plan(tmp_path, refs, prompts_file=path, base_model="B", mllm="M", adapter="A")
    got = [(j.group.name, j.prompt_id, j.seed) for j in plan.jobs]
    assert got == [
        ("cats", "a-cat", 10),
        ("cats", "a-cat", 11),
        ("cats", "a-dog", 7),
        ("dogs", "a-cat", 10),
        ("dogs", "a-cat", 11),
        ("dogs", "a-dog", 7),
        ("dogs", "only-dogs", 10),
        ("dogs", "only-dogs", 11),
    ]
    assert [g.name for g in plan.groups] == ["cats", "dogs"]
    assert plan.jobs[0].output == Path("cats/a-cat_10.png")
    assert plan.models.as_dict() == {"base_model": "B", "mllm": "M", "adapter": "A"}
    assert len({j.job_id for j in plan.jobs}) == len(plan.jobs)
    assert all(len(j.job_id) == 16 for j in plan.jobs)


def test_job_defaults_and_caption(tmp_path, refs):
    job = _plan(tmp_path, refs).jobs[0]
    s = job.settings
    assert (job.prompt, job.caption, s.instruction) == ("a red car", "a red car", INSTRUCTION)
    assert (s.steps, s.guidance, s.scale, s.width, s.height) == (30, 5.0, 1.0, 1024, 1024)
    assert (s.scheduler, s.negative_prompt, job.seed, job.preset) == ("euler", OFFICIAL_NEGATIVE_PROMPT, 0, None)


def test_job_id_is_stable_and_tracks_settings(tmp_path, refs):
    a = _plan(tmp_path, refs).jobs[0].job_id
    assert _plan(tmp_path, refs).jobs[0].job_id == a
    assert _plan(tmp_path, refs, out_dir=tmp_path / "elsewhere").jobs[0].job_id == a
    assert _plan(tmp_path, refs, cli={"batch_size": 4}).jobs[0].job_id == a
    for changed in (
        {"cli": {"steps": 31}},
        {"cli": {"guidance": 5.5}},
        {"cli": {"scale": 0.5}},
        {"cli": {"negative_prompt": "x"}},
        {"cli": {"ref_text": "none"}},
        {"cli": {"scheduler": "ddim"}},
        {"cli": {"width": 512}},
        {"prompt": "a blue car"},
        {"adapter": "other"},
        {"base_model": "other"},
        {"mllm": "other"},
    ):
        assert _plan(tmp_path, refs, **changed).jobs[0].job_id != a, changed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": None}, "exactly one of --prompts"),
        ({"prompts_file": Path("p.yaml"), "prompt": "x"}, "exactly one of --prompts"),
        ({"prompt": "  "}, "--prompt is empty"),
        ({"groups": []}, "give at least one GROUPS folder"),
        ({"groups": [Path("/nonexistent/dir")]}, "group directory not found"),
        ({"cli": {"steps": 0}}, "--steps: must be ≥ 1"),
        (
            {"cli": {"width": 1001, "guidance": "x"}},
            "--width: .*multiple of 8, got 1001\n--guidance",
        ),
        ({"cli": {"images_per_prompt": 0}}, "--images-per-prompt"),
        ({"cli": {"colour": "red"}}, "--colour: unknown key"),
        ({"attention": "flash"}, "--attention must be one of"),
        ({"dtype": "int8"}, "--dtype must be one of"),
        ({"preset": "nope"}, "unknown preset 'nope'; available: character, identity, style"),
        ({"name_template": "{bad}"}, "unknown field"),
    ],
)
def test_build_plan_usage_errors(tmp_path, refs, kwargs, message):
    kw = {"out_dir": tmp_path / "out", "groups": [refs], "prompt": "a red car", **kwargs}
    if kw.get("prompt") is None:
        kw.pop("prompt")
    with pytest.raises(UsageError, match=message):
        P.build_plan(**kw)


def test_unknown_group_filter_names_line(tmp_path, refs):
    path = _yaml(tmp_path, "prompts:\n  - a\n  - prompt: b\n    groups: [cows]\n")
    with pytest.raises(UsageError, match=r"prompts\.yaml:4: prompts\[1\]\.groups: unknown group.*cows"):
        _plan(tmp_path, refs, prompts_file=path)


def test_dtype_and_attention_normalised(tmp_path, refs):
    plan = _plan(tmp_path, refs, dtype="BF16", attention="SDPA", device="cuda:1")
    assert (plan.dtype, plan.attention, plan.device) == ("bfloat16", "sdpa", "cuda:1")


def test_pending_and_describe(tmp_path, refs):
    plan = _plan(tmp_path, refs, cli={"images_per_prompt": 2})
    assert len(plan.pending()) == 4
    done = plan.output_path(plan.jobs[0])
    done.parent.mkdir(parents=True)
    done.write_bytes(b"png")
    assert plan.pending() == list(plan.jobs[1:])
    text = plan.describe()
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("exists") and str(done) in lines[0]
    assert all(line.startswith("todo") for line in lines[1:4])
    assert "4 jobs in 2 groups: 3 to generate, 1 already exist (skipped)" in lines[-1]
    redo = _plan(tmp_path, refs, cli={"images_per_prompt": 2}, overwrite=True)
    assert redo.pending() == list(redo.jobs)
    assert "4 to generate, 1 already exist (overwritten)" in redo.describe()


def test_to_dict_is_json(tmp_path, refs):
    import json

    d = _plan(tmp_path, refs, preset="style").to_dict()
    json.dumps(d)
    assert d["preset"] == "style" and d["jobs"][0]["output"] == "cats/a-red-car_0.png"
    assert d["jobs"][0]["images"][0].endswith("0.png")


def test_unicode_groups_and_prompts(tmp_path):
    root = tmp_path / "réfs"
    _group(root, "chats noirs 猫")
    plan = P.build_plan(groups=[root], out_dir=tmp_path / "o", prompt="un chat sur un canapé")
    assert plan.jobs[0].output == Path("chats noirs 猫/un-chat-sur-un-canape_0.png")


# ----------------------------------------------------------------------------------------------
# records and --from-image
# ----------------------------------------------------------------------------------------------


def _record_png(tmp_path, record) -> Path:
    from easyref_cli import files

    path = tmp_path / "recorded.png"
    files.write_png_atomic(path, Image.new("RGB", (8, 8)), record=record)
    return path


def test_job_record_and_back(tmp_path, refs):
    from easyref_cli import files

    plan = _plan(tmp_path, refs, cli={"seed": 7, "ref_text": "none"}, preset="identity")
    job = plan.jobs[0]
    record = records.job_record(job, plan.models.as_dict())
    assert record["references"][0]["sha256"] == files.sha256_file(job.group.images[0])
    assert record["caption"] == "" and record["seed"] == 7 and record["preset"] == "identity"
    replay = records.parse_record(record)
    assert replay.settings.ref_text == "none" and list(replay.references) == [p.resolve() for p in job.group.images]
    image = _record_png(tmp_path, record)
    again = P.build_plan(from_image=image, out_dir=tmp_path / "again")
    [job2] = again.jobs
    assert job2.job_id == job.job_id
    assert job2.output == job.output
    assert (job2.caption, job2.settings) == (job.caption, job.settings)
    # a changed or missing reference is refused
    Image.new("RGB", (8, 8), (99, 0, 0)).save(job.group.images[0])
    with pytest.raises(UsageError, match="has changed"):
        P.build_plan(from_image=image, out_dir=tmp_path / "again")
    job.group.images[0].unlink()
    with pytest.raises(UsageError, match="no longer exists"):
        P.build_plan(from_image=image, out_dir=tmp_path / "again")


def test_replay_refuses_settings_and_other_sources(tmp_path, refs):
    plan = _plan(tmp_path, refs)
    image = _record_png(tmp_path, records.job_record(plan.jobs[0], plan.models.as_dict()))
    with pytest.raises(UsageError, match="--steps, --width cannot change them"):
        P.build_plan(from_image=image, out_dir=tmp_path / "o", cli={"width": 64, "steps": 2})
    with pytest.raises(UsageError, match="give no GROUPS"):
        P.build_plan(from_image=image, out_dir=tmp_path / "o", groups=[refs])
    replayed = P.build_plan(from_image=image, out_dir=tmp_path / "o", cli={"batch_size": 3}, mllm="M")
    assert replayed.batch_size == 3 and replayed.models.mllm == "M"
    assert replayed.jobs[0].job_id != plan.jobs[0].job_id  # another MLLM is another job


_RECORD = {
    "prompt": "p",
    "negative_prompt": "",
    "caption": "p",
    "instruction": "i",
    "seed": 1,
    "steps": 2,
    "guidance": 5,
    "scale": 1,
    "width": 64,
    "height": 64,
    "scheduler": "euler",
    "references": [{"path": "/x.png"}],
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": None}, "prompt: missing"),
        ({"seed": None}, "seed: missing"),
        ({"references": None}, "references: missing"),
        ({"steps": "2"}, "steps: unexpected value '2'"),
        ({"steps": 0}, "steps: must be ≥ 1"),
        ({"scheduler": "heun"}, "scheduler: must be one of"),
        ({"references": []}, "references: empty"),
    ],
)
def test_parse_record_errors(change, message):
    record = {**_RECORD, **change}
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(InputError, match=message):
        records.parse_record(record, source="img.png")


def test_parse_record_normalises_and_derives_ref_text():
    replay = records.parse_record(_RECORD)
    assert replay.settings.guidance == 5.0 and isinstance(replay.settings.guidance, float)
    assert replay.settings.ref_text == "prompt" and replay.prompt_id == "p" and replay.group == "from-image"
    assert records.parse_record({**_RECORD, "caption": ""}).settings.ref_text == "none"
