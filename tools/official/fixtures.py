"""Fixtures for the official-code golden harness. Runs in the project's own environment.

``python tools/official/fixtures.py WORK`` builds, under ``WORK``:

* ``ours/``: the tiny models of :func:`easyref_cli.tiny.build_tiny_models` (seed ``SETTINGS["model_seed"]``),
  exactly what ``tests/test_official_golden.py`` rebuilds;
* ``refs/``: the reference PNGs of :func:`easyref_cli.testing.make_reference_images` (no EXIF);
* ``official/``: copies of the tiny Qwen2-VL and SDXL folders that transformers 4.45.2 /
  diffusers 0.22.1 can read (config and tokenizer files converted; weights copied unchanged);
* ``fixtures.json``: paths, the generation settings and the fingerprint of the inputs.

``tools/official/run_official.py`` (in the official venv) reads ``fixtures.json``. The test imports
this module by path for :data:`SETTINGS` and :func:`fingerprint` (nothing here is product code).

Conversions (fixtures only; weights are never changed):

* Qwen2-VL ``config.json``: transformers 5 nests the text model under ``text_config`` and writes
  ``rope_parameters``; 4.45 reads a flat config with ``rope_theta`` and
  ``rope_scaling = {"type": "mrope", "mrope_section": [...]}``. The vision config drops 5.x-only keys.
  The weight names in ``model.safetensors`` are already the 4.45 ones (``visual.*``, ``model.*``).
* Qwen2-VL tokenizer: ``tokenizer.json`` is kept; ``tokenizer_config.json`` is rewritten in the
  4.45 layout (``additional_special_tokens``, ``errors``...) and the Qwen2-VL chat template (the
  one of ``Qwen/Qwen2-VL-2B-Instruct``) is added as ``chat_template.json``: the official code builds
  its prompt with ``processor.apply_chat_template``, while ours builds the same text directly.
* Qwen2-VL ``preprocessor_config.json``: the 4.45 layout (``min_pixels``/``max_pixels``,
  ``processor_class``), without 5.x's ``size`` dict. The official code overrides both bounds anyway.
* SDXL CLIP tokenizers: transformers 5 saves only ``tokenizer.json``; the slow ``CLIPTokenizer`` of
  4.45 (what ``model_index.json`` names) needs ``vocab.json`` + ``merges.txt``, written here from it.
* SDXL ``text_encoder`` weights: transformers 5 saves ``CLIPTextModel`` without the ``text_model.``
  prefix; renamed to the 4.45 names (4.45 would otherwise initialise the whole encoder at random,
  with only a warning). UNet, VAE and scheduler files are read by diffusers 0.22.1 as they are
  (it ignores the config keys it does not know, listed in its warnings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

#: Everything the golden run and the test share. Changing any of it means regenerating the goldens.
SETTINGS: dict = {
    "model_seed": 0,
    "refs": {"n": 3, "size": [64, 48], "seed": 0},
    "checkpoint": "adapter_lora",  # adapter + rank-4 LoRA on every attention layer
    "lora_rank": 4,
    "num_tokens": 64,
    "cond_image_size": 336,
    # cond embeddings: one per caption (the second one empty)
    "captions": {"caption": "a photo of a cat in the garden", "empty": ""},
    # the image: caption = prompt (as the official generate()); explicit non-empty negative prompt
    "prompt": "a photo of a cat in the garden",
    "negative_prompt": "monochrome, lowres, bad anatomy, worst quality, low quality",
    "seed": 42,
    "steps": 3,
    "guidance": 5.0,
    "scale": 1.0,
    "width": 64,
    "height": 64,
}

FIXTURES_JSON = "fixtures.json"

#: The chat template of ``Qwen/Qwen2-VL-2B-Instruct`` (its ``chat_template.json``).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Fingerprint: what the goldens were computed from
# --------------------------------------------------------------------------------------------


def tensors_sha256(path: Path) -> str:
    """sha256 over a ``.safetensors`` file's tensors (name, dtype, shape, bytes; sorted by name).

    Content, not file bytes: independent of how the serializer lays out the header.
    """
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_sha256(path: Path) -> str:
    """sha256 over an image's decoded RGB pixels (mode, size, bytes)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        digest = hashlib.sha256(f"{rgb.mode}|{rgb.size}\n".encode())
        digest.update(rgb.tobytes())
    return digest.hexdigest()


