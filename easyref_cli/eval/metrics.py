"""MRBench-style metrics for a generated output folder: CLIP-I, CLIP-T, DINO-I (+ target variants).

Definitions (each a cosine similarity of L2-normalised embeddings, so every value lies in [-1, 1]):

=================  ==============================================================================
``clip_i``         mean over the image's references of cos(CLIP image emb. of the generated image,
                   CLIP image emb. of the reference)
``clip_t``         cos(CLIP image emb. of the generated image, CLIP text emb. of its ``prompt``);
                   the prompt is truncated to CLIP's 77 tokens
``dino_i``         mean over the references of cos(DINO CLS emb., DINO CLS emb.)
``clip_i_target``  with ``--targets``: cos(CLIP image emb. of the image, of its held-out target)
``dino_i_target``  with ``--targets``: cos(DINO CLS emb. of the image, of its held-out target)
=================  ==============================================================================

CLIP embeddings are the projected ``image_embeds`` / ``text_embeds`` of a transformers
``CLIPModel`` (default ``openai/clip-vit-large-patch14``); DINO embeddings are the CLS token of
``last_hidden_state`` (after the final layer norm) of ``Dinov2Model`` (default
``facebook/dinov2-small``) or of ``ViTModel`` (``facebook/dino-vits16``). Images are read with
:func:`easyref_cli.files.load_image` (EXIF orientation, RGB) and preprocessed by each model's own
PIL-backend image processor. Every distinct image (generated, reference, target) and every
distinct prompt is embedded once, in batches.

Summaries (``metrics.json``) are means over images (each image weighs the same) overall and per
group; target means are over the images that have a target (``target_count``).

Held-out targets (MRBench protocol), looked up in ``--targets DIR`` in this order, the first that
exists winning (any image extension, case-insensitive):

1. ``DIR/<group>/<prompt_id>_<seed>.<ext>`` — one target per generated image,
2. ``DIR/<group>/<prompt_id>.<ext>``        — one per group and prompt,
3. ``DIR/<group>.<ext>``                    — one per group.

Torch and transformers are imported inside functions; importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from easyref_cli import __version__, files
from easyref_cli.errors import EasyRefError, InputError, ModelError, UsageError
from easyref_cli.eval import (
    EVAL_DIRNAME,
    METRICS_NAME,
    PER_IMAGE_NAME,
    GeneratedImage,
    collect_images,
    distinct,
    require_images,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dinov2-small"
#: ``config.model_type`` values accepted by ``--dino-model`` (DINOv2, DINOv2 with registers, DINO ViT).
DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "vit")
DEFAULT_BATCH_SIZE = 16

METRIC_KEYS = ("clip_i", "clip_t", "dino_i")
TARGET_METRIC_KEYS = ("clip_i_target", "dino_i_target")
COLUMN_TITLES = {
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "dino_i": "DINO-I",
    "clip_i_target": "CLIP-I target",
    "dino_i_target": "DINO-I target",
}
METRICS_SCHEMA = 1

_CLIP_GUIDANCE = (
    "--clip-model wants a transformers CLIP folder (config.json, weights, tokenizer files, "
    "preprocessor_config.json) or a hub id, e.g. `hf download openai/clip-vit-large-patch14 "
    "--local-dir DIR` on a connected machine, then --clip-model DIR"
)
_DINO_GUIDANCE = (
    "--dino-model wants a transformers DINOv2 or DINO ViT folder (config.json, weights, "
    "preprocessor_config.json) or a hub id, e.g. `hf download facebook/dinov2-small --local-dir "
    "DIR` on a connected machine, then --dino-model DIR"
)


# ----------------------------------------------------------------------------------------------
# Cosine maths
# ----------------------------------------------------------------------------------------------


def normalize(x: Any) -> np.ndarray:
    """Rows (or a single vector) scaled to unit L2 norm, as float64; all-zero rows stay zero."""
    arr = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two vectors, clipped to [-1, 1] (0 when either is all zeros)."""
    value = float(np.dot(normalize(a), normalize(b)))
    return min(1.0, max(-1.0, value))


