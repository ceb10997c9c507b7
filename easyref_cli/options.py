"""Shared ``Annotated`` option aliases. Defaults are ``None`` so "not given" stays visible to precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from easyref_cli import settings as _settings

MllmOpt = Annotated[
    str | None,
    typer.Option(
        "--mllm", help="Qwen2-VL folder or hub id (default Qwen/Qwen2-VL-2B-Instruct).", rich_help_panel="Models"
    ),
]
AdapterOpt = Annotated[
    str | None,
    typer.Option(
        "--adapter",
        help="EasyRef checkpoint (.safetensors / DeepSpeed .pt) or hub id (default zongzhuofan/EasyRef).",
        rich_help_panel="Models",
    ),
]
BaseModelOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help="SDXL diffusers folder, hub id, or single-file checkpoint (.safetensors, A1111/ComfyUI layout; see --base-config). Default: stabilityai/stable-diffusion-xl-base-1.0.",
        rich_help_panel="Models",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="torch device: cpu, cuda, cuda:1, mps … (default: cuda if available).",
        rich_help_panel="Runtime",
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="auto (fp16 SDXL + bf16 Qwen2-VL on GPU, fp32 on CPU), float32, float16 or bfloat16.",
        rich_help_panel="Runtime",
    ),
]
InstructionOpt = Annotated[
    str | None,
    typer.Option("--instruction", help="MLLM instruction (default: the one the public checkpoint was trained with)."),
]
BidirectionalOpt = Annotated[
    bool,
    typer.Option(
        "--bidirectional-final",
        help="Run the final MLLM layer bidirectionally (a deviation: the public checkpoint was trained causal).",
    ),
]
OutFileOpt = Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.", dir_okay=False)]
#: ``easyref encode``'s use of a generation setting: the same help and default as ``generate``.
ExifOpt = Annotated[
    str,
    typer.Option(
        "--exif-orientation",
        help=_settings.SPECS["exif_orientation"].cli_help(_settings.DEFAULTS["exif_orientation"]),
        show_default=False,
    ),
]
VerboseOpt = Annotated[
    int, typer.Option("--verbose", "-v", count=True, help="More logging; -v lists ignored files, -vv debug.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary; errors only.")]


_OPTION_TYPES = {"int": int, "float": float, "str": str, "str | None": str}


def _setting_option(key: str):
    """The ``Annotated`` Typer option of a setting; a tuple setting's flag is repeatable (a list)."""
    from easyref_cli.settings import DEFAULTS, SPECS

    spec = SPECS[key]
    kind = list[_OPTION_TYPES[spec.item]] if spec.item is not None else _OPTION_TYPES[_settings.type_name(key)]
    option = typer.Option(
        *spec.flags, help=spec.cli_help(DEFAULTS[key]), rich_help_panel=spec.panel, show_default=False
    )
    return Annotated[kind | None, option]


def with_setting_options(func):
    """Give a command one option per generation setting that has flags (:mod:`easyref_cli.settings`).

    The command declares a ``settings`` parameter; the options take its place in the signature
    (so ``--help`` shows them there, in the "Settings" panel, with the schema's help and default),
    and their values reach it as one ``{key: value or None}`` dict. A setting added to the schema
    with ``flags=`` needs no edit here or in ``cli.py``.
    """
    import functools
    import inspect

    from easyref_cli.settings import SPECS

    keys = [key for key, spec in SPECS.items() if spec.flags]
    taken = set(inspect.signature(func).parameters) - {"settings"}
    for key in keys:  # fail at import, naming the setting, rather than with a Typer traceback later
        if (SPECS[key].item or _settings.type_name(key)) not in _OPTION_TYPES or key in taken:
            raise TypeError(
                f"setting {key!r}: its type must be int, float or str (or a tuple of them) and its name not a "
                f"parameter of {func.__name__}"
            )
    generated = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_setting_option(key))
        for key in keys
    ]
    signature = inspect.signature(func, eval_str=True)
    params = []  # all keyword-only: Typer passes everything by name
    for param in signature.parameters.values():
        if param.name == "settings":
            params += generated
        else:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        settings = {key: kwargs.pop(key, None) or None for key in keys if SPECS[key].item}  # [] = not given
        settings.update({key: kwargs.pop(key, None) for key in keys if not SPECS[key].item})
        settings.update(kwargs.pop("settings", None) or {})  # callers from code may pass the dict itself
        return func(*args, settings=settings, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
