"""The demo's canny ControlNet: the outline of a shape in → that shape drawn there.

The demo model takes the colour from its references and the place from the prompt, and the
references' shape in most pictures, not always (85%: docs/DEMO.md). A ControlNet supplies the
shape — the structure input the official EasyRef pairs with references. It is trained here on the
demo's synthetic drawings: the control image is ``--control-preprocess canny`` of a drawing
(:func:`easyref_cli.preprocess.canny`, the same numpy Canny a run applies), the target the drawing
recoloured to its reference group's colour (below), the caption the demo's prompt vocabulary ("a
large shape at the top left", no colour or shape word). The UNet is the demo's own, with EasyRef's
LoRA merged and its decoupled adapter active, frozen, as at generation: each drawing comes with the
reference tokens of a synthetic group (another shape, as a rule) and is drawn in that group's
colour, so the ControlNet learns to hold the control's shape against the references' pull; one in
ten gets the unconditional reference tokens (classifier-free guidance's other half) and keeps its
own colour. The ControlNet (``ControlNetModel.from_unet``) attends to the text tokens only, as at
generation.

``python -m easyref_cli.demo.controlnet WORK_DIR [--steps N] [--install]`` builds it (1,200 steps:
about 9 minutes on 2 CPU cores) and with ``--install`` copies it next to the demo weights, where
``--model demo --controlnet demo`` finds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

from easyref_cli.demo import weights_dir
from easyref_cli.demo.synthetic import IMAGE_SIZE, iter_drawings, make_group

#: where ``--install`` puts it, beside the demo's SDXL
CONTROLNET_DIRNAME = "controlnet"
EMPTY_CAPTION_RATE = 0.1
#: how often a training drawing gets the unconditional reference tokens (and keeps its own colour)
UNCOND_REFERENCE_RATE = 0.1
#: reference groups the training draws from (3 drawings each, as the examples), encoded once
REFERENCE_GROUPS = 256


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _controls(drawings) -> torch.Tensor:  # noqa: F821 - torch imported lazily
    import numpy as np
    import torch

    from easyref_cli.preprocess import canny

    array = np.stack([np.asarray(canny(d.render()), dtype=np.float32) / 255.0 for d in drawings])
    return torch.from_numpy(array).permute(0, 3, 1, 2)  # diffusers' control image: 0..1, RGB


def _load(seed: int):
    """The demo pipeline (EasyRef installed) and a fresh ControlNet from its UNet."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from easyref_cli.model import adapter as adapter_mod
    from easyref_cli.model.control import TextOnlyAttnProcessor
    from easyref_cli.model.pipeline import EasyRefPipeline

    root = weights_dir()
    pipe = EasyRefPipeline.from_pretrained(root / "sdxl", root / "qwen2vl", root / "easyref.safetensors", device="cpu")
    adapter_mod.set_scale(pipe.sdxl.unet, 1.0)  # as ``easyref generate`` runs it (``--scale`` 1)
    unet = UNet2DConditionModel.from_pretrained(root / "sdxl" / "unet")  # the UNet as used: EasyRef's LoRA merged
    unet.load_state_dict({k: v for k, v in pipe.sdxl.unet.state_dict().items() if ".processor." not in k})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96))
    controlnet.set_attn_processor(TextOnlyAttnProcessor(pipe.checkpoint.num_tokens))
    return pipe, controlnet


class ReferenceBank:
    """:data:`REFERENCE_GROUPS` synthetic groups (3 drawings sharing a colour and a shape, as the examples)
    and their reference tokens, encoded as ``easyref generate`` encodes them: each group's prefix once,
    then its tokens for each caption (the prompt, as ``--ref-text prompt`` gives it) on first use."""

    def __init__(self, pipe, seed: int):
        self.groups = [make_group(seed * 1_000_003 + 10_000 + i, 3) for i in range(REFERENCE_GROUPS)]
        self._encoder = pipe.encoder
        self._prefixes: dict = {}
        self._tokens: dict = {}
        self.uncond = self._encoder.encode_uncond().float().clone()

    def tokens(self, group: int, caption: str):
        if (group, caption) not in self._tokens:
            if group not in self._prefixes:
                self._prefixes[group] = self._encoder.encode_prefix([d.render() for d in self.groups[group]])
            tokens = self._encoder.encode_caption(self._prefixes[group], caption)
            self._tokens[group, caption] = tokens.float().clone()
        return self._tokens[group, caption]