def mean_cosine(a: Any, others: Sequence[Any]) -> float | None:
    """Mean cosine similarity between ``a`` and each of ``others``; ``None`` when there are none."""
    if len(others) == 0:
        return None
    return float(np.mean([cosine(a, b) for b in others]))


def image_scores(
    *,
    clip_image: Any,
    clip_refs: Sequence[Any],
    clip_text: Any,
    dino_image: Any,
    dino_refs: Sequence[Any],
    clip_target: Any | None = None,
    dino_target: Any | None = None,
) -> dict[str, float | None]:
    """The metrics of one generated image from its embeddings (see the module docstring)."""
    return {
        "clip_i": mean_cosine(clip_image, clip_refs),
        "clip_t": cosine(clip_image, clip_text),
        "dino_i": mean_cosine(dino_image, dino_refs),
        "clip_i_target": None if clip_target is None else cosine(clip_image, clip_target),
        "dino_i_target": None if dino_target is None else cosine(dino_image, dino_target),
    }


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarize(rows: Sequence[Mapping[str, Any]], *, with_targets: bool) -> dict[str, Any]:
    """``{"overall": {...}, "groups": {name: {...}}}`` with ``count`` and the mean of each metric.

    With targets, each summary also has ``target_count`` and the target means (over the images
    that have a target). Groups keep first-appearance order.
    """
    keys = METRIC_KEYS + (TARGET_METRIC_KEYS if with_targets else ())

    def one(subset: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"count": len(subset)}
        for key in keys:
            out[key] = _mean(r.get(key) for r in subset)
        if with_targets:
            out["target_count"] = sum(1 for r in subset if r.get("target") is not None)
        return out

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["group"]), []).append(row)
    return {"overall": one(rows), "groups": {name: one(g) for name, g in groups.items()}}


# ----------------------------------------------------------------------------------------------
# Tables (stdout markdown; report.py renders the same rows as HTML)
# ----------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4f}"


