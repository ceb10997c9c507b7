"""The demo's base models and their pre-training: steps 1–3 of the recipe in
:mod:`easyref_cli.demo.build` (which runs them, records them and resumes them).

* a tiny SDXL-layout pipeline (:func:`build_base_pipeline`);
* the VAE fitted on synthetic pictures (:func:`fit_vae`);
* the base UNet and text encoders pre-trained on synthetic captions (:func:`train_base_unet`, with the
  training-only :func:`_attribute_loss` and :func:`_shape_weights`);
* the checks of what the base then draws from text (:func:`from_text_accuracy`,
  :func:`caption_sensitivity`).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from easyref_cli.demo.evidence import PROMPTS as EVIDENCE_PROMPTS
from easyref_cli.demo.evidence import asked_placement
from easyref_cli.demo.state import load_state, optimizer_step, save_state
from easyref_cli.demo.synthetic import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Drawing,
    dominant_colour,
    iter_drawings,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig


def log(message: str) -> None:
    print(f"[demo-build {time.strftime('%H:%M:%S')}] {message}", flush=True)


def caption(drawing: Drawing) -> str:
    """The demo's prompts say where and how large, never which colour or shape."""
    return drawing.caption(colour=False, shape=False)


# ---------------------------------------------------------------------------------------------
# 1. base models
# ---------------------------------------------------------------------------------------------


def demo_unet() -> UNet2DConditionModel:
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
    unet = demo_unet()
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


def fit_vae(vae, steps: int, *, seed: int, batch_size: int = 16, lr: float = 2e-3, log: Callable = log) -> dict:
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
    log: Callable = log,
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
    pipe.set_progress_bar_config(disable=True)  # a check inside a logged build: no bars in its log
    with torch.no_grad():
        for i in range(0, len(prompts), 48):
            images += pipe(
                **_prompt_embeds(pipe, prompts[i : i + 48], pooled[i : i + 48]), num_inference_steps=steps,
                guidance_scale=guidance, height=IMAGE_SIZE, width=IMAGE_SIZE,
                generator=[torch.Generator().manual_seed(a[3]) for a in asked[i : i + 48]],
            ).images  # fmt: skip
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "position": [], "size": []}
    per: dict[str, dict[str, list[bool]]] = {"colour": {}, "shape": {}, "size": {}}
    for image, (colour, shape, (_, cell, size), _) in zip(images, asked, strict=True):
        placement = classify_placement(image, colour) or (None, None)
        right = {"colour": dominant_colour(image) == colour, "shape": classify_shape(image, colour) == shape,
                 "position": placement[0] == cell, "size": placement[1] == size}  # fmt: skip
        for name, ok in right.items():
            hits[name].append(ok)
        per["colour"].setdefault(colour, []).append(right["colour"])
        per["shape"].setdefault(shape, []).append(right["shape"])
        per["size"].setdefault(f"{size} {shape}", []).append(right["shape"])
    share = lambda values: round(sum(values) / len(values), 3)  # noqa: E731
    result: dict = {name: share(values) for name, values in hits.items()}
    result["per_colour"] = {k: share(v) for k, v in per["colour"].items()}
    result["per_shape"] = {k: share(v) for k, v in per["shape"].items()}
    result["shape_per_size"] = {k: share(v) for k, v in sorted(per["size"].items())}
    result["prompts"] = len(prompts)
    return result
