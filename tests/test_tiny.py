"""Tests of the tiny-model builders in ``easyref_cli.tiny``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from easyref_cli import tiny as tiny_mod
from easyref_cli.testing import make_reference_images
from easyref_cli.tiny import (
    QWEN2VL_SPECIAL_TOKENS,
    TINY_LORA_RANK,
    TinyModels,
    build_tiny_models,
    ensure_tiny_models,
    official_state_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA_NAMES = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    """Built once for this module (shadows conftest's session ``tiny`` on purpose: these tests
    check a fresh ``build_tiny_models`` call)."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def unet_attention(tiny):
    """{processor name: Attention module} of the tiny UNet, loaded from its folder."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny.base_model, subfolder="unet")
    return unet, {name: unet.get_submodule(name[: -len(".processor")]) for name in unet.attn_processors}


def test_all_paths_exist(tiny):
    for field in fields(tiny):
        assert getattr(tiny, field.name).exists(), field.name
    assert (tiny.mllm / "config.json").is_file()
    assert (tiny.base_model / "model_index.json").is_file()


def test_qwen2vl_loads_and_runs_with_an_image(tiny):
    from PIL import Image
    from transformers import (
        AutoTokenizer,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny.mllm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny.mllm)
    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny.mllm)
    config = model.config
    assert config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    assert config.text_config.hidden_size == 64 and config.text_config.num_hidden_layers == 3

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2VL_SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids)
    assert max(ids.values()) < config.text_config.vocab_size
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>hello"
    )
    input_ids = tokenizer(text)["input_ids"]
    for token, token_id in ids.items():
        assert input_ids.count(token_id) == text.count(token), token  # each special token: one id
    assert tokenizer.decode(input_ids) == text
    pre_tokenizer = json.loads((tiny.mllm / "tokenizer.json").read_text())["pre_tokenizer"]
    split, byte_level = pre_tokenizer["pretokenizers"]
    assert split["pattern"]["Regex"] == tiny_mod.QWEN2_PRETOKENIZE_REGEX
    assert split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False

    image = Image.new("RGB", (56, 56), (200, 30, 30))
    pixels = processor(images=[image], return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4×4 patches -> 4 merged tokens
    batch = torch.tensor([input_ids])
    with torch.no_grad():
        out = model(
            input_ids=batch,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            # transformers 5.24 wants this with images (the Qwen2VLProcessor would return it).
            mm_token_type_ids=(batch == config.image_token_id).int(),
        )
    assert out.logits.shape == (1, len(input_ids), config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_sdxl_pipeline_loads_and_generates(tiny):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny.base_model / "tokenizer")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length)
    assert len(ids["input_ids"]) == 77
    assert ids["input_ids"][0] == tokenizer.bos_token_id

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.base_model)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer_2.pad_token == "!"
    images = pipe(
        prompt="a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert images.std() > 0.01


def test_official_state_dict_keys_and_shapes(tiny, unet_attention):
    unet, attention = unet_attention
    cross = unet.config.cross_attention_dim
    sd = official_state_dict(tiny.mllm, tiny.base_model, lora=True)
    plain = official_state_dict(tiny.mllm, tiny.base_model, lora=False)

    attn2 = [name for name in attention if name.endswith("attn2.processor")]
    assert len(attn2) == len(attention) // 2 == 12
    for name in attn2:
        module = attention[name]
        for proj in ("to_k", "to_v"):
            weight = sd[f"unet.{name}.{proj}_ip.weight"]
            assert weight.shape == (getattr(module, proj).out_features, cross)
    for name, module in attention.items():
        for lora_name, linear in zip(
            LORA_NAMES, (module.to_q, module.to_k, module.to_v, module.to_out[0]), strict=True
        ):
            down = sd[f"unet.{name}.{lora_name}.down.weight"]
            up = sd[f"unet.{name}.{lora_name}.up.weight"]
            assert down.shape == (TINY_LORA_RANK, linear.in_features)
            assert up.shape == (linear.out_features, TINY_LORA_RANK)
            assert up.abs().max() > 0  # merging LoRA must change the weights
    assert not any("_lora." in key for key in plain)

    h = 64
    assert sd["image_proj_model.proj.0.weight"].shape == (h, h)
    assert sd["image_proj_model.proj.2.weight"].shape == (cross, h)
    assert sd["image_proj_model.proj.3.weight"].shape == (cross,)
    assert sd["mllm_final_layer.reference_tokens"].shape == (64, h)
    assert sd["mllm_final_layer.norm.weight"].shape == (h,)
    assert sd["mllm_final_layer.layers.0.self_attn.k_proj.weight"].shape == (32, h)
    assert "adapter_modules.1.to_k_ip.weight" in sd  # the official duplicates
    assert not any(key.startswith("multimodal_llm.") for key in sd)
    # Each part has its own generator: the adapter does not depend on `lora`.
    for key, value in plain.items():
        assert torch.equal(value, sd[key]), key
    for value in sd.values():
        assert value.dtype == torch.float32 and value.is_contiguous()
        assert value.abs().max() > 0


def test_official_state_dict_multimodal_llm(tiny):
    from transformers import Qwen2VLForConditionalGeneration

    sd = official_state_dict(tiny.mllm, tiny.base_model, lora=False, multimodal_llm=True)
    prefix = "multimodal_llm."
    mllm = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    assert "visual.patch_embed.proj.weight" in mllm
    assert "model.layers.1.mlp.up_proj.weight" in mllm
    assert not any(key.startswith("model.layers.2.") for key in mllm)  # last layer dropped
    assert "lm_head.weight" in mllm and "model.norm.weight" in mllm

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny.mllm)
    current = model.state_dict()
    for key, value in mllm.items():  # 4.45 names -> 5.x module names
        if key.startswith("visual."):
            new = "model." + key
        elif key.startswith("model."):
            new = "model.language_model." + key[len("model.") :]
        else:
            new = key
        assert current[new].shape == value.shape, key
        assert not torch.equal(current[new], value), key  # perturbed: loading changes outputs


def test_checkpoint_files(tiny):
    from safetensors.torch import load_file

    lora = load_file(tiny.adapter_lora)
    deepspeed = torch.load(tiny.adapter_deepspeed, map_location="cpu", weights_only=True)
    assert set(deepspeed) == {"module"}
    assert deepspeed["module"].keys() == lora.keys()
    for key, value in lora.items():
        assert torch.equal(deepspeed["module"][key], value)

    plain = load_file(tiny.adapter)
    with_mllm = load_file(tiny.adapter_mllm)
    assert not any("_lora." in key for key in plain)
    assert set(lora) < set(with_mllm)
    assert any(key.startswith("multimodal_llm.visual.") for key in with_mllm)


def test_ensure_tiny_models_is_idempotent(tmp_path):
    cache = tmp_path / "cache" / "tiny"
    first = ensure_tiny_models(cache)
    assert first == tiny_mod.tiny_layout(cache)
    stamp = first.adapter.stat().st_mtime_ns
    weights = first.mllm / "model.safetensors"
    weights_stamp = weights.stat().st_mtime_ns

    second = ensure_tiny_models(cache)
    assert second == first
    assert first.adapter.stat().st_mtime_ns == stamp
    assert weights.stat().st_mtime_ns == weights_stamp
    assert [p.name for p in cache.parent.iterdir()] == ["tiny"]  # no temporary folders left


def test_ensure_tiny_models_loses_a_race_gracefully(tmp_path, monkeypatch):
    cache = tmp_path / "tiny"
    real_build = tiny_mod.build_tiny_models
    winner_stamp = {}

    def build_while_another_process_wins(root, seed=0):
        monkeypatch.setattr(tiny_mod, "build_tiny_models", real_build)
        winner = ensure_tiny_models(cache)  # the other process finishes first
        winner_stamp["ns"] = winner.adapter.stat().st_mtime_ns
        return real_build(root, seed)

    monkeypatch.setattr(tiny_mod, "build_tiny_models", build_while_another_process_wins)
    models = ensure_tiny_models(cache)
    assert models.root == cache
    assert models.adapter.stat().st_mtime_ns == winner_stamp["ns"]  # the winner's copy is kept
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_ensure_tiny_models_rebuilds_a_stale_cache(tmp_path):
    cache = tmp_path / "tiny"
    ensure_tiny_models(cache)
    (cache / tiny_mod._MARKER_NAME).write_text("easyref-tiny-models v0\n")
    models = ensure_tiny_models(cache)
    assert tiny_mod._is_complete(cache) and models.adapter.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_ensure_tiny_models_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_tiny_models(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_make_reference_images_is_deterministic(tmp_path):
    from PIL import Image

    first = make_reference_images(tmp_path / "a", n=3, size=(48, 32), seed=1)
    again = make_reference_images(tmp_path / "b", n=3, size=(48, 32), seed=1)
    other = make_reference_images(tmp_path / "c", n=3, size=(48, 32), seed=2)
    assert [p.name for p in first] == ["ref_00.png", "ref_01.png", "ref_02.png"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]
    assert len({p.read_bytes() for p in first}) == 3
    with Image.open(first[0]) as image:
        assert image.size == (48, 32) and image.mode == "RGB"


@pytest.mark.slow
def test_module_main_builds_everything(tmp_path):
    out = tmp_path / "out"
    python_path = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    result = subprocess.run(
        [sys.executable, "-m", "easyref_cli.tiny", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = tiny_mod.tiny_layout(out)
    assert f"mllm: {expected.mllm}" in result.stdout
    assert f"adapter_deepspeed: {expected.adapter_deepspeed}" in result.stdout
    assert expected.adapter_mllm.is_file() and (expected.base_model / "unet").is_dir()