def table_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per group, then ``overall``) of the metrics table, as strings."""
    with_targets = "clip_i_target" in metrics.get("overall", {})
    keys = METRIC_KEYS + (TARGET_METRIC_KEYS if with_targets else ())
    header = ["group", "images", *(COLUMN_TITLES[k] for k in keys)]
    if with_targets:
        header.insert(2, "with target")

    def row(name: str, summary: Mapping[str, Any]) -> list[str]:
        cells = [name, str(summary.get("count", 0)), *(_fmt(summary.get(k)) for k in keys)]
        if with_targets:
            cells.insert(2, str(summary.get("target_count", 0)))
        return cells

    rows = [row(name, s) for name, s in metrics.get("groups", {}).items()]
    rows.append(row("overall", metrics.get("overall", {})))
    return header, rows


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """The metrics as a GitHub markdown table (``|`` in group names escaped)."""
    header, rows = table_rows(metrics)
    rows[-1][0] = f"**{rows[-1][0]}**"

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([line(header), line(align), *(line(r) for r in rows)])


# ----------------------------------------------------------------------------------------------
# Held-out targets
# ----------------------------------------------------------------------------------------------


class TargetFinder:
    """Finds the held-out target of a generated image under ``--targets DIR`` (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"--targets {self.root}: no such folder")
        self._listings: dict[Path, dict[str, list[Path]]] = {}

    def _by_stem(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self._listings:
            stems: dict[str, list[Path]] = {}
            if folder.is_dir():
                for entry in sorted(folder.iterdir()):
                    if files.is_image_file(entry):
                        stems.setdefault(entry.stem, []).append(entry)
            self._listings[folder] = stems
        return self._listings[folder]

    def _one(self, folder: Path, stem: str) -> Path | None:
        found = self._by_stem(folder).get(stem, [])
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise UsageError(f"--targets: several targets for {folder / stem}.* ({names}); keep one")
        return found[0] if found else None

    def candidates(self, group: str, prompt_id: str, seed: int | None) -> list[tuple[Path, str]]:
        """``(folder, stem)`` pairs looked up, most specific first."""
        out = []
        if seed is not None:
            out.append((self.root / group, f"{prompt_id}_{seed}"))
        out += [(self.root / group, prompt_id), (self.root, group)]
        return out

    def find(self, group: str, prompt_id: str, seed: int | None) -> Path | None:
        for folder, stem in self.candidates(group, prompt_id, seed):
            if stem and (path := self._one(folder, stem)) is not None:
                return path
        return None


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


#: ``--model`` families of ``easyref eval``. ``tiny``: random tiny CLIP + DINOv2 built locally.
MODEL_CHOICES = ("tiny",)
TINY_NOTICE = (
    "--model tiny: tiny RANDOM CLIP and DINOv2 models built locally for a smoke run — the "
    "commands and files are real, the numbers mean nothing."
)


def model_specs(model: str | None, clip_model: str | None, dino_model: str | None) -> tuple[str, str]:
    """``(clip spec, dino spec)`` from ``--model`` / ``--clip-model`` / ``--dino-model`` (defaults filled in)."""
    if model is None:
        return clip_model or DEFAULT_CLIP_MODEL, dino_model or DEFAULT_DINO_MODEL
    if model not in MODEL_CHOICES:
        raise UsageError(f"--model must be one of {', '.join(MODEL_CHOICES)}, got {model!r}")
    if clip_model is not None or dino_model is not None:
        raise UsageError("--model tiny replaces --clip-model/--dino-model; give one or the other")
    from easyref_cli.env import easyref_home
    from easyref_cli.eval.tiny import ensure_tiny_scorers

    clip, dino = ensure_tiny_scorers(easyref_home() / "tiny-eval-models")
    return str(clip), str(dino)


def resolve_device(device: str | None) -> str:
    """``--device``: given → checked; ``None`` → ``cuda`` when available, else ``mps``, else ``cpu``."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a torch device (try cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here (try --device cpu)")
    return str(dev)


def _load(what: str, spec: str, folder: Path, guidance: str, loader: Callable[[], Any]) -> Any:
    """Run a transformers loader; any failure becomes a ModelError saying what to pass instead."""
    try:
        return loader()
    except EasyRefError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError...
        raise ModelError(
            f"cannot load the {what} from {folder} ({spec}): {type(exc).__name__}: {exc}. {guidance}"
        ) from None


@dataclass(frozen=True)
class ModelSource:
    """A scoring model found on disk: what was asked for, where it is, its ``config.model_type``."""

    spec: str
    folder: Path
    model_type: str
    guidance: str


def _find_model(spec: str, option: str, accepted: Sequence[str], guidance: str) -> ModelSource:
    from transformers import AutoConfig

    from easyref_cli.model.hub import resolve_folder

    folder = resolve_folder(spec, option)
    config = _load("config", spec, folder, guidance, lambda: AutoConfig.from_pretrained(folder))
    model_type = getattr(config, "model_type", None)
    if model_type not in accepted:
        raise ModelError(
            f"{option} {spec}: {folder} holds a {model_type!r} model, not {' / '.join(accepted)}. {guidance}"
        )
    return ModelSource(spec=spec, folder=folder, model_type=model_type, guidance=guidance)


def find_clip(spec: str) -> ModelSource:
    """The ``--clip-model`` folder (local or from the HF cache), checked to hold a CLIP config."""
    return _find_model(spec, "--clip-model", ("clip",), _CLIP_GUIDANCE)


def find_dino(spec: str) -> ModelSource:
    """The ``--dino-model`` folder, checked to hold a DINOv2 / DINO ViT config."""
    return _find_model(spec, "--dino-model", DINO_MODEL_TYPES, _DINO_GUIDANCE)


def _pooled_output(output: Any) -> Any:
    from easyref_cli.model.compat import pooled_output

    return pooled_output(output)


def _embed_images(
    paths: Sequence[Path],
    *,
    processor: Any,
    forward: Callable[[Any], Any],
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[Path, np.ndarray]:
    """Embed each image once, in batches: ``{resolved path: unit-norm float64 vector}``."""
    from tqdm import tqdm

    out: dict[Path, np.ndarray] = {}
    todo = distinct(paths)
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [files.load_image(p) for p in chunk]
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
            vectors = normalize(forward(pixel_values).float().cpu().numpy())
            for path, vector in zip(chunk, vectors, strict=True):
                out[Path(path).resolve()] = vector
            bar.update(len(chunk))
    return out


class ClipEmbedder:
    """A transformers ``CLIPModel`` with its tokenizer and PIL-backend image processor."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any, device: str) -> None:
        self.model, self.tokenizer, self.processor, self.device = model, tokenizer, processor, device
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def load(cls, source: ModelSource, device: str) -> ClipEmbedder:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        spec, folder, guidance = source.spec, source.folder, source.guidance
        model = _load(
            "CLIP model", spec, folder, guidance, lambda: CLIPModel.from_pretrained(folder, dtype=torch.float32)
        )
        tokenizer = _load("CLIP tokenizer", spec, folder, guidance, lambda: AutoTokenizer.from_pretrained(folder))
        processor = _load(
            "CLIP image processor",
            spec,
            folder,
            guidance,
            lambda: AutoImageProcessor.from_pretrained(folder, backend="pil"),
        )
        return cls(model.to(device).eval(), tokenizer, processor, device)

    def embed_images(self, paths: Sequence[Path], batch_size: int, progress: bool = False) -> dict[Path, np.ndarray]:
        import torch

        def forward(pixel_values):
            with torch.inference_mode():
                px = pixel_values.to(self.device, dtype=self.model.dtype)
                return _pooled_output(self.model.get_image_features(pixel_values=px))

        return _embed_images(
            paths,
            processor=self.processor,
            forward=forward,
            batch_size=batch_size,
            progress=progress,
            desc="CLIP images",
        )

    def embed_texts(self, texts: Sequence[str], batch_size: int) -> dict[str, np.ndarray]:
        """``{text: unit-norm vector}``; texts longer than CLIP's context are truncated."""
        import torch

        todo = list(dict.fromkeys(texts))
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            tokens = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            with torch.inference_mode():
                features = _pooled_output(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    )
                )
            for text, vector in zip(chunk, normalize(features.float().cpu().numpy()), strict=True):
                out[text] = vector
        return out


