"""Shared ``Annotated`` option aliases. Defaults are ``None`` so "not given" stays visible to precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MllmOpt = Annotated[str | None, typer.Option("--mllm", help="Qwen2-VL folder or hub id (default Qwen/Qwen2-VL-2B-Instruct).", rich_help_panel="Models")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="EasyRef checkpoint (.safetensors / DeepSpeed .pt) or hub id (default zongzhuofan/EasyRef).", rich_help_panel="Models")]
BaseModelOpt = Annotated[str | None, typer.Option("--base-model", help="SDXL diffusers folder or hub id (default stabilityai/stable-diffusion-xl-base-1.0).", rich_help_panel="Models")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, mps … (default: cuda if available).", rich_help_panel="Runtime")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto (fp16 SDXL + bf16 Qwen2-VL on GPU, fp32 on CPU), float32, float16 or bfloat16.", rich_help_panel="Runtime")]
InstructionOpt = Annotated[str | None, typer.Option("--instruction", help="MLLM instruction (default: the one the public checkpoint was trained with).")]
BidirectionalOpt = Annotated[bool, typer.Option("--bidirectional-final", help="Run the final MLLM layer bidirectionally (a deviation: the public checkpoint was trained causal).")]
OutFileOpt = Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.", dir_okay=False)]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging; -v lists ignored files, -vv debug.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary; errors only.")]
