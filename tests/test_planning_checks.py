"""Planning-time checks of the reliability issue (items 7-10), each a usage error before any model loads.

7. output names and paths too long to write; ``-o`` (or one of its parents) a file; ``encode -o`` below a file;
8. ``-o`` inside a reference folder (outputs would become references on the next run);
9. a GROUPS folder holding both images and sub-folders with images;
10. a caption or instruction longer than the MLLM's token limit.

Through the real Typer app with ``--dry-run`` where possible: no model is built or loaded.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from easyref_cli import files, naming, outputs_check
from easyref_cli.cli import app
from easyref_cli.errors import UsageError
from easyref_cli.outputs_check import MAX_CAPTION_TOKENS
from easyref_cli.prompts import load_prompt_file

runner = CliRunner()


def _images(folder: Path, n: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i, i, i)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def refs(tmp_path) -> Path:
    """A folder of two groups, ``cats`` and ``dogs``."""
    root = tmp_path / "refs"
    _images(root / "cats", 2)
    _images(root / "dogs", 2)
    return root


def _dry_run(*args, model=("--model", "tiny")):
    res = runner.invoke(app, ["generate", *map(str, args), *model, "--dry-run"], catch_exceptions=False)
    return res


def _refused(res, *parts: str) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for part in parts:
        assert part in res.output, res.output
    return res.output


def _ok(res):
    assert res.exit_code == 0, res.output
    return res


def _write_prompts(path: Path, prompts: list, defaults: dict | None = None) -> Path:
    data = {"defaults": defaults, "prompts": prompts} if defaults else {"prompts": prompts}
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# 7. Output names and paths too long; -o a file
# ----------------------------------------------------------------------------------------------


def test_long_literal_name_template_is_refused_at_planning(tmp_path, refs):
    template = "{group}/" + "a" * 300 + "_{seed}.png"
    out = _refused(
        _dry_run(refs, "--prompt", "a cat", "-o", tmp_path / "out", "--name-template", template),
        "output file name",
        "a" * 300 + "_0.png",
        template,
        "at most 237",
    )
    assert not (tmp_path / "out").exists() and "1 jobs" not in out


def test_file_name_limit_leaves_room_for_the_temporary_name(tmp_path, refs):
    limit = naming.NAME_MAX_BYTES - naming.ATOMIC_TEMP_EXTRA_BYTES
    assert naming.ATOMIC_TEMP_EXTRA_BYTES == len(".") + len(".") + 12 + len(".tmp") == 18
    # exactly at the limit (".png" included): fine
    fits = "{group}/" + "x" * (limit - len("_0.png")) + "_{seed}.png"
    _ok(_dry_run(refs, "--prompt", "a cat", "-o", tmp_path / "out", "--name-template", fits))
    # one byte over: refused; bytes count, not characters ("é" is two bytes)
    over = "{group}/" + "x" * (limit - len("_0.png") + 1) + "_{seed}.png"
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", tmp_path / "out", "--name-template", over), "238 bytes")
    accents = "{group}/" + "é" * 119 + "_{seed}.png"  # 119 characters, 244 bytes
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", tmp_path / "out", "--name-template", accents), "244 bytes")


def test_long_folder_name_in_the_template_is_refused(tmp_path, refs):
    template = "{group}/" + "d" * 256 + "/{prompt_id}_{seed}.png"
    _refused(
        _dry_run(refs, "--prompt", "a cat", "-o", tmp_path / "out", "--name-template", template),
        "output folder name",
        "d" * 256,
        "256 bytes",
        "at most 255",
    )
    ok = "{group}/" + "d" * 255 + "/{prompt_id}_{seed}.png"  # a folder name has no temporary name
    _ok(_dry_run(refs, "--prompt", "a cat", "-o", tmp_path / "out", "--name-template", ok))


def test_long_output_folder_name_is_refused(tmp_path, refs):
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", tmp_path / ("o" * 256)), "-o", "folder name", "256 bytes")


def test_whole_output_path_too_long_is_refused(tmp_path, refs):
    out = tmp_path.joinpath(*["p" * 200] * 21)  # 21 × 201 bytes > 4096
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", out), "output path", "cats/a-cat_0.png", "at most 4077")


def test_out_dir_that_is_a_file_is_refused(tmp_path, refs):
    target = tmp_path / "notes.txt"
    target.write_text("x")
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", target), f"-o {target} is a file; give a folder")
    _refused(
        _dry_run(refs, "--prompt", "a cat", "-o", target / "deeper" / "out"),
        f"{target} is a file, not a folder",
    )


def test_file_where_an_output_folder_goes_is_refused(tmp_path, refs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cats").write_text("not a folder")
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", out), f"{out / 'cats'} is a file", "cats/a-cat_0.png")


def test_folder_where_an_output_file_goes_is_refused(tmp_path, refs):
    out = tmp_path / "out"
    (out / "cats" / "a-cat_0.png").mkdir(parents=True)
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", out), "is a folder, where output cats/a-cat_0.png goes")


def _encode(*args):
    return runner.invoke(app, ["encode", *map(str, args)], catch_exceptions=False)


def test_encode_out_below_a_file_is_a_usage_error(tmp_path, refs):
    somefile = tmp_path / "somefile.txt"
    somefile.write_text("x")
    out = somefile / "out.safetensors"
    _refused(_encode(refs / "cats", "-o", out), str(out), f"{somefile} is a file, not a folder")
    assert somefile.read_text() == "x"


def test_encode_out_name_too_long_is_a_usage_error(tmp_path, refs):
    out = tmp_path / ("c" * 251 + ".safetensors")
    _refused(_encode(refs / "cats", "-o", out), "--out", "bytes in UTF-8")


# ----------------------------------------------------------------------------------------------
# 8. -o inside a reference folder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["cats/out", "cats", "cats/a/b"])
def test_out_dir_inside_a_group_folder_is_refused(tmp_path, refs, where):
    out = refs / where
    _refused(
        _dry_run(refs, "--prompt", "a cat", "-o", out),
        f"-o {out} is inside the reference folder {refs / 'cats'}",
        "outputs would become references on the next run; choose an output folder outside it",
    )


def test_out_dir_inside_a_group_given_directly_is_refused(tmp_path, refs):
    _refused(_dry_run(refs / "dogs", "--prompt", "a cat", "-o", refs / "dogs" / "generated"), "reference folder")


def test_out_dir_through_a_symlink_into_a_group_is_refused(tmp_path, refs):
    link = tmp_path / "link"
    try:
        link.symlink_to(refs / "cats", target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", link / "out"), "is inside the reference folder")


def test_out_dir_above_the_groups_writing_into_them_is_refused(tmp_path, refs):
    # -o refs with the default {group}/... template puts the outputs into refs/cats and refs/dogs
    _refused(_dry_run(refs, "--prompt", "a cat", "-o", refs), f"-o {refs} is inside the reference folder")
    given = (refs / "cats", refs / "dogs")  # refs itself is no GROUPS argument: the outputs' folders say it
    _refused(_dry_run(*given, "--prompt", "a cat", "-o", refs), "output cats/a-cat_0.png would go into the reference")


def test_out_dir_beside_the_groups_is_fine(tmp_path, refs):
    _ok(_dry_run(refs / "cats", "--prompt", "a cat", "-o", tmp_path / "out"))
    _ok(_dry_run(refs / "cats", "--prompt", "a cat", "-o", refs / "out"))  # cats given alone: refs is no GROUPS
    flat = "{group}_{prompt_id}_{seed}.png"
    _ok(_dry_run(refs / "cats", "--prompt", "a cat", "-o", tmp_path, "--name-template", flat))


def test_out_dir_inside_a_groups_argument_is_refused():
    """A GROUPS argument that is a folder of groups is a reference folder too (``group_args``)."""
    root = Path("/data/refs")
    jobs = [SimpleNamespace(group=SimpleNamespace(path=root / "cats"), output=Path("x.png"))]
    with pytest.raises(UsageError, match="-o /data/refs/out is inside the reference folder /data/refs;"):
        outputs_check.check_outputs_outside_references(root / "out", jobs, [root])
    outputs_check.check_outputs_outside_references(root / "out", jobs)  # without the argument: cannot tell
    outputs_check.check_outputs_outside_references(Path("/data/out"), jobs, [root])


def test_replayed_image_cannot_be_written_into_its_references(tmp_path, refs):
    jobs = [SimpleNamespace(group=SimpleNamespace(path=refs / "cats"), output=Path("g/p_0.png"))]
    with pytest.raises(UsageError, match="reference folder"):
        outputs_check.check_outputs_outside_references(refs / "cats" / "replay", jobs)


# ----------------------------------------------------------------------------------------------
# 9. A folder holding both images and sub-folders with images
# ----------------------------------------------------------------------------------------------


def test_folder_with_images_and_image_subfolders_is_refused(tmp_path):
    root = tmp_path / "assets"
    _images(root, 2)
    _images(root / "set1")
    _images(root / "set2")
    out = _refused(
        _dry_run(root, "--prompt", "a cat", "-o", tmp_path / "out"),
        f"{root} holds both images (2: 0.png, 1.png) and sub-folders with images (set1, set2)",
        f"pass the sub-folders themselves as GROUPS (e.g. {root / 'set1'})",
        "move the loose images into a sub-folder of their own",
    )
    assert "hide them" in out


def test_find_groups_refuses_mixed_folders_only(tmp_path):
    root = _images(tmp_path / "cats", 2)
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("x")
    _images(root / ".thumbnails")  # hidden: ignored
    [group] = files.find_groups([root])  # sub-folders without images stay ignored
    assert group.name == "cats" and len(group.images) == 2
    _images(root / "more")
    with pytest.raises(UsageError, match=r"holds both images .* sub-folders with images \(more\)"):
        files.find_groups([root])
    # the ways out work: the sub-folders as GROUPS, or the loose images moved into their own sub-folder
    assert [g.name for g in files.find_groups([root / "more"])] == ["more"]
    (root / "main").mkdir()
    for image in root.glob("*.png"):
        image.rename(root / "main" / image.name)
    assert [g.name for g in files.find_groups([root])] == ["main", "more"]


# ----------------------------------------------------------------------------------------------
# 10. Captions and instructions within the MLLM's token limit
# ----------------------------------------------------------------------------------------------


def test_huge_prompt_is_refused_at_planning(tmp_path, refs):
    _refused(
        _dry_run(refs, "--prompt", "a cat " * 20_000, "-o", tmp_path / "out"),
        "prompt 'a-cat-a-cat-a-cat-a-cat-a-cat-a-cat-a-ca'",
        "its text is 120000 bytes",
        f"at most {MAX_CAPTION_TOKENS} tokens",
    )


def test_without_a_tokenizer_bytes_stand_for_tokens(tmp_path, refs):
    hub_id = ("--base-model", "nobody/base", "--mllm", "nobody/not-cached", "--adapter", "nobody/adapter")
    at_limit = "x" * MAX_CAPTION_TOKENS
    _ok(_dry_run(refs, "--prompt", at_limit, "-o", tmp_path / "out", model=hub_id))
    _refused(
        _dry_run(refs, "--prompt", at_limit + "é", "-o", tmp_path / "out", model=hub_id),
        "1026 bytes",
        "tokenizer.json is not on this machine",
    )


def _wordlevel_mllm(folder: Path) -> Path:
    """An MLLM folder whose tokenizer.json gives one token per word (not byte-level, for the count)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "cat": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_a_local_tokenizer_counts_tokens_exactly(tmp_path, refs):
    mllm = ("--mllm", _wordlevel_mllm(tmp_path / "mllm"))
    fits = "cat " * MAX_CAPTION_TOKENS  # 4096 bytes, 1024 tokens
    _ok(_dry_run(refs, "--prompt", fits, "-o", tmp_path / "out", model=mllm))
    _refused(_dry_run(refs, "--prompt", fits + "dog", "-o", tmp_path / "out", model=mllm), "1025 tokens")


