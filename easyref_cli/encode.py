"""``easyref encode``: one group → ``cond``/``uncond`` tensors in a safetensors file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from easyref_cli import __version__
from easyref_cli.constants import DEFAULT_ADAPTER, DEFAULT_MLLM, INSTRUCTION
from easyref_cli.errors import UsageError


@dataclass(frozen=True)
class EncodeResult:
    path: Path
    cond_shape: tuple[int, ...]
    uncond_shape: tuple[int, ...]
    metadata: dict[str, str]


def encode_group(
    group_dir: Path,
    *,
    caption: str = "",
    mllm: str | None = None,
    adapter: str | None = None,
    out: Path,
    dtype: str | None = None,
    device: str | None = None,
    instruction: str | None = None,
    bidirectional_final: bool = False,
) -> EncodeResult:
    """Validate inputs first (group, images, output), then load the encoder and write the tensors."""
    from easyref_cli import files

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {out}")
    groups = files.find_groups([Path(group_dir)])
    if len(groups) != 1:
        raise UsageError(f"{group_dir} holds {len(groups)} groups; `encode` takes one folder of images")
    group = groups[0]
    images = [files.load_image(p) for p in group.images]  # InputError names a bad file before any model loads

    import torch
    from safetensors.torch import save_file

    from easyref_cli.model import hub
    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.encoder import ReferenceEncoder
    from easyref_cli.model.pipeline import default_device, resolve_dtypes

    mllm_spec, adapter_spec = mllm or DEFAULT_MLLM, adapter or DEFAULT_ADAPTER
    mllm_path = hub.resolve_folder(mllm_spec, "--mllm")
    checkpoint = load_checkpoint(hub.resolve_checkpoint(adapter_spec))
    device = device or default_device()
    _, encoder_dtype = resolve_dtypes(dtype, device)
    encoder = ReferenceEncoder.from_pretrained(
        mllm_path, checkpoint, device=device, dtype=encoder_dtype, bidirectional_final=bidirectional_final
    )
    instruction = INSTRUCTION if instruction is None else instruction
    cond = encoder.encode(images, caption, instruction)
    uncond = encoder.encode_uncond(instruction)

    digests = [files.sha256_file(p) for p in group.images]
    metadata = {
        "format": "pt",
        "easyref_version": __version__,
        "mllm": mllm_spec,
        "adapter": adapter_spec,
        "adapter_sha256": checkpoint.sha256,
        "group": group.name,
        "group_sha256": files.group_content_hash(group, digests),
        "references": json.dumps([{"path": str(p), "sha256": d} for p, d in zip(group.images, digests)]),
        "instruction": instruction,
        "caption": caption,
        "dtype": str(encoder_dtype).removeprefix("torch."),
        "final_layer": "bidirectional" if bidirectional_final else "causal",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(
            {"cond": cond.detach().to(torch.float32).cpu().contiguous(), "uncond": uncond.detach().to(torch.float32).cpu().contiguous()},
            str(tmp),
            metadata=metadata,
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return EncodeResult(out, tuple(cond.shape), tuple(uncond.shape), metadata)