class DinoEmbedder:
    """A DINOv2 (``Dinov2Model``) or DINO ViT (``ViTModel``) with its PIL-backend image processor."""

    def __init__(self, model: Any, processor: Any, device: str) -> None:
        self.model, self.processor, self.device = model, processor, device

    @classmethod
    def load(cls, source: ModelSource, device: str) -> DinoEmbedder:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        spec, folder, guidance = source.spec, source.folder, source.guidance
        # DINO ViT checkpoints carry no pooler; only the CLS token is used anyway.
        kwargs = {"add_pooling_layer": False} if source.model_type == "vit" else {}
        model = _load(
            "DINO model",
            spec,
            folder,
            guidance,
            lambda: AutoModel.from_pretrained(folder, dtype=torch.float32, **kwargs),
        )
        processor = _load(
            "DINO image processor",
            spec,
            folder,
            guidance,
            lambda: AutoImageProcessor.from_pretrained(folder, backend="pil"),
        )
        return cls(model.to(device).eval(), processor, device)

    def embed_images(self, paths: Sequence[Path], batch_size: int, progress: bool = False) -> dict[Path, np.ndarray]:
        import torch

        def forward(pixel_values):
            with torch.inference_mode():
                px = pixel_values.to(self.device, dtype=self.model.dtype)
                return self.model(pixel_values=px).last_hidden_state[:, 0]

        return _embed_images(
            paths,
            processor=self.processor,
            forward=forward,
            batch_size=batch_size,
            progress=progress,
            desc="DINO images",
        )


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The eval run
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    per_image_path: Path
    metrics_path: Path


