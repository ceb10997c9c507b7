"""Train the demo model from nothing: ``python -m easyref_cli.demo.build WORK_DIR [--install]``.

The recipe (every step seeded; the defaults took 151 minutes on two CPU cores, see docs/DEMO.md):

1. **Base models.** A tiny SDXL-layout pipeline (UNet, VAE, two CLIP text encoders, Euler
   scheduler) and a tiny random Qwen2-VL, saved with ``save_pretrained``.
2. **VAE** fitted on synthetic images (64² pixels → 4×16² latents; its ``scaling_factor`` is set
   so the latents have unit variance, as SDXL's).
3. **Base UNet**: text-to-image pre-training of the UNet and both tiny CLIP text encoders on
   synthetic captions ("a large red circle at the top left"), with colour and/or shape words
   dropped from some captions so the UNet also draws a shape of *some* colour for "a large shape
   at the top left"; v-prediction on a zero-terminal-SNR schedule (see ``build_base_pipeline``).
   Two training-only additions make it draw what the caption names (``BaseLoss``): heads that must
   read the caption's cell, size, colour and shape off the pooled text embedding (the position),
   and a heavier loss on and around the drawn shape (the shape).
   Two checks record what the base model then does with a caption: how often it draws the colour,
   shape, position and size the caption names (``from_text_accuracy``), and how much each of those
   words moves its loss (``caption_sensitivity``).
   A second run (``unet_place``, :data:`PLACE_RUN`) trains them on with the pooled text embedding
   computed from the caption without its colour and shape words, as the EasyRef prompts are: the UNet
   then reads colour and shape through cross-attention, where the references arrive; its check draws
   from text that way.
4. **Qwen2-VL**: the tiny Qwen2-VL pre-trained as a captioner of the pictures ("a large red circle at
   the top left"), as the real EasyRef starts from a Qwen2-VL that sees shapes and colours
   (:mod:`easyref_cli.demo.mllm`); a check records how often it reads each attribute.
5. **EasyRef**: the real ``easyref train`` stages (``align`` → ``single`` → ``multi``, then ``multi`` once
   more with the rate decayed to zero: ``anneal``, :data:`STAGE_RUNS`) on synthetic
   groups whose captions name no colour and no shape: the colour and the shape can only come from
   the references.
6. ``--install`` copies the result (``sdxl/``, ``qwen2vl/``, ``easyref.safetensors``,
   ``build.json``) into ``easyref_cli/demo/weights``, where ``--model demo`` finds it.

``build.json`` records the settings, the wall time of each step and the machine.

A build folder continues where it stopped: running the same command again (``kill`` or Ctrl-C
first, if need be) keeps finished steps, resumes the base UNet and the Qwen2-VL from their last
saved states (``base-state.pt``, ``base-place-state.pt``, ``qwen2vl-state.pt``, every 250 steps,
exactly as if they had not stopped) and a stage from its last checkpoint (``easyref train
--resume``); ``--steps multi=2400`` trains a finished stage further. The time of every run,
interrupted ones included, adds up in ``build.json`` (``seconds``; ``runs`` lists each).
``--base-from BUILD`` starts from a previous build's VAE, text encoders and Qwen2-VL with a new UNet.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from easyref_cli.demo import weights_dir
from easyref_cli.demo.evidence import PROMPTS as EVIDENCE_PROMPTS
from easyref_cli.demo.evidence import asked_placement
from easyref_cli.demo.state import load_state, optimizer_step, replace_folder, save_state
from easyref_cli.demo.synthetic import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Drawing,
    dominant_colour,
    iter_drawings,
    make_group,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

#: Where ``--install`` puts the trained model (and where ``--model demo`` looks for it).
WEIGHTS_DIR = weights_dir()

#: Default step counts (``--quick`` divides them by 20 for a smoke run of the recipe).
STEPS = {
    "vae": 1600,
    "unet": 3000,
    "unet_place": 1000,
    "mllm": 2500,
    "mllm_more": 1500,
    "align": 600,
    "single": 500,
    "multi": 1600,
    "anneal": 2400,
}
LORA_RANK = 8
#: The stages' ``easyref train --mask-weight``: 0, the plain loss, as the shipped weights (4, the loss
#: weighted 1 + 4 on and around the drawn shape, changed nothing measurable on the base before ``unet_place``:
#: docs/DEMO.md).
STAGE_MASK_WEIGHT = 0.0


def _log(message: str) -> None:
    print(f"[demo-build {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. base models
# ---------------------------------------------------------------------------------------------


def _demo_unet() -> UNet2DConditionModel:
    """The demo's SDXL-layout UNet (16² latents down to 4², cross-attention dim 64; 2.8 M parameters);
    random weights from the global torch RNG. The time-and-text embedding scales and shifts each
    ResNet block's normalised features (``scale_shift``) rather than being added before the norm,
    where 8 groups of a few channels mostly erased it. (The variants that did not learn the prompt's
    position are in docs/DEMO.md.)"""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 · 8 + the pooled text projection (32)
        cross_attention_dim=64,  # both text encoders' hidden states (32 + 32), concatenated
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
    )


def _demo_vae() -> AutoencoderKL:
    """The demo's three-level VAE (64² pixels → 4×16² latents); random weights from the global
    torch RNG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),  # three levels: 64² pixels → 16² latents (scale factor 4)
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def _demo_text_config(tokenizer, pad_token_id: int) -> CLIPTextConfig:
    """A 3-layer CLIP text config of width 32 over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=len(tokenizer),
        projection_dim=32,
        max_position_embeddings=77,
    )


def _demo_scheduler() -> EulerDiscreteScheduler:
    """SDXL's betas, rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et
    al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").

    On 16² latents of one flat shape, SDXL's own schedule leaves so much of the picture's colour in
    the noisiest training inputs that the model learns to read the colour from the starting noise
    instead of from its conditioning: in sampling, the seed then picks the colour (see docs/DEMO.md).
    """
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def build_base_pipeline(path: Path, seed: int = 0):
    """The untrained demo SDXL pipeline (returned, and saved at ``path``)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from easyref_cli.tiny import build_clip_tokenizer

    # The UNet then the VAE draw from one seeded stream, both text encoders from a second one.
    torch.manual_seed(seed)
    unet = _demo_unet()
    vae = _demo_vae()
    tokenizer = build_clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_demo_text_config(tokenizer, tokenizer.pad_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(_demo_text_config(tokenizer, tokenizer_2.pad_token_id))
    scheduler = _demo_scheduler()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        # CFG's empty negative prompt is encoded "" (what the empty captions below and the
        # trainer's text drop teach), not SDXL's zeroed embeddings, which this model never sees
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def _pixels(drawings: list[Drawing]):
    import numpy as np
    import torch

    array = np.stack([np.asarray(d.render(), dtype=np.float32) for d in drawings])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# 2. VAE
# ---------------------------------------------------------------------------------------------


def fit_vae(vae, steps: int, *, seed: int, batch_size: int = 16, lr: float = 2e-3, log: Callable = _log) -> dict:
    """Reconstruction training on an endless stream of synthetic images; sets ``scaling_factor``."""
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    stream = iter_drawings(seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    loss = torch.tensor(0.0)
    for step in range(steps):
        x = _pixels([next(stream) for _ in range(batch_size)])
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(y, x) + 1e-6 * kl
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = _pixels([next(stream) for _ in range(256)])
        latents = vae.encode(x).latent_dist.sample()
        mse = torch.nn.functional.mse_loss(vae.decode(latents).sample.clamp(-1, 1), x).item()
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return {"final_loss": loss.item(), "held_out_mse": mse, "scaling_factor": scaling}


# ---------------------------------------------------------------------------------------------
# 3. base UNet
# ---------------------------------------------------------------------------------------------

#: (keep colour word, keep shape word) and how often base pre-training uses each caption form.
CAPTION_FORMS = (((True, True), 0.35), ((False, True), 0.15), ((True, False), 0.15), ((False, False), 0.25))
EMPTY_CAPTION_RATE = 0.10


def tokenize_captions(pipe, captions: list[str]):
    """Both CLIP tokenizers' ids for every caption, padded to 77 as the SDXL pipeline pads them."""
    return tuple(
        tok(
            captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tok in (pipe.tokenizer, pipe.tokenizer_2)
    )


def pooled_text(pipe, ids_2):
    """The pooled projection of the second text encoder alone (what SDXL adds to the time embedding)."""
    return pipe.text_encoder_2(ids_2)[0]


def encode_text(pipe, ids_1, ids_2):
    """SDXL text conditioning (penultimate hidden states of both encoders, pooled projection of the
    second), exactly as ``StableDiffusionXLPipeline.encode_prompt`` builds it."""
    import torch

    out_1 = pipe.text_encoder(ids_1, output_hidden_states=True)
    out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2[0]


@dataclass(frozen=True)
class CaptionTable:
    """Every caption form of every drawing (and ``""``), sorted, with both tokenizers' ids."""

    captions: list[str]
    index: dict[str, int]
    ids_1: torch.Tensor
    ids_2: torch.Tensor


def _encode_drawings(pipe, drawings: list[Drawing], *, seed: int) -> torch.Tensor:
    """Scaled VAE latents of ``drawings``, sampled 256 at a time from one seeded generator."""
    import torch

    images = len(drawings)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        latents = (
            torch.cat(
                [
                    pipe.vae.encode(_pixels(drawings[i : i + 256])).latent_dist.sample(generator)
                    for i in range(0, images, 256)
                ]
            )
            * pipe.vae.config.scaling_factor
        )
    return latents


def _caption_table(pipe, drawings: list[Drawing]) -> CaptionTable:
    """Every caption form of every drawing, tokenized once."""
    forms = [form for form, _ in CAPTION_FORMS]
    captions = sorted({d.caption(colour=c, shape=s) for d in drawings for c, s in forms} | {""})
    index = {caption: i for i, caption in enumerate(captions)}
    ids_1, ids_2 = tokenize_captions(pipe, captions)
    return CaptionTable(captions=captions, index=index, ids_1=ids_1, ids_2=ids_2)


def _pick_captions(rng: random.Random, picks: list[int], drawings: list[Drawing], index: dict[str, int]) -> list[int]:
    """A caption (row of the :class:`CaptionTable`) per picked drawing: empty at
    ``EMPTY_CAPTION_RATE``, else one of the ``CAPTION_FORMS`` at its weight."""
    forms = [form for form, _ in CAPTION_FORMS]
    weights = [w for _, w in CAPTION_FORMS]
    caption_ids = []
    for i in picks:
        if rng.random() < EMPTY_CAPTION_RATE:
            caption_ids.append(index[""])
        else:
            colour, shape = rng.choices(forms, weights)[0]
            caption_ids.append(index[drawings[i].caption(colour=colour, shape=shape)])
    return caption_ids


def _placement_captions(caption_ids: list[int], picks: list[int], drawings: list[Drawing], table) -> list[int]:
    """The row of the stages' caption (:func:`caption`: no colour or shape word) for each picked caption
    (``""`` stays ``""``)."""
    empty = table.index[""]
    return [empty if c == empty else table.index[caption(drawings[i])] for c, i in zip(caption_ids, picks, strict=True)]


def _conditioning(pipe, table: CaptionTable, caption_ids: list[int], picks: list[int], drawings, pooled_from: str):
    """The UNet's text conditioning for the picked captions: hidden states, pooled embedding (of the
    placement alone with ``pooled_from="placement"``), and the rows of the captions it was pooled from."""
    hidden, pooled = encode_text(pipe, table.ids_1[caption_ids], table.ids_2[caption_ids])
    if pooled_from == "placement":
        caption_ids = _placement_captions(caption_ids, picks, drawings, table)
        pooled = pooled_text(pipe, table.ids_2[caption_ids])
    return hidden, pooled, caption_ids


def _unet_loss(pipe, scheduler, x0, hidden, pooled, time_ids, generator, weights=None) -> torch.Tensor:
    """The diffusion loss of one batch: seeded noise and timesteps, then the UNet's prediction
    against the noise (or the velocity, for v-prediction); the squared error weighted per latent
    pixel by ``weights`` (normalised to their mean) when given."""
    import torch

    batch_size = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    prediction = pipe.unet(
        scheduler.add_noise(x0, noise, t),
        t,
        hidden,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(batch_size, -1)},
    ).sample
    target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    if weights is None:
        return torch.nn.functional.mse_loss(prediction, target)
    return (weights * (prediction - target) ** 2).mean() / weights.mean()


def _shape_weights(drawings: list[Drawing], weight: float) -> torch.Tensor:
    """Per latent pixel loss weights for ``drawings``: 1, plus ``weight`` times the share of the pixel
    the shape covers, spread one latent pixel outwards (max-pooled) so its outline counts in full.

    Where two shapes differ is a thin outline; with most of a picture background, the plain loss
    hardly cares which shape is drawn (docs/DEMO.md)."""
    import numpy as np
    import torch

    masks = torch.from_numpy(np.stack([np.asarray(d.mask(), dtype=np.float32) / 255 for d in drawings]))[:, None]
    covered = torch.nn.functional.avg_pool2d(masks, 4)  # the VAE's scale factor: 64² pixels → 16² latents
    return 1 + weight * torch.nn.functional.max_pool2d(covered, 3, stride=1, padding=1)


#: What :func:`_attribute_loss` reads off a caption's pooled embedding: attribute → its values.
ATTRIBUTES = {"cell": list(POSITIONS), "size": list(SIZES), "colour": list(COLOURS), "shape": list(SHAPES)}

#: The base UNet's training state, saved as it trains (an interrupted run resumes from it).
BASE_STATE = "base-state.pt"
MLLM_STATE = "qwen2vl-state.pt"
#: Step 4's two Qwen2-VL runs: (name, learning rate, seed offset). The second, a fresh cosine run at half
#: the rate, raised the shape it names from 71% to 100% (docs/DEMO.md).
MLLM_RUNS = (("mllm", 2e-3, 0), ("mllm_more", 1e-3, 1))


@dataclass(frozen=True)
class BaseRun:
    """What a base pre-training run is; a saved state resumes only the same run."""

    steps: int
    seed: int
    images: int
    batch_size: int
    lr: float
    attribute_loss: float = 0.0
    shape_weight: float = 0.0
    pooled_from: str = "caption"

    def __post_init__(self):
        if self.pooled_from not in ("caption", "placement"):
            raise ValueError(f"pooled_from must be 'caption' or 'placement', not {self.pooled_from!r}")


def _attribute_heads(width: int, seed: int):
    """Linear heads, one per attribute a caption can name (:data:`ATTRIBUTES`), over the pooled caption
    embedding; seeded, training-only (never saved with the model)."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.ModuleDict({name: torch.nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()})


def _attribute_loss(heads, pooled, drawings: list[Drawing], captions: list[str]):
    """Cross-entropy of each head against the attribute of the drawing, for the captions that name it
    (the grid cell and the size are in every non-empty caption; colour and shape words may be dropped);
    zero without heads."""
    import torch

    total = pooled.new_zeros(())
    if heads is None:
        return total
    for name, values in ATTRIBUTES.items():
        targets = [
            values.index(getattr(d, name))
            if c and (name in ("cell", "size") or getattr(d, name) in c.split())
            else -100
            for d, c in zip(drawings, captions, strict=True)
        ]
        if any(t >= 0 for t in targets):
            total = total + torch.nn.functional.cross_entropy(
                heads[name](pooled), torch.tensor(targets), ignore_index=-100
            )
    return total


def _base_data(pipe, images: int, seed: int, log: Callable) -> tuple[list[Drawing], torch.Tensor, CaptionTable]:
    """Base pre-training's pictures (seeded), their VAE latents and every caption form, tokenized."""
    stream = iter_drawings(seed + 1000)
    drawings = [next(stream) for _ in range(images)]
    latents = _encode_drawings(pipe, drawings, seed=seed)
    table = _caption_table(pipe, drawings)
    log(f"unet: {images} images, {len(table.captions)} captions")
    return drawings, latents, table


def train_base_unet(
    pipe,
    steps: int,
    *,
    seed: int,
    images: int = 8000,
    batch_size: int = 32,
    lr: float = 1e-3,
    log: Callable = _log,
    state: Path | None = None,
    save_every: int = 250,
    attribute_loss: float = 0.0,
    shape_weight: float = 0.0,
    pooled_from: str = "caption",
) -> dict:
    """Text-to-image pre-training of ``pipe.unet`` together with both text encoders (the DDPM
    noise schedule and prediction type of the pipeline's scheduler config). Training the tiny CLIP
    encoders too is where the demo's base differs from SDXL, whose encoders came pre-trained:
    random text features are too weak a signal.

    With ``state`` (a file), the run saves its whole state there every ``save_every`` steps and, when
    the file holds an earlier save of the same run, continues from it exactly.

    ``attribute_loss`` > 0 adds, at that weight, linear heads that must read the caption's grid cell,
    size, colour and shape off the pooled text embedding (:func:`_attribute_loss`): it makes the text
    encoders carry the position, which the UNet then learns to use (docs/DEMO.md). ``shape_weight`` > 0
    weights the diffusion loss on and around the drawn shape (:func:`_shape_weights`).

    ``pooled_from="placement"`` computes the pooled embedding the UNet gets from the caption without its
    colour and shape words ("a large shape at the top left"), as the EasyRef stages' prompts are: the
    UNet then has to read colour and shape through cross-attention, the path the references take
    (the attribute heads then read only the cell and the size; docs/DEMO.md, "The reference path")."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    run = BaseRun(steps, seed, images, batch_size, lr, attribute_loss, shape_weight, pooled_from)
    rng = random.Random(f"easyref-demo-unet-{seed}")
    drawings, latents, table = _base_data(pipe, images, seed, log)
    weights = _shape_weights(drawings, shape_weight) if shape_weight else None

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    heads = _attribute_heads(pipe.text_encoder_2.config.projection_dim, seed + 2) if attribute_loss else None
    modules = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) + ((heads,) if heads is not None else ())
    params = [p for m in modules for p in m.parameters()]
    for module in modules:
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(200, steps // 10), steps)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    start, last_loss = load_state(state, run, modules, optimizer, schedule, rng, generator, what="base run")
    if start:
        log(f"unet: resuming at step {start} from {state}")
    for step in range(start, steps):
        picks = [rng.randrange(images) for _ in range(batch_size)]
        caption_ids = _pick_captions(rng, picks, drawings, table.index)
        hidden, pooled, caption_ids = _conditioning(pipe, table, caption_ids, picks, drawings, pooled_from)
        batch_weights = weights[picks] if weights is not None else None
        loss = _unet_loss(pipe, scheduler, latents[picks], hidden, pooled, time_ids, generator, batch_weights)
        captions = [table.captions[i] for i in caption_ids]
        aux = _attribute_loss(heads, pooled, [drawings[i] for i in picks], captions)
        optimizer_step(loss + attribute_loss * aux, params, optimizer, schedule)
        last_loss = loss.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps} loss {last_loss:.4f}")
        if state is not None and ((step + 1) % save_every == 0 or step == steps - 1):
            save_state(state, run, step + 1, modules, optimizer, schedule, rng, generator, last_loss)
    for module in modules:
        module.eval().requires_grad_(False)
    extra = {"attribute_loss": attribute_loss} if attribute_loss else {}
    extra |= {"shape_weight": shape_weight} if shape_weight else {}
    extra |= {"pooled_from": pooled_from} if pooled_from != "caption" else {}
    return {"final_loss": last_loss, "images": images, "captions": len(table.captions), "resumed_at": start} | extra


def caption_sensitivity(
    pipe, *, images: int = 64, timesteps: tuple[int, ...] = (950, 750, 500), seed: int = 99
) -> dict:
    """How much the base UNet uses each word of a full caption: the relative rise of its training loss on
    ``images`` held-out drawings when the caption names another colour, shape, grid cell (the opposite
    corner; the centre becomes the top left) or size, at each of ``timesteps`` (same noise for every
    variant). ``{"750": {"colour": 1.482, "shape": 0.108, "position": 0.0, "size": 0.644}, ...}``: a word
    the model ignores leaves the loss where it was."""
    import torch
    from diffusers import DDPMScheduler

    stream = iter_drawings(seed)
    drawings = [next(stream) for _ in range(images)]
    colours = list(COLOURS)
    variants = {
        "none": lambda d: d,
        "colour": lambda d: dataclasses.replace(d, colour=colours[(colours.index(d.colour) + 3) % len(colours)]),
        "shape": lambda d: dataclasses.replace(d, shape=SHAPES[(SHAPES.index(d.shape) + 2) % len(SHAPES)]),
        "position": lambda d: dataclasses.replace(
            d, cell=(2 - d.cell[0], 2 - d.cell[1]) if d.cell != (1, 1) else (0, 0)
        ),
        "size": lambda d: dataclasses.replace(d, size="small" if d.size == "large" else "large"),
    }
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = _encode_drawings(pipe, drawings, seed=seed)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    result = {}
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
            steps = torch.full((images,), t)
            noisy, target = scheduler.add_noise(latents, noise, steps), scheduler.get_velocity(latents, noise, steps)
            losses = {}
            for name, vary in variants.items():
                hidden, pooled = encode_text(pipe, *tokenize_captions(pipe, [vary(d).caption() for d in drawings]))
                added = {"text_embeds": pooled, "time_ids": time_ids.expand(images, -1)}
                prediction = pipe.unet(noisy, steps, hidden, added_cond_kwargs=added).sample
                losses[name] = torch.nn.functional.mse_loss(prediction, target).item()
            result[str(t)] = {k: round(v / losses["none"] - 1, 3) for k, v in losses.items() if k != "none"}
    return result


#: The placements :func:`from_text_accuracy` asks for, (words, grid cell, size): those of the first four
#: evidence prompts (the centre and three corners, large and small).
CHECK_PLACES = tuple(
    (POSITIONS[cell], cell, size) for cell, size in (asked_placement(text) for _, text in EVIDENCE_PROMPTS[:4])
)


def _prompt_embeds(pipe, prompts: list[str], pooled_prompts: list[str]) -> dict:
    """The pipeline's conditioning (with the empty negative prompt) for ``prompts``, the pooled part
    taken from ``pooled_prompts`` instead."""
    full, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, device="cpu", negative_prompt=[""] * len(prompts)
    )
    if pooled_prompts != prompts:
        pooled = pipe.encode_prompt(prompt=pooled_prompts, device="cpu", do_classifier_free_guidance=False)[2]
    return {"prompt_embeds": full, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled}  # fmt: skip


def from_text_accuracy(
    pipe, *, seeds: int = 2, steps: int = 25, guidance: float = 5.0, pooled_from: str = "caption"
) -> dict:
    """How often the base model draws what a full caption names ("a small green triangle at the top
    left"): every colour × shape at two of :data:`CHECK_PLACES`, ``seeds`` starting noises each, judged
    by the classifiers of :mod:`~easyref_cli.demo.synthetic`. The ceiling for what the references can
    steer later, since the adapters reuse the UNet's drawing. ``pooled_from="placement"`` gives the UNet
    the pooled embedding of the caption without colour and shape ("a small shape at the top left"), as
    :func:`train_base_unet` trained it: colour and shape must then come through cross-attention."""
    import itertools

    import torch

    from easyref_cli.demo.synthetic import classify_placement, classify_shape

    asked = [
        (colour, shape, CHECK_PLACES[(i + k) % len(CHECK_PLACES)], seed)
        for i, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES))
        for k in range(2)
        for seed in range(seeds)
    ]
    prompts = [f"a {size} {colour} {shape} {where}" for colour, shape, (where, _, size), _ in asked]
    placements = [f"a {size} shape {where}" for _, _, (where, _, size), _ in asked]
    pooled = prompts if pooled_from == "caption" else placements
    images = []
    with torch.no_grad():
        for i in range(0, len(prompts), 48):
            images += pipe(
                **_prompt_embeds(pipe, prompts[i : i + 48], pooled[i : i + 48]), num_inference_steps=steps,
                guidance_scale=guidance, height=IMAGE_SIZE, width=IMAGE_SIZE,
                generator=[torch.Generator().manual_seed(a[3]) for a in asked[i : i + 48]],
            ).images  # fmt: skip
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "position": [], "size": []}
    per: dict[str, dict[str, list[bool]]] = {"colour": {}, "shape": {}}
    for image, (colour, shape, (_, cell, size), _) in zip(images, asked, strict=True):
        placement = classify_placement(image, colour) or (None, None)
        right = {"colour": dominant_colour(image) == colour, "shape": classify_shape(image, colour) == shape,
                 "position": placement[0] == cell, "size": placement[1] == size}  # fmt: skip
        for name, ok in right.items():
            hits[name].append(ok)
        per["colour"].setdefault(colour, []).append(right["colour"])
        per["shape"].setdefault(shape, []).append(right["shape"])
    share = lambda values: round(sum(values) / len(values), 3)  # noqa: E731
    result: dict = {name: share(values) for name, values in hits.items()}
    result["per_colour"] = {k: share(v) for k, v in per["colour"].items()}
    result["per_shape"] = {k: share(v) for k, v in per["shape"].items()}
    result["prompts"] = len(prompts)
    return result


# ---------------------------------------------------------------------------------------------
# 4. EasyRef stages (the real `easyref train`)
# ---------------------------------------------------------------------------------------------


def caption(drawing: Drawing) -> str:
    """The demo's prompts say where and how large, never which colour or shape."""
    return drawing.caption(colour=False, shape=False)


def write_training_data(root: Path, *, groups: int, per_group: int, seed: int) -> dict[str, Path]:
    """Synthetic groups as PNG files plus one official-format JSON list per stage; each item also names
    its target's loss mask (:func:`loss_mask`, for ``easyref train --mask-weight``)."""
    root.mkdir(parents=True, exist_ok=True)
    align, single, multi = [], [], []
    for g in range(groups):
        drawings = make_group(seed * 1_000_003 + g, per_group)
        names, masks = [], []
        for i, d in enumerate(drawings):
            name, mask = f"g{g:04d}/{i}.png", f"g{g:04d}/{i}-mask.png"
            (root / name).parent.mkdir(exist_ok=True)
            d.render().save(root / name)
            loss_mask(d).save(root / mask)
            names.append(name)
            masks.append(mask)
        for i, d in enumerate(drawings):
            others = names[:i] + names[i + 1 :]
            text, mask = caption(d), masks[i]
            align.append({"image_file": names[i], "text": text, "mask": mask})
            single.append(
                {"image_file": [others[(g + i) % len(others)]], "text": text, "target": names[i], "mask": mask}
            )
            multi.append({"image_file": others, "text": text, "target": names[i], "mask": mask})
    files = {}
    for stage, items in (("align", align), ("single", single), ("multi", multi)):
        files[stage] = root / f"{stage}.json"
        files[stage].write_text(json.dumps(items, indent=0))
    return files


def loss_mask(drawing: Drawing):
    """The shape's pixels spread by one latent pixel (4 px) each way, so its outline, where two shapes
    differ, counts in full (as :func:`_shape_weights` does for the base)."""
    from PIL import ImageFilter

    return drawing.mask().filter(ImageFilter.MaxFilter(9))


def run_stage(
    stage: str,
    *,
    data: dict[str, Path],
    data_root: Path,
    sdxl: Path,
    mllm: Path,
    out: Path,
    steps: int,
    init: Path | None,
    seed: int,
    batch_size: int,
    learning_rate: float,
    lr_scheduler: str = "constant",
    resume: bool = False,
    mask_weight: float = 0.0,
) -> Path:
    """One ``easyref train`` stage, through the real command line (``--resume``: continue the run in
    ``out`` to ``steps``); returns its final checkpoint."""
    command = [
        sys.executable, "-m", "easyref_cli", "train", "--stage", stage,
        "--data", str(data[stage]), "--data-root", str(data_root),
        "--base-model", str(sdxl), "--mllm", str(mllm), "--output-dir", str(out),
        "--resolution", str(IMAGE_SIZE), "--max-steps", str(steps), "--save-steps", str(min(steps, 400)),
        "--batch-size", str(batch_size), "--gradient-accumulation", "1", "--resize", "crop",
        "--learning-rate", str(learning_rate), "--lr-scheduler", lr_scheduler, "--seed", str(seed),
        "--device", "cpu", "--mixed-precision", "no", "--num-workers", "0", "--quiet",
    ]  # fmt: skip
    if stage != "align":  # align trains no LoRA
        command += ["--lora-rank", str(LORA_RANK)]
    if init is not None:
        command += ["--init", str(init)]
    if resume:
        command += ["--resume"]
    if mask_weight:
        command += ["--mask-weight", str(mask_weight)]
    _log(" ".join(command[1:]))
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # easyref train finishes its step, saves and exits on one SIGINT. A Ctrl-C in the terminal
        # already reached it (a second one would stop it unsaved); a `kill` of this build did not.
        if _TERMINATED:
            process.send_signal(signal.SIGINT)
        process.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)
    return out / f"checkpoint-{steps}.safetensors"


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------


def _machine_record() -> dict:
    """The machine a build ran on (recorded in ``build.json``)."""
    import torch

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class Ledger:
    """``WORK/build.json`` as the build goes: settings, results, and the wall time of every step, summed
    over every invocation that worked on it (a resumed step adds its time; ``runs`` lists each)."""

    def __init__(self, work: Path, settings: dict):
        self.path = work / "build.json"
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        if previous and previous.get("seed") != settings["seed"]:
            raise SystemExit(f"{self.path} is a build with another seed; use another WORK folder")
        self.record: dict = {
            **previous,
            **settings,
            "seconds": previous.get("seconds", {}),
            "runs": previous.get("runs", []),
        }
        self.record["machine"] = _machine_record()

    def timed(self, name: str, fn: Callable, **details):
        """``fn()``, its wall time added to ``seconds[name]`` and listed in ``runs``."""
        import torch

        started, t0 = time.strftime("%Y-%m-%d %H:%M"), time.time()
        run = {"step": name, "started": started, "threads": torch.get_num_threads(), **details}
        try:
            return fn()
        except BaseException:  # Ctrl-C included: the time it ran still counts
            run["stopped"] = True
            raise
        finally:
            run["seconds"] = seconds = round(time.time() - t0, 1)
            self.record["seconds"][name] = round(self.record["seconds"].get(name, 0.0) + seconds, 1)
            self.record["runs"].append(run)
            _log(f"{name}: {seconds} s")
            self.save()

    def save(self) -> None:
        self.record["total_seconds"] = round(sum(self.record["seconds"].values()), 1)
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(partial, self.path)


def _start_from(base_from: Path, work: Path, ledger: Ledger, seed: int):
    """Steps 1-2 from a previous build (``--base-from``): its VAE, text encoders and Qwen2-VL copied into
    ``work``, a new UNet of this recipe's architecture (random, from ``seed``); the previous build's
    record of those parts kept under ``base_from``."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    sdxl = work / "sdxl"
    previous = base_from / "build.json"
    pipe = StableDiffusionXLPipeline.from_pretrained(base_from / "sdxl")
    torch.manual_seed(seed)
    pipe.unet = _demo_unet()
    _save_pipeline(pipe, sdxl)
    shutil.rmtree(work / "qwen2vl", ignore_errors=True)  # a copy an interrupted run left
    shutil.copytree(base_from / "qwen2vl", work / "qwen2vl")
    old = json.loads(previous.read_text()) if previous.exists() else {}
    mllm_runs = [name for name, _, _ in MLLM_RUNS]
    for name in mllm_runs:  # its Qwen2-VL is pre-trained already (step 4; a build folder or installed weights)
        if old.get(name):
            _marker(work / f"base-{name}.done", {"qwen2vl": old["steps"][name]})
    ledger.record["base_from"] = {
        "path": str(base_from),
        "kept": "VAE, both text encoders (trained further with the new UNet), Qwen2-VL (pre-trained there if "
        "its build did step 4)",
        "vae": old.get("vae"),
        "steps": {k: old.get("steps", {}).get(k) for k in ("vae", "unet", *mllm_runs)},
        "seconds": {k: old.get("seconds", {}).get(k) for k in ("base_models", "qwen2vl", "vae", "unet", *mllm_runs)},
    }
    ledger.save()


def _marker(path: Path, content: dict) -> None:
    """Record what a finished step was built with, or stop if ``path`` records something else."""
    if path.exists():
        done = json.loads(path.read_text() or "{}")
        if done != content:
            raise SystemExit(
                f"{path.parent} holds a build made with {done}, not {content}; use another WORK folder "
                f"(or remove {path.name} and what it covers to rebuild that part)"
            )
        return
    path.write_text(json.dumps(content) + "\n")


def _save_pipeline(pipe, path: Path) -> None:
    """``save_pretrained`` into a fresh folder, then swapped in: an interrupted save leaves the old one."""
    replace_folder(path, lambda partial: pipe.save_pretrained(partial, safe_serialization=True))


@dataclass(frozen=True)
class BaseLoss:
    """What base pre-training adds to the diffusion loss (:func:`train_base_unet`; docs/DEMO.md)."""

    attribute_loss: float = 0.1
    shape_weight: float = 4.0


def _build_base(
    work: Path, ledger: Ledger, steps: dict[str, int], seed: int, base_from: Path | None, base_loss: BaseLoss
) -> None:
    """Steps 1-3: base models, VAE, base UNet into ``work/sdxl`` and ``work/qwen2vl`` (resumable)."""
    from diffusers import StableDiffusionXLPipeline

    from easyref_cli.tiny import build_tiny_qwen2vl

    record = ledger.record
    sdxl, mllm = work / "sdxl", work / "qwen2vl"
    models = {
        "seed": seed,
        "base_from": str(base_from) if base_from else None,
        "vae": None if base_from else steps["vae"],
    }
    if (work / "base-models.done").exists():
        _marker(work / "base-models.done", models)
    else:
        if base_from is not None:
            _start_from(base_from, work, ledger, seed)
        else:
            pipe = ledger.timed("base_models", lambda: build_base_pipeline(sdxl, seed))
            ledger.timed("qwen2vl", lambda: build_tiny_qwen2vl(mllm, seed))
            record["vae"] = ledger.timed("vae", lambda: fit_vae(pipe.vae, steps["vae"], seed=seed))
            _save_pipeline(pipe, sdxl)
        _marker(work / "base-models.done", models)
    if (work / "base-unet.done").exists():
        _marker(work / "base-unet.done", {"unet": steps["unet"]} | dataclasses.asdict(base_loss))
        _log(f"base models of {work} are trained; reusing them")
        return
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    state = work / BASE_STATE
    record["unet"] = ledger.timed(
        "unet",
        lambda: train_base_unet(pipe, steps["unet"], seed=seed, state=state, **dataclasses.asdict(base_loss)),
        planned=steps["unet"],
    )
    record["unet"]["parameters"] = sum(p.numel() for p in pipe.unet.parameters())
    record["unet"]["block_out_channels"] = list(pipe.unet.config.block_out_channels)
    checks = ledger.timed("base_checks", lambda: {"from_text": from_text_accuracy(pipe),
                                                  "caption_sensitivity": caption_sensitivity(pipe)})  # fmt: skip
    record["unet"].update(checks)
    _log(f"base model from text: {record['unet']['from_text']}")
    _save_pipeline(pipe, sdxl)
    ledger.save()
    _marker(work / "base-unet.done", {"unet": steps["unet"]} | dataclasses.asdict(base_loss))


#: Step 3's second run: (learning rate, seed offset). It continues the base UNet with the pooled embedding
#: of the caption without colour and shape, so the UNet reads both through cross-attention (docs/DEMO.md).
PLACE_RUN = (5e-4, 1)


def _place_base(work: Path, ledger: Ledger, steps: dict[str, int], seed: int, base_loss: BaseLoss) -> None:
    """Step 3b: the base UNet (and text encoders) trained further with ``pooled_from="placement"``
    (:func:`train_base_unet`), resumable, then checked from text with that pooled embedding."""
    from diffusers import StableDiffusionXLPipeline

    done = work / "base-unet_place.done"
    marker = {"unet_place": steps["unet_place"], "lr": PLACE_RUN[0]} | dataclasses.asdict(base_loss)
    if done.exists():
        _marker(done, marker)
        return
    sdxl = work / "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    run = functools.partial(
        train_base_unet, pipe, steps["unet_place"], seed=seed + PLACE_RUN[1], lr=PLACE_RUN[0],
        state=work / "base-place-state.pt", pooled_from="placement", **dataclasses.asdict(base_loss),
    )  # fmt: skip
    record = ledger.record["unet_place"] = ledger.timed("unet_place", run, planned=steps["unet_place"])
    check = functools.partial(from_text_accuracy, pipe, pooled_from="placement")
    record["from_text"] = ledger.timed("unet_place_check", check)
    _log(f"base model from text, pooled from the placement: {record['from_text']}")
    _save_pipeline(pipe, sdxl)
    ledger.save()
    _marker(done, marker)


def _pretrain_mllm(work: Path, ledger: Ledger, steps: dict[str, int], seed: int) -> None:
    """Step 4: the tiny Qwen2-VL in ``work/qwen2vl`` pre-trained to describe the pictures
    (:mod:`easyref_cli.demo.mllm`), in the runs of :data:`MLLM_RUNS`, each resumable from its state
    file and checked after it."""
    from easyref_cli.demo.mllm import pretrain_qwen2vl, reading_accuracy

    mllm = work / "qwen2vl"
    for name, lr, offset in MLLM_RUNS:
        done, marker = work / f"base-{name}.done", {"qwen2vl": steps[name]}
        if done.exists():
            _marker(done, marker)
            continue
        state = work / (MLLM_STATE if name == "mllm" else f"qwen2vl-{name}-state.pt")
        run = functools.partial(pretrain_qwen2vl, mllm, steps[name], seed=seed + offset, lr=lr, state=state, log=_log)
        trained = ledger.timed(name, run, planned=steps[name])
        trained["reads"] = ledger.timed(f"{name}_check", functools.partial(reading_accuracy, mllm))
        _log(f"qwen2vl reads after {name}: {trained['reads']}")
        ledger.record[name] = trained
        ledger.save()
        _marker(done, marker)


def _stage_reached(out: Path) -> int:
    """The last step a stage's ``easyref train`` run in ``out`` saved (0 if none)."""
    saved = [int(p.stem.split("-")[1]) for p in out.glob("checkpoint-*.safetensors")]
    return max(saved, default=0) if (out / "state").is_dir() or (out / "state.old").is_dir() else 0


def _built_on(work: Path, init: Path | None, mask_weight: float) -> dict:
    """What a stage trains on: the base UNet's and Qwen2-VL's markers, the sha256 of the checkpoint it
    starts from, and its loss's mask weight."""
    import hashlib

    runs = {name: work / f"base-{name}.done" for name, _, _ in MLLM_RUNS}
    return {
        "base": (work / "base-unet.done").read_text(),
        **({"place": place.read_text()} if (place := work / "base-unet_place.done").exists() else {}),
        "mllm": None,  # a folder built before step 4
        **{name: done.read_text() for name, done in runs.items() if done.exists()},
        "init": hashlib.sha256(init.read_bytes()).hexdigest() if init is not None else None,
        "mask_weight": mask_weight,
    }


@dataclass(frozen=True)
class StageRun:
    """One ``easyref train`` run of step 5: its name (``WORK/train-<name>``, its ``--steps`` key), the
    ``--stage`` it runs and its optimiser settings."""

    name: str
    stage: str
    batch_size: int
    learning_rate: float
    lr_scheduler: str = "constant"
    seed_offset: int = 0


#: Step 5, in order, each starting from the one before. ``anneal`` continues ``multi`` (its data, a new
#: data order) with the rate decayed to zero (cosine): a constant rate, then a decay, as warmup-stable-decay
#: schedules do. The constant-rate run ends wherever its last steps left it; the decayed one settles
#: (the held-out evidence: shape 36% → 62%, docs/DEMO.md).
STAGE_RUNS = (
    StageRun("align", "align", 16, 1e-3),
    StageRun("single", "single", 16, 5e-4),
    StageRun("multi", "multi", 8, 5e-4),
    StageRun("anneal", "multi", 8, 5e-4, "cosine", seed_offset=1),
)


def _train_easyref(
    work: Path, ledger: Ledger, steps: dict[str, int], seed: int, *, quick: bool, mask_weight: float
) -> Path:
    """Step 5: training data, then the runs of :data:`STAGE_RUNS`; the last checkpoint.
    A stage that already reached its steps on the same base and start is kept, one that stopped short
    resumes (``easyref train --resume``); one whose base or start changed (the stage before it trained
    again) restarts, and its time starts again from zero (``runs`` keeps every run)."""
    sdxl, mllm = work / "sdxl", work / "qwen2vl"
    data_root = work / "data"
    groups = 40 if quick else 400
    if not (data_root / "multi.json").exists():
        ledger.timed("data", lambda: write_training_data(data_root, groups=groups, per_group=6, seed=seed))
    _marker(work / "data.done", {"groups": groups, "per_group": 6, "seed": seed, "masks": True})
    data = {run.stage: data_root / f"{run.stage}.json" for run in STAGE_RUNS}
    init = None
    for run in STAGE_RUNS:
        name = run.name
        out, built_on = work / f"train-{name}", _built_on(work, init, mask_weight)
        stamp = out / "built-on.json"
        if out.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != built_on):
            _log(f"{name}: {out} was trained on another base, start or loss; training it again")
            shutil.rmtree(out)
        reached = _stage_reached(out)
        if reached > steps[name]:
            raise SystemExit(
                f"{out} reached step {reached}, more than the {steps[name]} asked for; pass --steps "
                f"{name}={reached} (or more), or use another WORK folder"
            )
        if reached == steps[name]:
            _log(f"{name}: {out} reached step {reached}; reusing it")
            init = out / f"checkpoint-{reached}.safetensors"
            continue
        if not reached:
            shutil.rmtree(out, ignore_errors=True)
            ledger.record["seconds"][name] = 0.0
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(built_on) + "\n")
        ledger.record[f"{name}_settings"] = dataclasses.asdict(run) | {"mask_weight": mask_weight}
        init = ledger.timed(
            name,
            functools.partial(
                run_stage, run.stage, data=data, data_root=data_root, sdxl=sdxl, mllm=mllm, out=out,
                steps=steps[name], init=init, seed=seed + run.seed_offset, batch_size=run.batch_size,
                learning_rate=run.learning_rate, lr_scheduler=run.lr_scheduler, resume=reached > 0,
                mask_weight=mask_weight,
            ),
            steps_from=reached, steps_to=steps[name],
        )  # fmt: skip
    return init