def test_short_texts_never_load_a_tokenizer(monkeypatch, tmp_path):
    def boom(*_args):
        raise AssertionError("loaded a tokenizer for a short text")

    monkeypatch.setattr(outputs_check, "_load_tokenizer", boom)
    counter = outputs_check.TokenCounter(str(_wordlevel_mllm(tmp_path / "mllm")))
    assert counter.excess("é" * (MAX_CAPTION_TOKENS // 2)) is None


def test_ref_text_none_reads_no_caption(tmp_path, refs):
    prompts = _write_prompts(tmp_path / "p.yaml", [{"prompt": "a cat " * 1000, "ref_text": "none"}])
    _ok(_dry_run(refs, "--prompts", prompts, "-o", tmp_path / "out"))


def test_long_instruction_is_refused(tmp_path, refs):
    prompts = _write_prompts(tmp_path / "p.yaml", [{"prompt": "a cat", "id": "kitty"}], {"instruction": "w " * 600})
    _refused(
        _dry_run(refs, "--prompts", prompts, "-o", tmp_path / "out"),
        "prompt 'kitty': its instruction is 1200 bytes",
        "shorten the instruction",
    )


def test_prompt_file_location_is_named(tmp_path):
    path = _write_prompts(tmp_path / "p.yaml", ["short", {"id": "long", "prompt": "x" * 2000}])
    prompt_file = load_prompt_file(path)
    settings = SimpleNamespace(instruction="Describe.")
    jobs = [
        SimpleNamespace(prompt_id="short", caption="short", settings=settings),
        SimpleNamespace(prompt_id="long", caption="x" * 2000, settings=settings),
    ]
    with pytest.raises(UsageError, match=rf"^{path}:4: prompt 'long': its text is 2000 bytes"):
        outputs_check.check_text_lengths(jobs, "nobody/not-cached", prompt_file)
    with pytest.raises(UsageError, match=r"^prompt 'long'"):
        outputs_check.check_text_lengths(jobs, "nobody/not-cached")


def test_encode_refuses_a_long_prompt(tmp_path, refs):
    out = tmp_path / "c.safetensors"
    _refused(_encode(refs / "cats", "--prompt", "y" * 5000, "-o", out), "--prompt is 5000 bytes", "at most 1024")
    assert not out.exists()


def test_token_check_needs_no_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from easyref_cli.outputs_check import TokenCounter; "
        f"c = TokenCounter({str(_wordlevel_mllm(tmp_path / 'mllm'))!r}); "
        "assert c.excess('cat ' * 2000) == '2000 tokens'; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------------------------------------
# The plan's last step takes the GROUPS arguments and the prompt file when build_plan passes them
# ----------------------------------------------------------------------------------------------


def test_finish_uses_the_groups_arguments_and_the_prompt_file(tmp_path, refs):
    from easyref_cli import plan as P
    from easyref_cli.runtime import check_runtime

    flat = "{group}_{prompt_id}_{seed}.png"
    plan = P.build_plan(out_dir=tmp_path / "out", groups=[refs], prompt="a cat", model="tiny", name_template=flat)
    runtime = check_runtime(name_template=flat)
    fields = {"out_dir": refs / "out", "models": plan.models}
    with pytest.raises(UsageError, match=f"-o {refs / 'out'} is inside the reference folder {refs};"):
        P._finish(list(plan.jobs), runtime, group_args=[refs], **fields)

    path = _write_prompts(tmp_path / "p.yaml", [{"id": "long", "prompt": "a cat"}])
    long = [replace(job, prompt_id="long", caption="z" * 2000) for job in plan.jobs]
    with pytest.raises(UsageError, match=rf"^{path}:3: prompt 'long'"):
        P._finish(long, runtime, prompt_file=load_prompt_file(path), out_dir=tmp_path / "out", models=plan.models)
