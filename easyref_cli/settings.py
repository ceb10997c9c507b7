"""THE generation-settings schema. Torch-free.

One frozen dataclass, :class:`GenerationSettings`; each field carries a :class:`Spec` in its
metadata saying what the setting may do. Everything else is derived from it, never spelled again:

* defaults (the field defaults) and the ``--help`` "Default:" text (:meth:`Spec.cli_help`);
* validation and its wording (:func:`check_setting`, :func:`validate_settings`);
* the keys a prompt file's ``defaults:``, a preset and a single prompt may hold
  (:data:`SETTING_KEYS`, :data:`PER_PROMPT_KEYS`);
* the ``easyref generate`` flags (``options.with_setting_options`` builds them from ``flags``);
* the job id and the PNG record (:func:`identity_values`), the record's required keys and their
  types (:func:`record_types`), replay from a record;
* the pipeline request (:func:`pipeline_values`), whose fields also make the batch key.

Adding a setting is one field here plus its use in the pipeline. A setting added after record
schema 1 sets ``since=2``: at its default it is left out of the job id and the record, so every
existing image keeps its id (resume) and its bytes, and an old record replays with the default.

The choice tables (schedulers, dtypes, attention backends, offload modes) live here once too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, NamedTuple

from easyref_cli.constants import INSTRUCTION, OFFICIAL_NEGATIVE_PROMPT, QWEN_SPECIAL_TOKENS
from easyref_cli.errors import UsageError

# ----------------------------------------------------------------------------------------------
# Choice tables
# ----------------------------------------------------------------------------------------------


class Sampler(NamedTuple):
    """A ``scheduler:`` choice: the diffusers class built from the base model's scheduler config,
    extra config, the name A1111's ``parameters`` text uses, and whether it draws noise at every step."""

    diffusers_class: str
    config: Mapping[str, Any]
    a1111: str
    stochastic: bool = False


SCHEDULERS: dict[str, Sampler] = {
    "euler": Sampler("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a", stochastic=True),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "ddim": Sampler("DDIMScheduler", {}, "DDIM"),
    "pndm": Sampler("PNDMScheduler", {}, "PLMS"),
    "lms": Sampler("LMSDiscreteScheduler", {}, "LMS"),
}
#: ``ref_text: prompt`` gives the prompt to the MLLM as caption; ``none`` gives an empty caption.
REF_TEXT_CHOICES = ("prompt", "none")
#: ``--attention``: xformers if a real probe call works (auto), PyTorch SDPA, or xformers (fail loudly).
ATTENTION_CHOICES = ("auto", "sdpa", "xformers")
#: ``zero_negative``: ``never`` encodes every negative prompt, ``""`` included (the official code);
#: ``empty`` zeroes it when all of a batch's negatives are empty and the base model's config says
#: ``force_zeros_for_empty_prompt`` (diffusers; easyref-cli 0.1); ``always`` zeroes it whatever the text.
ZERO_NEGATIVE_CHOICES = ("never", "empty", "always")
#: ``exif_orientation``: ``apply`` turns references upright by their EXIF tag (a deliberate deviation:
#: users expect upright photos); ``ignore`` feeds the stored pixel order, as the official code does.
EXIF_CHOICES = ("apply", "ignore")
#: ``seed_mode``: ``cpu`` gives every image its own CPU generator (device-, batch- and order-independent);
#: ``official`` draws a prompt's images as the official ``generate(num_samples=n, seed=s)`` on the run's device.
SEED_MODES = ("cpu", "official")
#: ``control_preprocess``: what a control image goes through before the ControlNet reads it
#: (:mod:`easyref_cli.preprocess`; kept here so the schema stays import-light).
CONTROL_PREPROCESS_CHOICES = ("none", "canny")
#: the record schema that introduced ControlNet, img2img and inpainting (older readers refuse such records)
CONTROL_SCHEMA = 3
CONTROL_PANEL = "Control, image-to-image, inpainting"
#: ``--offload``: accelerate CPU offload of SDXL for small GPUs.
OFFLOAD_CHOICES = ("none", "model", "sequential")
#: ``--dtype`` spellings → canonical name (a ``torch`` attribute, or ``auto``).
DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
#: torch.Generator.manual_seed accepts 0 … 2**64-1.
MAX_SEED = 2**64 - 1