def build(
    work: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    install: bool = False,
    base_only: bool = False,
    base_from: Path | None = None,
    steps: dict[str, int] | None = None,
    base_loss: BaseLoss = BaseLoss(),
    mask_weight: float = STAGE_MASK_WEIGHT,
) -> dict:
    """Run the recipe in ``work`` (see the module docstring), continuing whatever an earlier run in
    ``work`` left; returns what ``build.json`` records."""
    planned = {k: max(2, v // 20) if quick else v for k, v in STEPS.items()} | (steps or {})
    work.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(work, {"seed": seed, "steps": planned, "lora_rank": LORA_RANK})

    # 1.-3. base models, VAE and base UNet; 4. the tiny Qwen2-VL taught to describe the pictures
    _build_base(work, ledger, planned, seed, base_from, base_loss)
    _place_base(work, ledger, planned, seed, base_loss)
    _pretrain_mllm(work, ledger, planned, seed)
    if base_only:
        return ledger.record

    # 5. EasyRef stages; 6. install
    init = _train_easyref(work, ledger, planned, seed, quick=quick, mask_weight=mask_weight)
    shutil.copyfile(init, work / "easyref.safetensors")
    ledger.save()
    if install:
        install_model(work)
    return ledger.record


def install_model(work: Path, target: Path = WEIGHTS_DIR) -> Path:
    """Copy the parts ``--model demo`` needs from a build folder into ``target`` (a demo ControlNet
    there is dropped: it belongs to the UNet it was trained on; ``demo.controlnet`` trains a new one)."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copytree(work / "sdxl", staging / "sdxl")
    shutil.copytree(work / "qwen2vl", staging / "qwen2vl")
    for name in ("easyref.safetensors", "build.json"):
        shutil.copyfile(work / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _log(f"installed into {target}")
    return target


def _steps_option(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in STEPS or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected STEP=N with STEP one of {', '.join(STEPS)}, got {text!r}")
    return name, int(value)


_TERMINATED = False


def _interrupt(signum, frame) -> None:
    global _TERMINATED
    _TERMINATED = True
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easyref_cli.demo.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="build folder (models, data, training runs); a rerun continues it")
    parser.add_argument(
        "--quick", action="store_true", help="1/20 of the steps: checks the recipe runs, trains nothing useful"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true", help=f"copy the result into {WEIGHTS_DIR}")
    parser.add_argument(
        "--base-from", type=Path, metavar="BUILD",
        help="start from a previous build (or the installed weights): its VAE, text encoders and Qwen2-VL, a new UNet",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=_steps_option, action="append", default=[], metavar="STEP=N",
        help=f"another step count (defaults: {', '.join(f'{k}={v}' for k, v in STEPS.items())}); "
        "a stage given more steps than it reached resumes",
    )  # fmt: skip
    parser.add_argument("--base-only", action="store_true", help="stop after the base models (steps 1-4)")
    parser.add_argument(
        "--attribute-loss", type=float, default=BaseLoss.attribute_loss, metavar="W",
        help="base pre-training also trains heads reading the caption's cell, size, colour and shape off the "
        "pooled text embedding, at weight W (0 turns it off; it made the base use position words; docs/DEMO.md)",
    )  # fmt: skip
    parser.add_argument(
        "--shape-weight", type=float, default=BaseLoss.shape_weight, metavar="W",
        help="base pre-training weights the diffusion loss 1 + W on and around the drawn shape (0: plain loss)",
    )  # fmt: skip
    parser.add_argument(
        "--mask-weight", type=float, default=STAGE_MASK_WEIGHT, metavar="W",
        help="the EasyRef stages train with easyref train --mask-weight W: the loss weighted 1 + W on and around "
        "the drawn shape (default 0: the official plain loss, as the shipped weights)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops a step as Ctrl-C does: its time is recorded
    record = build(
        args.work, quick=args.quick, seed=args.seed, install=args.install, base_only=args.base_only,
        base_from=args.base_from, steps=dict(args.steps),
        base_loss=BaseLoss(args.attribute_loss, args.shape_weight), mask_weight=args.mask_weight,
    )  # fmt: skip
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
