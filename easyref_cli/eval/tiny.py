"""Tiny random CLIP and DINO models for the eval tests (no hub: built here, saved with ``save_pretrained``).

* :func:`build_tiny_clip`: ``CLIPModel`` (2-layer text and vision towers, width 32, projection 16,
  32×32 images in 8×8 patches), the locally built CLIP tokenizer of :mod:`easyref_cli.tiny`
  and a ``CLIPImageProcessorPil`` (resize to 32, center crop 32);
* :func:`build_tiny_dinov2`: ``Dinov2Model`` of the same size with a ``BitImageProcessorPil``,
  the layout of ``facebook/dinov2-small``;
* :func:`build_tiny_dino_vit`: ``ViTModel`` without pooler + ``ViTImageProcessorPil``, the layout
  of ``facebook/dino-vits16``.

Each folder then loads through the real ``from_pretrained`` code in :mod:`easyref_cli.eval.metrics`.
:func:`ensure_tiny_scorers` builds the CLIP + DINOv2 pair once into a cache folder for
``easyref eval --model tiny`` (an offline smoke run: the numbers mean nothing).
Torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

IMAGE_SIZE = 32
PATCH_SIZE = 8
_PROCESSOR_SIZES = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A tiny random CLIP folder at ``path`` (model, tokenizer, PIL image processor). Returns ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from easyref_cli.tiny import build_clip_tokenizer, quiet_progress_bars

    path = Path(path)
    tokenizer = build_clip_tokenizer(pad_token="<|endoftext|>")
    config = CLIPConfig(
        text_config={
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,  # pooling looks for this id
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    with quiet_progress_bars():
        CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(**_PROCESSOR_SIZES).save_pretrained(path)
    return path


def build_tiny_dinov2(path: Path, seed: int = 0) -> Path:
    """A tiny random DINOv2 folder at ``path`` (model + ``BitImageProcessorPil``). Returns ``path``."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    from easyref_cli.tiny import quiet_progress_bars

    path = Path(path)
    config = Dinov2Config(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
    )
    torch.manual_seed(seed)
    with quiet_progress_bars():
        Dinov2Model(config).save_pretrained(path)
    BitImageProcessorPil(
        **_PROCESSOR_SIZES, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(path)
    return path


def build_tiny_dino_vit(path: Path, seed: int = 0) -> Path:
    """A tiny random DINO ViT folder at ``path`` (``ViTModel`` without pooler). Returns ``path``."""
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    from easyref_cli.tiny import quiet_progress_bars

    path = Path(path)
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    torch.manual_seed(seed)
    with quiet_progress_bars():
        ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


_MARKER_NAME = ".easyref-tiny-scorers-complete"
_BUILD_VERSION = "easyref tiny scorers v1"


def ensure_tiny_scorers(cache_dir: Path) -> tuple[Path, Path]:
    """``(clip folder, dinov2 folder)`` under ``cache_dir``, built once (atomically: a sibling temp
    folder renamed into place, with a version marker written last)."""
    cache_dir = Path(cache_dir)
    marker = cache_dir / _MARKER_NAME
    paths = (cache_dir / "clip", cache_dir / "dinov2")
    if marker.is_file() and marker.read_text(encoding="utf-8") == _BUILD_VERSION:
        return paths
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.parent / f".{cache_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        build_tiny_clip(tmp / "clip")
        build_tiny_dinov2(tmp / "dinov2")
        (tmp / _MARKER_NAME).write_text(_BUILD_VERSION, encoding="utf-8")
        if cache_dir.exists():  # an older or incomplete build
            trash = cache_dir.parent / f".{cache_dir.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(cache_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            if not marker.is_file():  # not a lost race with another process: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return paths