def choice_error(flag: str, value: Any, choices: Sequence[str]) -> str:
    """The one wording of a bad choice: ``--attention must be one of auto, sdpa, xformers, got 'x'``."""
    return f"{flag} must be one of {', '.join(choices)}, got {value!r}"


def check_choice(flag: str, value: str | None, choices: Sequence[str]) -> str | None:
    """``value`` normalised (stripped, lower case), ``None`` kept; UsageError naming ``flag`` if not a choice."""
    if value is None:
        return None
    normalised = str(value).strip().lower()
    if normalised not in choices:
        raise UsageError(choice_error(flag, value, choices))
    return normalised


def check_dtype(value: str | None, flag: str = "--dtype") -> str | None:
    """The canonical dtype name of ``value`` (``fp16`` → ``float16``), ``None`` kept."""
    if value is None:
        return None
    canonical = DTYPE_ALIASES.get(str(value).strip().lower())
    if canonical is None:
        raise UsageError(choice_error(flag, value, sorted(set(DTYPE_ALIASES))))
    return canonical


def check_device_name(device: str | None, flag: str = "--device") -> None:
    """Spelling only (torch-free); whether the device exists is checked before models load."""
    if device is not None and not re.match(r"^(cpu|cuda|mps|xpu|npu|meta)(:\d+)?$", device):
        raise UsageError(f"{flag} {device!r} is not a device name: use cpu, cuda, cuda:N, mps…")


# ----------------------------------------------------------------------------------------------
# Validators: value → normalised value, or Invalid with a message that reads after ``key: ``
# ----------------------------------------------------------------------------------------------


class Invalid(ValueError):
    """A value failed validation; the message reads after ``key: ``."""