def _with_references(controls, captions: list[str], rng: random.Random, bank):
    """Each control drawing as the target of a random reference group of ``bank``: recoloured to the
    group's colour (a shade of one of its drawings), with the group's tokens for its caption; or, at
    :data:`UNCOND_REFERENCE_RATE`, as it is with the unconditional tokens."""
    import torch

    targets, chosen = [], []
    for d, caption in zip(controls, captions, strict=True):
        if rng.random() < UNCOND_REFERENCE_RATE:
            targets.append(d)
            chosen.append(bank.uncond)
            continue
        g = rng.randrange(len(bank.groups))
        shade = rng.choice(bank.groups[g])
        targets.append(dataclasses.replace(d, colour=shade.colour, rgb=shade.rgb))
        chosen.append(bank.tokens(g, caption))
    return targets, torch.stack(chosen)


def train(work: Path, *, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 5e-4) -> dict:
    """Train the ControlNet ``steps`` steps on fresh drawings; save it to ``work/controlnet``."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from easyref_cli.demo.base import _encode_drawings, encode_text, tokenize_captions

    start = time.perf_counter()
    torch.manual_seed(seed)
    pipe, controlnet = _load(seed)
    sdxl = pipe.sdxl
    for module in (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2):
        module.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(sdxl.scheduler.config)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    bank = ReferenceBank(pipe, seed)
    rng, generator, stream = random.Random(seed), torch.Generator().manual_seed(seed), iter_drawings(seed + 7000)
    controlnet.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        controls = [next(stream) for _ in range(batch_size)]  # in their own colours, as a user's would be
        captions = ["" if rng.random() < EMPTY_CAPTION_RATE else d.caption(colour=False, shape=False) for d in controls]
        drawings, refs = _with_references(controls, captions, rng, bank)
        with torch.no_grad():
            x0 = _encode_drawings(sdxl, drawings, seed=seed + step)
            hidden, pooled = encode_text(sdxl, *tokenize_captions(sdxl, captions))
        context = torch.cat([hidden, refs], dim=1)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(batch_size, -1)}
        down, mid = controlnet(noisy, t, context, controlnet_cond=_controls(controls), added_cond_kwargs=added,
                               return_dict=False)  # fmt: skip
        prediction = sdxl.unet(noisy, t, context, added_cond_kwargs=added, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample  # fmt: skip
        velocity = scheduler.config.prediction_type == "v_prediction"  # the demo base predicts v
        loss = torch.nn.functional.mse_loss(prediction, scheduler.get_velocity(x0, noise, t) if velocity else noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            _log(f"controlnet step {step + 1}/{steps} loss {loss.item():.4f}")
    controlnet.eval()
    out = Path(work) / CONTROLNET_DIRNAME
    controlnet.save_pretrained(out, safe_serialization=True)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "final_loss": loss.item(),
              "references": {"groups": REFERENCE_GROUPS, "uncond_rate": UNCOND_REFERENCE_RATE},
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    (Path(work) / "controlnet-build.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def install(work: Path) -> Path:
    """Copy ``work/controlnet`` next to the demo weights (and its build record into build.json)."""
    target = weights_dir() / CONTROLNET_DIRNAME
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(Path(work) / CONTROLNET_DIRNAME, target)
    build = weights_dir() / "build.json"
    record = json.loads(build.read_text())
    record["controlnet"] = json.loads((Path(work) / "controlnet-build.json").read_text())
    build.write_text(json.dumps(record, indent=2) + "\n")
    return target


def _iou(a, b) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _write_eval_inputs(work: Path, count: int, seed: int) -> tuple[list, Path, Path, Path]:
    """Held-out drawings as control images, the example groups, and two prompt files (with and without control)."""
    import yaml

    from easyref_cli.demo.synthetic import write_examples

    drawings, stream = [], iter_drawings(seed)
    for _ in range(count):
        drawings.append(next(stream))
    (work / "controls").mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(drawings):
        d.render().save(work / "controls" / f"c{i:02d}.png")
    write_examples(work / "groups")
    prompts = [{"prompt": d.caption(colour=False, shape=False), "id": f"c{i:02d}"} for i, d in enumerate(drawings)]
    plain, control = work / "plain.yaml", work / "control.yaml"
    plain.write_text(yaml.safe_dump({"prompts": prompts}))
    paired = [{**p, "control": {"image": str(work / "controls" / f"{p['id']}.png")}} for p in prompts]
    control.write_text(yaml.safe_dump({"prompts": paired}))
    return drawings, work / "groups", plain, control


def evaluate(work: Path, *, count: int = 24, seed: int = 424242) -> dict:
    """The installed demo ControlNet on ``count`` held-out drawings × the 4 example groups, through the real
    ``easyref generate --model demo``, with and without ``--controlnet demo --control-preprocess canny``:
    how much of each picture's coloured shape lies where the control's shape is (IoU of the saturated
    pixels), whether its shape is the control's (:func:`~easyref_cli.demo.synthetic.classify_shape`) and its
    colour the references' (:func:`~easyref_cli.demo.synthetic.dominant_colour`)."""
    from PIL import Image
    from typer.testing import CliRunner

    from easyref_cli.cli import app
    from easyref_cli.demo.synthetic import EXAMPLE_GROUPS, classify_shape, dominant_colour, saturated

    work = Path(work)
    drawings, groups, plain, control = _write_eval_inputs(work, count, seed)
    runs = {"without ControlNet": (plain, []), "with ControlNet": (control, ["--controlnet", "demo",
            "--control-preprocess", "canny"])}  # fmt: skip
    out: dict = {"drawings": count, "groups": len(EXAMPLE_GROUPS), "seed": seed}
    for name, (prompts, extra) in runs.items():
        folder = work / name.replace(" ", "-")
        result = CliRunner().invoke(app, ["generate", str(groups), "--prompts", str(prompts), "--model", "demo",
                                          "-o", str(folder), "-q", "--batch-size", "8", *extra])  # fmt: skip
        if result.exit_code != 0:
            raise RuntimeError(f"easyref generate failed ({result.exit_code}): {result.output}")
        ious, colours, shapes = [], [], []
        for colour, shape, _ in EXAMPLE_GROUPS:
            for i, d in enumerate(drawings):
                image = Image.open(folder / f"{colour}-{shape}" / f"c{i:02d}_0.png")
                ious.append(_iou(saturated(image), saturated(d.render())))
                colours.append(dominant_colour(image) == colour)
                shapes.append(classify_shape(image, colour) == d.shape)
        n = len(ious)
        out[name] = {"mean_iou": round(sum(ious) / n, 3), "colour": round(sum(colours) / n, 3),
                     "shape": round(sum(shapes) / n, 3), "images": n}  # fmt: skip
    (work / "controlnet-eval.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easyref_cli.demo.controlnet", description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--steps", type=int, default=1200, help="training steps (default: 1200, as the shipped one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--evaluate", action="store_true", help="only measure the installed demo ControlNet")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.evaluate:
        _log(json.dumps(evaluate(args.work)))
        return
    _log(json.dumps(train(args.work, steps=args.steps, seed=args.seed, batch_size=args.batch_size)))
    if args.install:
        _log(f"installed {install(args.work)}")


if __name__ == "__main__":
    main()