def _check_references(images: Sequence[GeneratedImage]) -> None:
    """Every recorded reference must exist (InputError before any model loads); warn on changed ones."""
    missing: dict[Path, GeneratedImage] = {}
    expected: dict[Path, str] = {}
    for image in images:
        for ref, entry in zip(image.references, image.record.get("references") or [], strict=False):
            if not ref.is_file():
                missing.setdefault(ref, image)
            elif isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
                expected.setdefault(ref.resolve(), entry["sha256"])
    if missing:
        ref, image = next(iter(missing.items()))
        raise InputError(
            f"{len(missing)} reference image(s) recorded in the generated PNGs are missing, e.g. "
            f"{ref} (recorded in {image.path}). CLIP-I and DINO-I compare each image with the "
            "references it was made from: put them back at the recorded paths "
            "(`easyref inspect IMAGE` lists them)"
        )
    changed = [p for p, digest in expected.items() if files.sha256_file(p) != digest]
    if changed:
        logger.warning(
            "%d reference image(s) changed since generation (sha256 differs), e.g. %s; "
            "scores use their current content",
            len(changed),
            changed[0],
        )


def _find_targets(images: Sequence[GeneratedImage], targets: Path) -> dict[str, Path]:
    finder = TargetFinder(targets)
    found = {}
    for image in images:
        path = finder.find(image.group, image.prompt_id, image.seed)
        if path is not None:
            found[image.job_id] = path
    if not found:
        raise UsageError(
            f"--targets {targets}: no target found for any image; expected "
            f"{targets}/<group>/<prompt_id>_<seed>.<ext>, {targets}/<group>/<prompt_id>.<ext> "
            f"or {targets}/<group>.<ext> (e.g. {targets}/{images[0].group}/{images[0].prompt_id}.png)"
        )
    if len(found) < len(images):
        logger.warning("--targets: %d of %d image(s) have no target", len(images) - len(found), len(images))
    return found


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(dict(r), ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


@dataclass(frozen=True)
class Embeddings:
    """Unit-norm embeddings of every distinct image (by resolved path) and prompt of a run."""

    clip_images: dict[Path, np.ndarray]
    clip_texts: dict[str, np.ndarray]
    dino_images: dict[Path, np.ndarray]


def _embed_all(
    clip_source: ModelSource,
    dino_source: ModelSource,
    device: str,
    paths: Sequence[Path],
    prompts: Sequence[str],
    *,
    batch_size: int,
    progress: bool,
) -> Embeddings:
    """CLIP image and text embeddings, then DINO CLS embeddings; one model in memory at a time."""
    from easyref_cli.model.compat import quiet_loading

    quiet_loading()
    clip = ClipEmbedder.load(clip_source, device)
    clip_images = clip.embed_images(paths, batch_size, progress)
    clip_texts = clip.embed_texts(prompts, batch_size)
    del clip
    _release(device)

    dino = DinoEmbedder.load(dino_source, device)
    dino_images = dino.embed_images(paths, batch_size, progress)
    del dino
    _release(device)
    return Embeddings(clip_images=clip_images, clip_texts=clip_texts, dino_images=dino_images)


def _score_row(
    im: GeneratedImage, embeddings: Embeddings, target: Path | None, *, with_targets: bool
) -> dict[str, Any]:
    """The ``per_image.jsonl`` row of one generated image (target columns ``with_targets``)."""
    clip_images, dino_images = embeddings.clip_images, embeddings.dino_images
    key = im.path.resolve()
    refs = [r.resolve() for r in im.references]
    scores = image_scores(
        clip_image=clip_images[key],
        clip_refs=[clip_images[r] for r in refs],
        clip_text=embeddings.clip_texts[im.prompt],
        dino_image=dino_images[key],
        dino_refs=[dino_images[r] for r in refs],
        clip_target=None if target is None else clip_images[target.resolve()],
        dino_target=None if target is None else dino_images[target.resolve()],
    )
    row: dict[str, Any] = {
        "job_id": im.job_id,
        "group": im.group,
        "prompt_id": im.prompt_id,
        "seed": im.seed,
        "path": im.name,
        "prompt": im.prompt,
        "references": len(im.references),
        "clip_i": scores["clip_i"],
        "clip_t": scores["clip_t"],
        "dino_i": scores["dino_i"],
    }
    if with_targets:
        row["target"] = None if target is None else str(target)
        row["clip_i_target"] = scores["clip_i_target"]
        row["dino_i_target"] = scores["dino_i_target"]
    return row


def _metrics_record(
    rows: list[dict[str, Any]],
    *,
    clip_spec: str,
    dino_spec: str,
    targets: Path | None,
    device: str,
    counts: dict[str, int],
) -> dict[str, Any]:
    """The content of ``metrics.json``: the run's settings and the summaries of ``rows``."""
    return {
        "schema": METRICS_SCHEMA,
        "easyref_cli": __version__,
        "models": {"clip": clip_spec, "dino": dino_spec},
        "targets": None if targets is None else str(targets),
        "device": device,
        "counts": counts,
        **summarize(rows, with_targets=targets is not None),
    }


def _write_results(out_dir: Path, rows: list[dict[str, Any]], metrics: dict[str, Any]) -> EvalResult:
    """Write ``OUT/eval/per_image.jsonl`` and ``OUT/eval/metrics.json``."""
    eval_dir = out_dir / EVAL_DIRNAME
    per_image_path = eval_dir / PER_IMAGE_NAME
    metrics_path = eval_dir / METRICS_NAME
    write_text_atomic(per_image_path, _jsonl(rows))
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return EvalResult(rows=rows, metrics=metrics, per_image_path=per_image_path, metrics_path=metrics_path)


def evaluate(
    out_dir: Path,
    *,
    clip_model: str | None = None,
    dino_model: str | None = None,
    targets: Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score every finished image of ``out_dir``; write ``OUT/eval/per_image.jsonl`` and ``metrics.json``.

    Raises:
        UsageError: no manifest, nothing finished, bad ``--targets``/``--device``/``--batch-size``.
        InputError: a PNG without record, a missing reference image.
        ModelError: a model that is not cached/not found/not loadable (with what to pass instead).
    """
    out_dir = Path(out_dir)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {batch_size}")
    clip_spec = clip_model or DEFAULT_CLIP_MODEL
    dino_spec = dino_model or DEFAULT_DINO_MODEL

    # 1. What to score (all checks before any model loads)
    folder = collect_images(out_dir)
    require_images(folder)
    images = folder.images
    _check_references(images)
    target_of = _find_targets(images, Path(targets)) if targets is not None else {}
    device = resolve_device(device)
    clip_source, dino_source = find_clip(clip_spec), find_dino(dino_spec)

    # 2. Every distinct image once; prompts once
    all_images = distinct(
        [im.path for im in images] + [r for im in images for r in im.references] + list(target_of.values())
    )
    prompts = [im.prompt for im in images]
    logger.info(
        "scoring %d image(s): %d distinct image file(s), %d prompt(s)", len(images), len(all_images), len(set(prompts))
    )

    # 3. CLIP image and text embeddings, then (4.) DINO CLS embeddings
    embeddings = _embed_all(
        clip_source, dino_source, device, all_images, prompts, batch_size=batch_size, progress=progress
    )

    # 5. Per-image scores
    with_targets = targets is not None
    rows = [_score_row(im, embeddings, target_of.get(im.job_id), with_targets=with_targets) for im in images]

    # 6. Summaries and files
    metrics = _metrics_record(
        rows, clip_spec=clip_spec, dino_spec=dino_spec, targets=targets, device=device, counts=folder.counts()
    )
    return _write_results(out_dir, rows, metrics)


def read_metrics(out_dir: Path) -> dict[str, Any] | None:
    """``OUT/eval/metrics.json`` if it exists and parses (a warning otherwise), else ``None``."""
    path = Path(out_dir) / EVAL_DIRNAME / METRICS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("ignoring %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def read_per_image(out_dir: Path) -> dict[str, dict[str, Any]]:
    """``OUT/eval/per_image.jsonl`` by job id (``{}`` when absent; bad lines skipped)."""
    path = Path(out_dir) / EVAL_DIRNAME / PER_IMAGE_NAME
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("ignoring %s: %s", path, e)
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("job_id") is not None:
            out[str(row["job_id"])] = row
    return out