def as_int(value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise Invalid(f"must be ≥ {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise Invalid(f"must be ≤ {maximum}, got {value}")
    return value


def as_float(value: Any, *, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise Invalid(f"must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise Invalid(f"must be ≥ {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise Invalid(f"must be ≤ {maximum}, got {value}")
    return value


def as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {value!r}")
    return value


def as_choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
        return value.strip().lower()

    return check


def as_size(value: Any) -> int:
    value = as_int(value)
    if value <= 0 or value % 8:
        raise Invalid(f"must be a positive multiple of 8, got {value}")
    return value


def parse_lora(value: Any) -> tuple[str, float]:
    """A ``--lora`` / ``loras:`` item → ``(file or hub id, weight)``.

    ``FILE_OR_ID[:WEIGHT]`` (weight 1.0 when absent; a ``:`` not followed by a number is part of the
    name), or a mapping ``{path: FILE_OR_ID, weight: W}``.

    Raises:
        ValueError: with a message that reads after the key.
    """
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"path", "weight"})
        if unknown or not isinstance(value.get("path"), str) or not value["path"].strip():
            raise ValueError(f"a LoRA mapping needs 'path' (and optional 'weight'), got {value!r}")
        spec, weight = value["path"].strip(), value.get("weight", 1.0)
    elif isinstance(value, str) and value.strip():
        spec, weight = value.strip(), 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                spec, weight = head, float(tail)
            except ValueError:
                pass
    else:
        raise ValueError(f"a LoRA is FILE_OR_ID[:WEIGHT] or {{path: ..., weight: ...}}, got {value!r}")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or weight != weight
        or abs(weight) == float("inf")
    ):
        raise ValueError(f"LoRA weight must be a finite number, got {weight!r}")
    return spec, float(weight)


def as_batch_size(value: Any) -> int | str:
    """``auto`` or an integer ≥ 1 (``"8"`` from the command line too)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.isascii() and text.isdecimal():
            value = int(text)
    try:
        return as_int(value, minimum=1)
    except Invalid:
        raise Invalid(f"must be 'auto' or an integer ≥ 1, got {value!r}") from None


def as_loras(value: Any) -> tuple[tuple[str, float], ...]:
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, (list, tuple)):
        raise Invalid(f"must be a list of FILE_OR_ID[:WEIGHT] or {{path, weight}}, got {value!r}")
    try:
        return tuple(parse_lora(item) for item in items)
    except ValueError as e:
        raise Invalid(str(e)) from None


def as_tuple(check: Callable[[Any], Any], *, what: str, empty: bool = True) -> Callable[[Any], tuple]:
    """A tuple setting: one value or a list of them, each checked by ``check`` (``Invalid`` names the item)."""

    def convert(value: Any) -> tuple:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items and not empty:
            raise Invalid(f"must be one {what} or a list of them, got an empty list")
        out = []
        for i, item in enumerate(items):
            try:
                out.append(check(item))
            except Invalid as e:
                raise Invalid(f"item {i + 1}: {e}" if len(items) > 1 else str(e)) from None
        return tuple(out)

    return convert


def as_path(value: Any) -> str:
    """A file or folder path (checked for existence at planning, where its source is known)."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a file or folder path, got {value!r}")
    return value.strip()


def as_optional_path(value: Any) -> str | None:
    return None if value is None else as_path(value)


def as_fraction(value: Any) -> float:
    return as_float(value, minimum=0.0, maximum=1.0)


def as_strength(value: Any) -> float:
    value = as_float(value, maximum=1.0)
    if value <= 0.0:
        raise Invalid(f"must be > 0 and ≤ 1, got {value}")
    return value


def per_net(values: Sequence[Any], count: int) -> tuple[Any, ...]:
    """A one-or-each setting (``control_scale``…, :data:`PER_NET_KEYS`) as one value per ControlNet."""
    return tuple(values) * count if len(values) == 1 else tuple(values)


def find_control_tokens(text: str) -> list[str]:
    """The Qwen2-VL control tokens in ``text``: user text holding one would be read as structure
    (an extra image slot, an end of turn…)."""
    return [t for t in QWEN_SPECIAL_TOKENS if t in text]


def check_control_tokens(text: str, what: str) -> None:
    """UsageError when ``text`` (described by ``what``: "the prompt of prompt 'x'") holds control tokens."""
    found = find_control_tokens(text)
    if found:
        raise UsageError(f"{what} contains Qwen2-VL control token(s) {', '.join(found)}; remove them")


# ----------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What one setting is and may do (the metadata of a :class:`GenerationSettings` field).

    ``per_prompt``: a single prompt of a prompt file may override it. ``identity``: it changes the
    pixels, so it is part of the job id, the PNG record and replay. ``pipeline``: it is passed to
    the pipeline's ``GenerationRequest`` under the same name. ``flags``: its ``easyref generate``
    options (none: prompt file and presets only). ``since``: the record schema that introduced it;
    for such a setting, ``legacy`` is the value a record without it implies (default: the field
    default) and ``keep(settings)`` whether the job id and record carry it (default: the value
    differs from ``legacy``), so images made before it existed keep their ids and bytes.
    """

    help: str
    check: Callable[[Any], Any]
    per_prompt: bool = False
    identity: bool = False
    pipeline: bool = False
    flags: tuple[str, ...] = ()
    since: int = 1
    legacy: Any = None
    keep: Callable[[Any], bool] | None = None
    default_text: str | None = None
    #: for a tuple setting: the type of one item ("str", "float"); its flag is repeatable
    item: str | None = None
    #: the ``--help`` panel of its flag
    panel: str = "Settings"
    #: one value for every ControlNet, or one each (checked against the run's ControlNets)
    per_net: bool = False

    def cli_help(self, default: Any) -> str:
        shown = self.default_text if self.default_text is not None else str(default)
        return f"{self.help} Default: {shown}."


def setting(default: Any, help: str, check: Callable[[Any], Any], **spec: Any) -> Any:
    """A :class:`GenerationSettings` field: its default and its :class:`Spec`."""
    if spec.get("since", 1) > 1:
        spec.setdefault("legacy", default)
    return field(default=default, metadata={"spec": Spec(help=help, check=check, **spec)})


_SAMPLE = dict(per_prompt=True, identity=True, pipeline=True)


def per_net_setting(default: Any, help: str, check: Callable[[Any], Any], what: str, flag: str, **spec: Any) -> Any:
    """A ControlNet setting given once for all ControlNets or once each (a repeatable flag), at ``(default,)``
    left out of the job id and record of jobs without control images (record schema 3)."""
    item = "float" if isinstance(default, float) else "str"
    return setting(
        (default,), help, as_tuple(check, what=what, empty=False), flags=(flag,), panel=CONTROL_PANEL, per_net=True,
        item=item, default_text=str(default), since=CONTROL_SCHEMA, keep=lambda s: bool(s.control_image),
        **{**_SAMPLE, **spec},
    )  # fmt: skip


@dataclass(frozen=True)
class GenerationSettings:
    """Every generation setting, with its built-in default (the lowest precedence layer)."""

    steps: int = setting(30, "Denoising steps.", lambda v: as_int(v, minimum=1), flags=("--steps",), **_SAMPLE)
    guidance: float = setting(
        5.0, "Classifier-free guidance scale.", lambda v: as_float(v, minimum=0.0), flags=("--guidance",), **_SAMPLE
    )
    scale: float = setting(1.0, "Reference (adapter) strength.", as_float, flags=("--scale",), **_SAMPLE)
    width: int = setting(1024, "Image width, a multiple of 8.", as_size, flags=("--width",), **_SAMPLE)
    height: int = setting(1024, "Image height, a multiple of 8.", as_size, flags=("--height",), **_SAMPLE)
    seed: int = setting(
        0,
        "First seed; image i of a prompt uses seed+i.",
        lambda v: as_int(v, minimum=0, maximum=MAX_SEED),
        flags=("--seed",),
        **_SAMPLE,
    )
    images_per_prompt: int = setting(
        1,
        "Images per prompt and group.",
        lambda v: as_int(v, minimum=1),
        per_prompt=True,
        flags=("--images-per-prompt", "-n"),
        identity=True,  # with seed_mode official only: the images share one noise stream
        since=2,
        keep=lambda s: s.seed_mode == "official",
    )
    negative_prompt: str = setting(
        OFFICIAL_NEGATIVE_PROMPT,
        'Negative prompt, always CLIP-encoded ("" too) as the official code does.',
        as_str,
        flags=("--negative-prompt",),
        default_text=f"the official {OFFICIAL_NEGATIVE_PROMPT!r}",
        **_SAMPLE,
    )
    scheduler: str = setting(
        "euler", f"Sampler: {', '.join(SCHEDULERS)}.", as_choice(tuple(SCHEDULERS)), flags=("--scheduler",), **_SAMPLE
    )
    ref_text: str = setting(
        "prompt",
        "'prompt' gives the prompt to the MLLM after the instruction; 'none' gives it no caption.",
        as_choice(REF_TEXT_CHOICES),
        per_prompt=True,
    )
    instruction: str = setting(
        INSTRUCTION,
        "The MLLM instruction before the caption.",
        as_str,
        identity=True,
        default_text="the one the public checkpoint was trained with",
    )
    batch_size: str = setting(
        "auto",
        "Images per UNet batch: a number, or 'auto' — the largest that pays (CUDA: what free memory holds; "
        "CPU: grown while images/s improves), remembered per device, model and size. Same seeds whatever the "
        "batch; batched kernels may round a few pixels one level differently.",
        lambda v: as_batch_size(v),
        flags=("--batch-size",),
    )

    guidance_rescale: float = setting(
        0.0,
        "Rescale the guided noise prediction toward the text branch's spread (Lin et al. 2023; diffusers' "
        "guidance_rescale): 0 is plain CFG, ~0.7 counters over-exposure at high guidance.",
        lambda v: as_float(v, minimum=0.0, maximum=1.0),
        flags=("--guidance-rescale",),
        since=2,
        **_SAMPLE,
    )

    zero_negative: str = setting(
        "never",
        "Zeroed negative text embeddings instead of the encoded negative prompt: 'never' (the official code), "
        "'empty' (when the negative prompt is empty and the base model's config says so: diffusers, "
        "easyref-cli 0.1) or 'always'.",
        as_choice(ZERO_NEGATIVE_CHOICES),
        flags=("--zero-negative",),
        since=2,
        legacy="empty",
        keep=lambda s: s.zero_negative == "always" or (s.zero_negative == "never" and s.negative_prompt == ""),
        **_SAMPLE,
    )

    exif_orientation: str = setting(
        "apply",
        "References' EXIF orientation: 'apply' turns photos upright (a deliberate deviation), 'ignore' feeds "
        "the stored pixel order as the official code does.",
        as_choice(EXIF_CHOICES),
        identity=True,
        flags=("--exif-orientation",),
        since=2,
    )

    seed_mode: str = setting(
        "cpu",
        "Initial noise: 'cpu' draws each image from its own CPU generator (the same pixels on any device, batch "
        "or order); 'official' reproduces the official generate(num_samples=n, seed=s) on the run's device: a "
        "prompt's n images (seeds s…s+n-1) are slices of one noise stream seeded s.",
        as_choice(SEED_MODES),
        flags=("--seed-mode",),
        since=2,
        **_SAMPLE,
    )

    loras: tuple = setting(
        (),
        "Community SDXL LoRAs fused into the UNet and text encoders after EasyRef's own, in order: a list of "
        "FILE_OR_ID[:WEIGHT] or {path, weight} (the --lora flag on the command line).",
        lambda v: as_loras(v),
        since=2,
    )

    # ControlNet, img2img, inpainting (record schema 3; left out of the id and record when unused)
    controlnets: tuple = setting(
        (),
        "SDXL ControlNet models (diffusers folders or hub ids) in order; several make a multi-ControlNet, each "
        "with its own control image. They attend to the text tokens only, as the official code. 'tiny' / "
        "'demo': the --model family's own (demo: a canny ControlNet for its 64² shapes).",
        as_tuple(as_path, what="ControlNet"),
        flags=("--controlnet",),
        item="str",
        panel="Models",
        default_text="none",
    )
    control_image: tuple = setting(
        (),
        "Control image per ControlNet: a file, or a folder (one job per image; folders given together are "
        "paired by file name). Stretched to the image size (Lanczos, as diffusers), then preprocessed.",
        as_tuple(as_path, what="file or folder"),
        per_prompt=True,
        flags=("--control-image",),
        panel=CONTROL_PANEL,
        item="str",
        default_text="none",
    )
    control_scale: tuple = per_net_setting(
        1.0, "ControlNet strength: one value, or one per ControlNet.", as_float, "number", "--control-scale"
    )
    control_start: tuple = per_net_setting(
        0.0,
        "Fraction of the steps at which each ControlNet starts (one value, or one per ControlNet).",
        as_fraction,
        "fraction",
        "--control-start",
    )
    control_end: tuple = per_net_setting(
        1.0,
        "Fraction of the steps at which each ControlNet stops (one value, or one per ControlNet).",
        as_fraction,
        "fraction",
        "--control-end",
    )
    control_preprocess: tuple = per_net_setting(
        "none",
        f"What each control image goes through first: {', '.join(CONTROL_PREPROCESS_CHOICES)} (one value, or one "
        "per ControlNet), after the stretch to the image size; canny is OpenCV's Canny(100, 200) in numpy.",
        as_choice(CONTROL_PREPROCESS_CHOICES),
        "preprocessor",
        "--control-preprocess",
        pipeline=False,  # applied when the image is loaded (easyref_cli.inputs), not by the pipeline
    )
    init_image: str | None = setting(
        None,
        "Image-to-image: the picture to start from, a file or a folder (one job per image). Stretched to the "
        "image size (Lanczos).",
        as_optional_path,
        per_prompt=True,
        flags=("--init-image",),
        panel=CONTROL_PANEL,
        default_text="none",
    )
    mask: str | None = setting(
        None,
        "Inpainting: a single-channel mask for --init-image (white = repaint, black = keep), a file or a folder "
        "paired with the init images by file name; the init image's size.",
        as_optional_path,
        per_prompt=True,
        flags=("--mask",),
        panel=CONTROL_PANEL,
        default_text="none",
    )
    strength: float = setting(
        0.8,
        "Image-to-image and inpainting: how much of the init image is re-noised (1 = all of it).",
        as_strength,
        flags=("--strength",),
        panel=CONTROL_PANEL,
        since=CONTROL_SCHEMA,
        keep=lambda s: s.init_image is not None,
        **_SAMPLE,
    )

    def caption(self, prompt: str) -> str:
        """What the MLLM reads after the instruction for ``prompt``."""
        return prompt if self.ref_text == "prompt" else ""


SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(GenerationSettings)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(GenerationSettings) if f.default is not MISSING}
#: Every setting key (prompt-file ``defaults:``, presets, the command line).
SETTING_KEYS: tuple[str, ...] = tuple(SPECS)
#: The settings a single prompt may override.
PER_PROMPT_KEYS: tuple[str, ...] = tuple(k for k, s in SPECS.items() if s.per_prompt)
#: The settings that change pixels: job id, record, replay.
IDENTITY_KEYS: tuple[str, ...] = tuple(k for k, s in SPECS.items() if s.identity)
#: The ControlNet settings given once for all ControlNets or once per ControlNet.
PER_NET_KEYS: tuple[str, ...] = tuple(k for k, s in SPECS.items() if s.per_net)
_TYPES = {f.name: f.type for f in fields(GenerationSettings)}


def check_setting(key: str, value: Any) -> Any:
    """Validate and normalise one setting (``guidance: 5`` → ``5.0``...).

    Raises:
        Invalid: with a message that reads after ``key: ``.
    """
    if key not in SPECS:
        raise Invalid(f"unknown option (allowed: {', '.join(SETTING_KEYS)})")
    return SPECS[key].check(value)


def validate_settings(
    values: Mapping[str, Any], *, allowed: Sequence[str] = SETTING_KEYS
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Validate a mapping of settings.

    Returns the normalised settings (``None`` values dropped: "not given") and ``(key, message)``
    problems (unknown keys, wrong types, out-of-range values); callers add where they come from.
    """
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, value in values.items():
        if key not in allowed:
            problems.append((str(key), f"unknown key (allowed: {', '.join(allowed)})"))
            continue
        if value is None:
            continue
        try:
            out[key] = check_setting(key, value)
        except Invalid as e:
            problems.append((key, str(e)))
    return out, problems


def resolve_settings(*layers: Mapping[str, Any] | None) -> GenerationSettings:
    """The one precedence function: later layers win; ``None`` values and layers mean "not given".

    Called as ``resolve_settings(model_defaults, preset, file_defaults, cli)`` over the built-in
    defaults; a prompt's own fields then go through :func:`dataclasses.replace`.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is not None:
                merged[key] = value
    return GenerationSettings(**merged)


def _kept(settings: GenerationSettings, key: str) -> bool:
    spec = SPECS[key]
    if spec.since == 1:
        return True
    if spec.keep is not None:
        return spec.keep(settings)
    return getattr(settings, key) != spec.legacy


def identity_values(settings: GenerationSettings) -> dict[str, Any]:
    """The settings that change pixels: what the job id hashes and the PNG record stores. A setting
    newer than record schema 1 is left out where it means what records without it meant."""
    return {key: getattr(settings, key) for key in IDENTITY_KEYS if _kept(settings, key)}


def from_record(values: Mapping[str, Any]) -> GenerationSettings:
    """Settings from a record's (checked) values. A setting newer than the record takes its default
    where that means the same as the record's silence, else its ``legacy`` value (what made the image)."""
    settings = GenerationSettings(**values)
    for key, spec in SPECS.items():
        if spec.since > 1 and key not in values and _kept(settings, key):
            settings = replace(settings, **{key: spec.legacy})
    return settings


def pipeline_values(settings: GenerationSettings) -> dict[str, Any]:
    """Keyword arguments of the pipeline's ``GenerationRequest`` (besides prompt and references)."""
    return {k: getattr(settings, k) for k, s in SPECS.items() if s.pipeline}


def type_name(key: str) -> str:
    """``"int"``, ``"float"``, ``"str"``, ``"tuple"`` or ``"str | None"``: the declared type of a setting."""
    annotation = _TYPES[key]
    return annotation if isinstance(annotation, str) else annotation.__name__


def record_types() -> dict[str, tuple[type, ...]]:
    """Types of the identity settings in a record: required (schema 1) and optional (later)."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "tuple": (list,)}
    return {k: kinds[type_name(k)] for k in IDENTITY_KEYS}


def flag_of(key: str) -> str:
    """The ``easyref generate`` flag of a setting (``--images-per-prompt``), or ``--key`` spelled out."""
    flags = SPECS[key].flags if key in SPECS else ()
    return flags[0] if flags else "--" + str(key).replace("_", "-")