def fingerprint(models, ref_paths: list[Path], checkpoint: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every weight file of ``models`` (a ``TinyModels``), of the
    checkpoint ``checkpoint`` (a ``TinyModels`` field name) and of the reference images."""
    root = Path(models.root)
    weight_files = sorted(p for folder in (models.mllm, models.base_model) for p in Path(folder).rglob("*.safetensors"))
    checkpoint = Path(getattr(models, checkpoint))
    result = {p.relative_to(root).as_posix(): tensors_sha256(p) for p in [*weight_files, checkpoint]}
    for path in ref_paths:
        result[f"refs/{Path(path).name}"] = image_sha256(path)
    return result


# --------------------------------------------------------------------------------------------
# Conversion for transformers 4.45.2 / diffusers 0.22.1
# --------------------------------------------------------------------------------------------

#: transformers-5-only text config keys (dropped) and the 4.45 vision config keys (kept).
_TEXT_DROP = {"model_type", "layer_types", "rope_parameters", "dtype"}
_VISION_KEEP = {
    "depth",
    "embed_dim",
    "hidden_size",
    "hidden_act",
    "mlp_ratio",
    "num_heads",
    "in_channels",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
    "initializer_range",
}
_TOP_KEEP = {
    "architectures",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "tie_word_embeddings",
}


def qwen2vl_config_v445(config: dict) -> dict:
    """A transformers-5 Qwen2-VL ``config.json`` (nested ``text_config``) in the flat 4.45 layout."""
    text = dict(config["text_config"])
    rope = dict(text.get("rope_parameters") or {})
    if rope.pop("rope_type", "default") != "default" or set(rope) - {"rope_theta", "mrope_section"}:
        raise ValueError(f"unexpected text rope_parameters {text.get('rope_parameters')}: extend the conversion")
    vision = dict(config["vision_config"])
    vision_rope = vision.get("rope_parameters") or {}
    if vision_rope.get("rope_theta", 10000.0) != 10000.0:  # 4.45 hard-codes the vision RoPE theta
        raise ValueError(f"vision rope_theta {vision_rope['rope_theta']} is not 4.45's fixed 10000")
    if unknown := set(vision) - _VISION_KEEP - {"model_type", "rope_parameters"}:
        raise ValueError(f"unexpected vision config keys {sorted(unknown)}: extend the conversion")
    flat = {key: value for key, value in text.items() if key not in _TEXT_DROP}
    flat.update({key: config[key] for key in sorted(_TOP_KEEP) if key in config})
    flat.update(
        {
            "model_type": "qwen2_vl",
            "torch_dtype": "float32",
            "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": list(rope["mrope_section"])},
            "vision_config": {key: value for key, value in vision.items() if key in _VISION_KEEP},
            "transformers_version": "4.45.2",
        }
    )
    return dict(sorted(flat.items()))


def convert_qwen2vl(src: Path, dst: Path) -> None:
    """Copy the tiny Qwen2-VL folder ``src`` to ``dst`` in the transformers-4.45.2 layout."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "config.json").read_text())
    _write_json(dst / "config.json", qwen2vl_config_v445(config))

    tok = json.loads((src / "tokenizer_config.json").read_text())
    _write_json(
        dst / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "additional_special_tokens": list(tok["extra_special_tokens"]),
            "bos_token": tok.get("bos_token"),
            "chat_template": QWEN2VL_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": bool(tok.get("clean_up_tokenization_spaces", False)),
            "eos_token": tok["eos_token"],
            "errors": "replace",
            "model_max_length": tok["model_max_length"],
            "pad_token": tok["pad_token"],
            "processor_class": "Qwen2VLProcessor",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": tok.get("unk_token"),
        },
    )
    _write_json(dst / "chat_template.json", {"chat_template": QWEN2VL_CHAT_TEMPLATE})

    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre.pop("size", None)
    pre.update({"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"})
    _write_json(dst / "preprocessor_config.json", dict(sorted(pre.items())))


