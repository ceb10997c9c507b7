"""Run edge cases: validation before work, per-job failures in the encode phase, cache keys, resume guards."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from easyref_cli import files
from easyref_cli.cli import app


def _args(tiny, group, out, *extra, adapter=None):
    return [
        "generate",
        str(group),
        "--prompt",
        "a cat",
        "-o",
        str(out),
        "--no-cache",
        "-q",
        "--base-model",
        str(tiny.base_model),
        "--mllm",
        str(tiny.mllm),
        "--adapter",
        str(adapter or tiny.adapter_lora),
        "--device",
        "cpu",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        *extra,
    ]


def _invoke(args):
    return CliRunner().invoke(app, args)


@pytest.fixture
def no_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no model may load")

    from easyref_cli.model.encoder import ReferenceEncoder
    from easyref_cli.model.pipeline import EasyRefPipeline

    monkeypatch.setattr(ReferenceEncoder, "from_pretrained", boom)
    monkeypatch.setattr(EasyRefPipeline, "from_pretrained", boom)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "bogus"], "not a device name"),
        (["--offload", "everything"], "--offload"),
        (["--prompt", "a <|image_pad|> cat"], "control token"),
    ],
)
def test_bad_runtime_options_exit_2_before_any_model(tiny, ref_group, tmp_path, no_models, extra, message):
    res = _invoke(_args(tiny, ref_group, tmp_path / "o") + extra)
    assert res.exit_code == 2, res.output
    assert message in res.stderr


def test_cuda_on_a_cpu_machine_is_a_usage_error(tiny, ref_group, tmp_path, no_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = _invoke(_args(tiny, ref_group, tmp_path / "o") + ["--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.stderr


def test_adapter_that_does_not_fit_the_unet_fails_before_encoding(tiny, ref_group, tmp_path, no_models):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny.adapter))
    victim = sorted(k for k in sd if k.startswith("unet.") and k.endswith("to_k_ip.weight"))[0]
    del sd[victim]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    res = _invoke(_args(tiny, ref_group, tmp_path / "o", adapter=bad))
    assert res.exit_code == 2 and victim in res.stderr


def test_untyped_encode_error_fails_that_job_only(tiny, ref_group, tmp_path, monkeypatch):
    from easyref_cli.model.encoder import ReferenceEncoder

    real = ReferenceEncoder.encode_caption
    calls = []

    def flaky(self, prefix, caption):
        calls.append(caption)
        if caption == "boom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prefix, caption)

    monkeypatch.setattr(ReferenceEncoder, "encode_caption", flaky)
    prompts = tmp_path / "p.yaml"
    prompts.write_text("prompts:\n  - boom\n  - fine\n")
    args = _args(tiny, ref_group, tmp_path / "o")
    args[args.index("--prompt") : args.index("--prompt") + 2] = ["--prompts", str(prompts)]
    res = _invoke(args)
    assert res.exit_code == 1, res.output
    status = {e["prompt_id"]: e for e in files.read_manifest(tmp_path / "o" / files.MANIFEST_NAME)}
    assert status["boom"]["status"] == "error" and "out of memory" in status["boom"]["error"]
    assert status["fine"]["status"] == "ok"


def test_existing_output_from_other_settings_is_never_skipped_or_clobbered(tiny, ref_group, tmp_path):
    out = tmp_path / "o"
    assert _invoke(_args(tiny, ref_group, out)).exit_code == 0
    png = next(out.rglob("*.png"))
    before = png.read_bytes()
    res = _invoke(_args(tiny, ref_group, out) + ["--scale", "0.5"])  # same output names, other pictures
    assert res.exit_code == 2 and "other settings" in res.stderr
    assert png.read_bytes() == before
    assert _invoke(_args(tiny, ref_group, out) + ["--scale", "0.5", "--overwrite"]).exit_code == 0
    assert png.read_bytes() != before
    assert _invoke(_args(tiny, ref_group, out) + ["--scale", "0.5"]).exit_code == 0  # now a plain resume


def test_condition_cache_key_follows_the_mllm_weights(tiny, tmp_path):
    import shutil

    from easyref_cli.model.hub import folder_fingerprint

    copy = tmp_path / "mllm"
    shutil.copytree(tiny.mllm, copy)
    before = folder_fingerprint(copy)
    weights = next(copy.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, rewritten
    assert folder_fingerprint(copy) != before


def test_adapter_sha256_is_remembered_in_the_easyref_home(tiny, ref_group, tmp_path, monkeypatch):
    """Runs (planning their job ids, then loading the adapter) hash a multi-GB adapter once, not every time."""
    import hashlib
    from pathlib import Path

    from easyref_cli.identity import hash_memo

    cache = tmp_path / "cache"
    real_hash, hashed = files.sha256_file, []
    monkeypatch.setattr(files, "sha256_file", lambda p: hashed.append(Path(p).resolve()) or real_hash(p))
    adapter = Path(tiny.adapter_lora).resolve()
    for out in ("a", "b"):  # two outputs: both runs have jobs to do
        args = [a for a in _args(tiny, ref_group, tmp_path / out) if a != "--no-cache"] + ["--cache-dir", str(cache)]
        assert _invoke(args).exit_code == 0
        record = files.read_png_record(next((tmp_path / out).rglob("*.png")))
        assert record["adapter_sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert hashed.count(adapter) == 1
    assert hash_memo().is_file()
