"""Pre-training of the demo's tiny Qwen2-VL: it learns to describe the synthetic pictures.

The real EasyRef starts from Qwen2-VL-2B, which already sees shapes and colours. The demo's tiny
Qwen2-VL starts random, and the EasyRef stages alone (a diffusion loss far downstream) taught it
colour but not shape (docs/DEMO.md). So the build first trains the whole tiny Qwen2-VL as Qwen2-VL
itself was trained, as a captioner: one picture in the chat template, its caption ("a large red
circle at the top left", or the short "a red circle") as the assistant's answer, next-token
cross-entropy on the answer. It runs through the product's own image preprocessing (DESIGN rule 2)
and with the positions EasyRef gives the MLLM (sequential in all three M-RoPE sections, rule 4), so
what it learns is what ``easyref train`` and ``easyref generate`` see.

:func:`reading_accuracy` checks the result: how often the caption it scores highest names the
picture's colour, shape, position and size.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from easyref_cli.demo.state import load_state, optimizer_step, replace_folder, save_state
from easyref_cli.demo.synthetic import COLOURS, POSITIONS, SHAPES, SIZES, Drawing, iter_drawings

#: The user's turn after the picture.
INSTRUCTION = "Describe the picture."

#: The alternatives :func:`reading_accuracy` scores for each attribute.
CHOICES = {"colour": tuple(COLOURS), "shape": SHAPES, "cell": tuple(POSITIONS), "size": tuple(SIZES)}


def answer(drawing: Drawing, short: bool) -> str:
    """What the model learns to say about ``drawing``: its full caption, or only its colour and shape."""
    return f"a {drawing.colour} {drawing.shape}" if short else drawing.caption()


@dataclass(frozen=True)
class MllmRun:
    """What a Qwen2-VL pre-training run is; a saved state resumes only the same run."""

    steps: int
    seed: int
    batch_size: int
    lr: float
    short_answers: float


class Captioner:
    """The tiny Qwen2-VL of a folder with its tokenizer and the product's image preprocessing."""

    def __init__(self, path: Path):
        import torch

        from easyref_cli.constants import COND_IMAGE_SIZE
        from easyref_cli.model.encoder import _load_image_processor, _load_qwen2vl, _load_tokenizer

        self.path = Path(path)
        self.model = _load_qwen2vl(self.path, torch.float32)
        self.tokenizer = _load_tokenizer(self.path)
        self.processor = _load_image_processor(self.path, COND_IMAGE_SIZE)
        self.end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def images(self, drawings: Sequence[Drawing]):
        """``pixel_values``, ``image_grid_thw`` and the image-token count of each picture (rule 2)."""
        from easyref_cli.model.encoder import pre_resize

        out = self.processor(images=[pre_resize(d.render()) for d in drawings], return_tensors="pt")
        merge = self.processor.merge_size
        counts = [int(t * h * w) // (merge * merge) for t, h, w in out["image_grid_thw"].tolist()]
        return out["pixel_values"], out["image_grid_thw"], counts

    def batch(self, counts: Sequence[int], answers: Sequence[str]):
        """Token ids (right-padded) and labels: -100 on the prompt and the padding, the ids of the answer
        and ``<|im_end|>`` after it."""
        import torch

        from easyref_cli.model.encoder import build_prompt

        rows = []
        for count, text in zip(counts, answers, strict=True):
            prompt = self.tokenizer(build_prompt([count], "", INSTRUCTION), add_special_tokens=False)["input_ids"]
            said = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end]
            rows.append((prompt + said, [-100] * len(prompt) + said))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.end)
        labels = torch.full((len(rows), width), -100)
        for i, (row, label) in enumerate(rows):
            ids[i, : len(row)], labels[i, : len(label)] = torch.tensor(row), torch.tensor(label)
        return ids, labels

    def token_losses(self, ids, labels, pixel_values, grid):
        """Cross-entropy of each answer token ``(batch, length - 1)``, 0 where the label is -100."""
        import torch

        from easyref_cli.model.encoder import sequential_positions

        positions = sequential_positions(0, ids.shape[1], ids.shape[0], ids.device)
        logits = self.model(
            input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, position_ids=positions
        ).logits
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
        )
        return losses.view(targets.shape)


