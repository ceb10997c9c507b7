"""``easyref encode``: one group → ``cond``/``uncond`` tensors in a safetensors file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from easyref_cli import __version__
from easyref_cli.constants import DEFAULT_ADAPTER, DEFAULT_MLLM, INSTRUCTION
from easyref_cli.errors import UsageError
from easyref_cli.settings import EXIF_CHOICES, check_choice, check_control_tokens, check_device_name, check_dtype


@dataclass(frozen=True)
class EncodeResult:
    path: Path
    cond_shape: tuple[int, ...]
    uncond_shape: tuple[int, ...]
    metadata: dict[str, str]


def _check_out(out: Path) -> None:
    """``--out`` names a file that can be written: not a folder, below folders, not too long."""
    from easyref_cli.naming import check_path_length

    if out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {out}")
    check_path_length(out, "--out", temp_extra=len(".") + len(".tmp"))  # _write's ".NAME.tmp"
    for path in (out, *out.parents):
        try:
            if not path.exists():
                continue
            is_dir = path.is_dir()
        except OSError:
            return  # cannot look: the write reports it
        if path == out and is_dir:
            raise UsageError(f"--out {out} is a folder; give a file name ending in .safetensors")
        if path != out and not is_dir:
            raise UsageError(f"--out {out}: {path} is a file, not a folder; give a path inside a folder")
        return


def _check_text_lengths(caption: str, instruction: str, mllm: str) -> None:
    from easyref_cli.outputs_check import MAX_CAPTION_TOKENS, TokenCounter

    counter = TokenCounter(mllm)
    for flag, text in (("--prompt", caption), ("--instruction", instruction)):
        excess = counter.excess(text)
        if excess is not None:
            raise UsageError(
                f"{flag} is {excess}; the MLLM reads at most {MAX_CAPTION_TOKENS} tokens of it "
                "(MAX_CAPTION_TOKENS; the reference images count apart): shorten it"
            )


def _check_inputs(group_dir: Path, out: Path, caption: str, instruction: str, device, dtype, exif: str, mllm: str):
    """Every usage check before any model loads; returns the group and its decoded images."""
    from easyref_cli import files

    _check_out(out)
    check_device_name(device)
    check_dtype(dtype)
    check_control_tokens(caption, "--prompt")
    check_control_tokens(instruction, "--instruction")
    _check_text_lengths(caption, instruction, mllm)
    groups = files.find_groups([Path(group_dir)])
    if len(groups) != 1:
        raise UsageError(f"{group_dir} holds {len(groups)} groups; `encode` takes one folder of images")
    group = groups[0]
    return group, files.load_group_images(group, exif_orientation=exif == "apply")  # InputError names a bad file


def _metadata(group, *, mllm: str, adapter: str, checkpoint, instruction: str, caption: str, dtype, exif_orientation: str,
              bidirectional_final: bool) -> dict[str, str]:  # fmt: skip
    from easyref_cli import files

    digests = [files.sha256_file(p) for p in group.images]
    return {
        "format": "pt",
        "easyref_version": __version__,
        "mllm": mllm,
        "adapter": adapter,
        "adapter_sha256": checkpoint.sha256,
        "group": group.name,
        "group_sha256": files.group_content_hash(group, digests),
        "references": json.dumps([{"path": str(p), "sha256": d} for p, d in zip(group.images, digests, strict=True)]),
        "instruction": instruction,
        "caption": caption,
        "dtype": str(dtype).removeprefix("torch."),
        "final_layer": "bidirectional" if bidirectional_final else "causal",
        "exif_orientation": exif_orientation,
    }


def _write(out: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Atomically: a temporary file renamed into place."""
    import torch
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file({k: v.detach().to(torch.float32).cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)  # fmt: skip
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


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
    exif_orientation: str = "apply",
) -> EncodeResult:
    """Validate inputs first (group, images, output, texts), then load the encoder and write the tensors."""
    out = Path(out)
    instruction = INSTRUCTION if instruction is None else instruction
    exif_orientation = check_choice("--exif-orientation", exif_orientation, EXIF_CHOICES)
    mllm_spec, adapter_spec = mllm or DEFAULT_MLLM, adapter or DEFAULT_ADAPTER
    group, images = _check_inputs(group_dir, out, caption, instruction, device, dtype, exif_orientation, mllm_spec)

    from easyref_cli.env import default_device
    from easyref_cli.model import hub
    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.encoder import ReferenceEncoder
    from easyref_cli.model.pipeline import resolve_dtypes

    mllm_path = hub.resolve_folder(mllm_spec, "--mllm")
    checkpoint = load_checkpoint(hub.resolve_checkpoint(adapter_spec))
    device = device or default_device()
    _, encoder_dtype = resolve_dtypes(check_dtype(dtype), device)
    encoder = ReferenceEncoder.from_pretrained(
        mllm_path, checkpoint, device=device, dtype=encoder_dtype, bidirectional_final=bidirectional_final
    )
    cond = encoder.encode(images, caption, instruction)
    uncond = encoder.encode_uncond(instruction)
    metadata = _metadata(group, mllm=mllm_spec, adapter=adapter_spec, checkpoint=checkpoint, instruction=instruction,
                         caption=caption, dtype=encoder_dtype, bidirectional_final=bidirectional_final, exif_orientation=exif_orientation)  # fmt: skip
    _write(out, {"cond": cond, "uncond": uncond}, metadata)
    return EncodeResult(out, tuple(cond.shape), tuple(uncond.shape), metadata)