def clip_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json`` + ``merges.txt`` + a 4.45 ``tokenizer_config.json`` for the slow
    ``CLIPTokenizer`` from a transformers-5 ``tokenizer.json`` in ``folder`` (which is then removed)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    if model["type"] != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ValueError(f"{folder}: not a CLIP BPE tokenizer.json")
    vocab = dict(model["vocab"])
    for token in data["added_tokens"]:  # special tokens live in the vocabulary of the slow tokenizer
        if vocab.setdefault(token["content"], token["id"]) != token["id"]:
            raise ValueError(f"{folder}: added token {token['content']!r} clashes with the vocabulary")
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model["merges"]]
    _write_json(folder / "vocab.json", dict(sorted(vocab.items(), key=lambda item: item[1])))
    # CLIPTokenizer skips the first line of merges.txt (the "#version" header).
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": tok["bos_token"],
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": tok["eos_token"],
            "errors": "replace",
            "model_max_length": tok["model_max_length"],
            "pad_token": tok["pad_token"],
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": tok["unk_token"],
        },
    )
    (folder / "tokenizer.json").unlink()


def clip_text_weights_v445(path: Path) -> None:
    """Rename a transformers-5 CLIP text encoder's weights in place to the 4.45 names.

    transformers 5 saves ``CLIPTextModel`` without its ``text_model.`` prefix (``embeddings.*``,
    ``encoder.*``, ``final_layer_norm.*``); 4.45 only loads ``text_model.*`` (it would silently
    initialise the encoder at random otherwise). ``text_projection.*`` stays top level.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    renamed = {
        key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": value
        for key, value in state.items()
    }
    if renamed.keys() != state.keys():
        save_file(renamed, str(path), metadata={"format": "pt"})


def convert_sdxl(src: Path, dst: Path) -> None:
    """Copy the tiny SDXL folder ``src`` to ``dst`` with CLIP tokenizers the 4.45 slow tokenizer reads
    and CLIP text encoder weights in 4.45 names."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for name in ("tokenizer", "tokenizer_2"):
        clip_tokenizer_files(dst / name)
    for name in ("text_encoder", "text_encoder_2"):
        clip_text_weights_v445(dst / name / "model.safetensors")


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def build(work: Path) -> dict:
    """Build every fixture under ``work``; write and return ``fixtures.json``."""
    from easyref_cli.constants import INSTRUCTION
    from easyref_cli.testing import make_reference_images
    from easyref_cli.tiny import build_tiny_models

    work = Path(work).resolve()
    for name in ("ours", "refs", "official"):
        shutil.rmtree(work / name, ignore_errors=True)
    models = build_tiny_models(work / "ours", seed=SETTINGS["model_seed"])
    refs = SETTINGS["refs"]
    ref_paths = make_reference_images(work / "refs", n=refs["n"], size=tuple(refs["size"]), seed=refs["seed"])
    convert_qwen2vl(models.mllm, work / "official" / "qwen2-vl")
    convert_sdxl(models.base_model, work / "official" / "sdxl")
    fixtures = {
        "settings": SETTINGS,
        "instruction": INSTRUCTION,
        "paths": {
            "mllm": str(work / "official" / "qwen2-vl"),
            "base_model": str(work / "official" / "sdxl"),
            "checkpoint": str(getattr(models, SETTINGS["checkpoint"])),
            "refs": [str(p) for p in ref_paths],
        },
        "fingerprint": fingerprint(models, ref_paths, SETTINGS["checkpoint"]),
    }
    _write_json(work / FIXTURES_JSON, fixtures)
    return fixtures


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="work folder (models, refs, converted copies, fixtures.json)")
    args = parser.parse_args(argv)
    fixtures = build(args.work)
    print(f"fixtures in {args.work} ({len(fixtures['fingerprint'])} fingerprinted files)")


if __name__ == "__main__":
    main()