def pretrain_qwen2vl(
    path: Path,
    steps: int,
    *,
    seed: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    short_answers: float = 0.5,
    state: Path | None = None,
    save_every: int = 250,
    log: Callable = print,
) -> dict:
    """Train the tiny Qwen2-VL in ``path`` (all of it) to describe pictures of the domain, ``steps`` batches
    of fresh pictures, a ``short_answers`` share of them answered by colour and shape alone; saves it back
    into ``path`` (the folder is swapped in when complete). With ``state``, the run saves its whole state
    there every ``save_every`` steps and continues from an earlier save of the same run exactly."""
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup

    run = MllmRun(steps, seed, batch_size, lr, short_answers)
    captioner = Captioner(path)
    model = captioner.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, steps // 10), steps)
    rng, generator = random.Random(f"easyref-demo-qwen2vl-{seed}"), torch.Generator().manual_seed(seed)
    start, last_loss = load_state(state, run, (model,), optimizer, schedule, rng, generator, what="Qwen2-VL run")
    if start:
        log(f"qwen2vl: resuming at step {start} from {state}")
    for step in range(start, steps):
        # the pictures come from the step's own seed (a resumed run draws the same ones)
        stream = iter_drawings(seed * 1_000_003 + 7919 * step + 5)
        drawings = [next(stream) for _ in range(batch_size)]
        pixel_values, grid, counts = captioner.images(drawings)
        ids, labels = captioner.batch(counts, [answer(d, rng.random() < short_answers) for d in drawings])
        losses = captioner.token_losses(ids, labels, pixel_values, grid)
        loss = losses.sum() / (labels[:, 1:] != -100).sum()
        optimizer_step(loss, list(model.parameters()), optimizer, schedule)
        last_loss = loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"qwen2vl step {step + 1}/{steps} loss {last_loss:.4f}")
        if state is not None and ((step + 1) % save_every == 0 or step == steps - 1):
            save_state(state, run, step + 1, (model,), optimizer, schedule, rng, generator, last_loss)
    model.eval().requires_grad_(False)
    _save_into(captioner, path)
    return {"final_loss": last_loss, "resumed_at": start} | dataclasses.asdict(run)


def _save_into(captioner: Captioner, path: Path) -> None:
    """The trained weights into ``path`` with the folder's other files, swapped in whole."""

    def write(partial: Path) -> None:
        shutil.copytree(path, partial, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        captioner.model.save_pretrained(partial, safe_serialization=True)

    replace_folder(path, write)


def reading_accuracy(path: Path, *, pictures: int = 48, seed: int = 99) -> dict:
    """How often the Qwen2-VL in ``path`` gives the highest likelihood to the full caption naming the
    picture's own colour, shape, grid cell and size, against the same caption with another one (each
    attribute varied alone, over ``pictures`` held-out pictures): ``{"colour": 1.0, "shape": 0.92, ...}``."""
    import torch

    captioner = Captioner(path)
    stream = iter_drawings(seed)
    hits: dict[str, int] = dict.fromkeys(CHOICES, 0)
    with torch.no_grad():
        for _ in range(pictures):
            drawing = next(stream)
            pixel_values, grid, counts = captioner.images([drawing])
            variants = [(name, value) for name, values in CHOICES.items() for value in values]
            answers = [dataclasses.replace(drawing, **{name: value}).caption() for name, value in variants]
            ids, labels = captioner.batch(counts * len(answers), answers)
            n = len(answers)
            losses = captioner.token_losses(ids, labels, pixel_values.repeat(n, 1), grid.repeat(n, 1)).sum(dim=1)
            for name in CHOICES:
                rows = [i for i, (which, _) in enumerate(variants) if which == name]
                best = variants[min(rows, key=lambda i: losses[i].item())][1]
                hits[name] += best == getattr(drawing, name)
    return {("position" if name == "cell" else name): round(k / pictures, 3) for name, k in hits.items()}
