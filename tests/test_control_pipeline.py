"""ControlNet, img2img and inpainting through EasyRefPipeline, on tiny models.

Parity with diffusers' own SDXL pipelines (scale 0: the adapter adds nothing), the official EasyRef
wrapper's ControlNet rule (``CNAttnProcessor2_0``: the ControlNet attends to the text tokens only),
batching, validation, ControlNet folder checks, offload.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from easyref_cli.constants import OFFICIAL_NEGATIVE_PROMPT
from easyref_cli.errors import UsageError
from easyref_cli.model import control
from easyref_cli.model.checkpoint import load_checkpoint
from easyref_cli.model.pipeline import EasyRefPipeline, GenerationRequest, RefEmbeds, make_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64
NUM_TOKENS = 64


def _image(seed: int):
    """A blocky random RGB image (8×8 cells), so that a ControlNet sees structure, not noise."""
    from PIL import Image

    cells = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(cells, SIZE // 8, axis=0), SIZE // 8, axis=1))


def _mask(box=(16, 8, 56, 48)):
    from PIL import Image, ImageDraw

    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.fixture(scope="module")
def nets(tiny, tmp_path_factory):
    """Two tiny ControlNets (seeds 0 and 1), built once for the module."""
    from easyref_cli.tiny import build_tiny_controlnet

    folder = tmp_path_factory.mktemp("controlnets")
    return [build_tiny_controlnet(tiny.base_model, folder / f"cn{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def pipe(tiny, nets):
    """The adapter without LoRA and one ControlNet: at scale 0 exactly diffusers' pipelines."""
    return EasyRefPipeline.from_pretrained(tiny.base_model, tiny.mllm, tiny.adapter, device="cpu", controlnets=nets[:1])


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(0)
    return RefEmbeds(cond=torch.randn(NUM_TOKENS, 64, generator=g), uncond=torch.randn(NUM_TOKENS, 64, generator=g))


def _request(embeds, prompt="a cat", seed=1, **kw):
    base = dict(prompt=prompt, ref_embeds=embeds, seed=seed, steps=2, width=SIZE, height=SIZE, scale=0.0)
    return GenerationRequest(**{**base, **kw})


def _u8(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.uint8) for im in images]


def _levels(a: np.ndarray, b: np.ndarray) -> int:
    """Max |Δ| in 8-bit levels. A batch and its singles may differ by one level, in every mode, text-to-image
    included (tests/test_pipeline.py): CPU GEMM kernels round differently with the number of rows
    (measured: the UNet's time and added-condition embedding Linears differ by ~2e-7 for 4 rows vs 2)
    and with the weights' memory alignment."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _diffusers(cls_name: str, tiny, **components):
    """diffusers' own pipeline from the tiny SDXL folder, with EasyRef's default sampler."""
    import diffusers

    ref = getattr(diffusers, cls_name).from_pretrained(tiny.base_model, **components)
    ref.scheduler = make_scheduler("euler", ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _run_diffusers(ref, requests, **inputs) -> list[np.ndarray]:
    first = requests[0]
    with torch.inference_mode():
        out = ref(
            prompt=[r.prompt for r in requests],
            negative_prompt=[r.negative_prompt for r in requests],  # ours always encodes it
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
            output_type="np",
            **inputs,
        )
    return _u8(ref.image_processor.numpy_to_pil(out.images))


def _controlnet(path):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(path)


# ---- 1. parity with diffusers at scale 0 ---------------------------------------------------------

MODES = {
    "controlnet": ("StableDiffusionXLControlNetPipeline", True, False, False),
    "img2img": ("StableDiffusionXLImg2ImgPipeline", False, True, False),
    "inpaint": ("StableDiffusionXLInpaintPipeline", False, True, True),
    "controlnet_img2img": ("StableDiffusionXLControlNetImg2ImgPipeline", True, True, False),
    "controlnet_inpaint": ("StableDiffusionXLControlNetInpaintPipeline", True, True, True),
}


def _mode_requests(embeds, controlled: bool, init: bool, mask: bool) -> list[GenerationRequest]:
    """A batch of two: own prompt, seed, control image, init image and mask each."""
    shared = dict(control_scale=(0.8,), control_start=(0.0,), control_end=(1.0,))
    if init:
        shared.update(steps=3, strength=0.7)  # two denoising steps
    return [
        _request(
            embeds,
            prompt=prompt,
            seed=seed,
            control_images=(_image(10 + i),) if controlled else (),
            init_image=_image(20 + i) if init else None,
            mask_image=_mask((8 + 8 * i, 8, 48, 40 + 8 * i)) if mask else None,
            **shared,
        )
        for i, (prompt, seed) in enumerate([("a cat", 5), ("a dog photo", 6)])
    ]


def _diffusers_inputs(requests, controlled: bool, init: bool, mask: bool) -> dict:
    first = requests[0]
    inputs = {}
    if controlled:
        control_key = "control_image" if init else "image"
        inputs[control_key] = [r.control_images[0] for r in requests]
        inputs["controlnet_conditioning_scale"] = first.control_scale[0]
    if init:
        inputs.update(image=[r.init_image for r in requests], strength=first.strength)
    if mask:
        inputs["mask_image"] = [r.mask_image for r in requests]
    if controlled or mask:  # diffusers' img2img pipeline has no width/height: the init image's size
        inputs.update(width=first.width, height=first.height)
    return inputs


@pytest.mark.parametrize("mode", list(MODES))
def test_scale_zero_equals_diffusers_own_pipeline(mode, pipe, tiny, nets, embeds):
    """Ours at scale 0, references in the context, equals diffusers' pipeline without any adapter:
    the reference tokens reach neither the UNet nor the ControlNet, and every mode input is plumbed
    as diffusers takes it. Bit for bit, a batch of two."""
    cls_name, controlled, init, mask = MODES[mode]
    requests = _mode_requests(embeds, controlled, init, mask)
    ours = _u8(pipe.generate(requests))
    ref = _diffusers(cls_name, tiny, **({"controlnet": _controlnet(nets[0])} if controlled else {}))
    theirs = _run_diffusers(ref, requests, **_diffusers_inputs(requests, controlled, init, mask))
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a, b), int(np.abs(a.astype(int) - b).max())
    assert not np.array_equal(ours[0], ours[1])


def test_text_to_image_path_is_unchanged(pipe, tiny, embeds):
    """Loading a ControlNet leaves plain text-to-image on the base pipeline: diffusers' SDXL pipeline."""
    requests = [_request(embeds, seed=9)]
    ours = _u8(pipe.generate(requests))
    theirs = _run_diffusers(_diffusers("StableDiffusionXLPipeline", tiny), requests, width=SIZE, height=SIZE)
    assert np.array_equal(ours[0], theirs[0])


# ---- 2. the official wrapper's ControlNet rule -----------------------------------------------------


class OfficialIPAttnProcessor:
    """The official ``IPAttnProcessor2_0`` (``ip_adapter/attention_processor.py``), its computation copied."""

    def __init__(self, to_k_ip, to_v_ip, scale=1.0, num_tokens=NUM_TOKENS):
        self.to_k_ip, self.to_v_ip, self.scale, self.num_tokens = to_k_ip, to_v_ip, scale, num_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        end_pos = encoder_hidden_states.shape[1] - self.num_tokens
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end_pos], encoder_hidden_states[:, end_pos:]
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        hidden_states = F.scaled_dot_product_attention(query, heads(key), heads(value), dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        ip_key, ip_value = (
            heads(F.linear(ip_hidden_states, self.to_k_ip)),
            heads(F.linear(ip_hidden_states, self.to_v_ip)),
        )
        ip_hidden_states = F.scaled_dot_product_attention(query, ip_key, ip_value, dropout_p=0.0, is_causal=False)
        ip_hidden_states = ip_hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states + self.scale * ip_hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


class OfficialCNAttnProcessor:
    """The official ``CNAttnProcessor2_0``, its computation copied: the ControlNet's attention drops
    the last ``num_tokens`` tokens of the context (it sees the text only)."""

    def __init__(self, num_tokens=NUM_TOKENS):
        self.num_tokens = num_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        else:
            end_pos = encoder_hidden_states.shape[1] - self.num_tokens
            encoder_hidden_states = encoder_hidden_states[:, :end_pos]  # only use text
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        hidden_states = F.scaled_dot_product_attention(
            heads(query), heads(key), heads(value), dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        return hidden_states / attn.rescale_output_factor


@pytest.fixture(scope="module")
def lora_pipe(tiny, nets):
    return EasyRefPipeline.from_pretrained(
        tiny.base_model, tiny.mllm, tiny.adapter_lora, device="cpu", controlnets=nets[:1]
    )


@pytest.fixture(scope="module")
def refs(ref_group):
    from easyref_cli.files import load_image

    return [load_image(p) for p in sorted(ref_group.iterdir())]


def _official_controlnet_pipeline(tiny, ours, controlnet_path):
    """diffusers' ControlNet pipeline wrapped as the official ``EasyRef.set_ip_adapter`` does: the UNet's
    ``attn2`` get the official decoupled attention (our UNet's weights: its LoRA merged), the
    ControlNet's attention modules the official ``CNAttnProcessor2_0``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    ref = _diffusers("StableDiffusionXLControlNetPipeline", tiny, controlnet=_controlnet(controlnet_path))
    weights = {k: v for k, v in ours.sdxl.unet.state_dict().items() if ".processor." not in k}
    ref.unet.load_state_dict(weights, strict=True)
    ip = load_checkpoint(tiny.adapter_lora).ip
    procs = {}
    for name in ref.unet.attn_processors:
        path = name[: -len(".processor")]
        if path.endswith("attn2"):
            procs[name] = OfficialIPAttnProcessor(ip[path]["to_k_ip"], ip[path]["to_v_ip"])
        else:
            procs[name] = AttnProcessor2_0()
    ref.unet.set_attn_processor(procs)
    ref.controlnet.set_attn_processor(OfficialCNAttnProcessor())
    return ref


def test_controlnet_image_equals_the_official_wrapper(tiny, nets, lora_pipe, refs):
    """References at scale 1, LoRA merged: our ControlNet image equals the official wrapper's
    computation (diffusers' ControlNet pipeline, the official processors, prompt_embeds =
    [text ; reference tokens] as the official ``generate()`` builds them)."""
    embeds = lora_pipe.encode_references(refs, "a cat")
    control_image = _image(11)
    kw = dict(seed=3, steps=2, width=SIZE, height=SIZE, guidance=5.0)
    ours = np.asarray(lora_pipe("a cat", ref_embeds=embeds, control_images=[control_image], **kw), dtype=np.uint8)

    ref = _official_controlnet_pipeline(tiny, lora_pipe, nets[0])
    with torch.inference_mode():
        pe, ne, pp, npp = ref.encode_prompt(
            ["a cat"], num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=[OFFICIAL_NEGATIVE_PROMPT],
        )  # fmt: skip
        out = ref(
            prompt_embeds=torch.cat([pe, embeds.cond[None]], dim=1),
            negative_prompt_embeds=torch.cat([ne, embeds.uncond[None]], dim=1),
            pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp,
            image=control_image, num_inference_steps=2, guidance_scale=5.0, width=SIZE, height=SIZE,
            generator=torch.Generator("cpu").manual_seed(3), output_type="np",
        )  # fmt: skip
    official = np.asarray(ref.image_processor.numpy_to_pil(out.images)[0], dtype=np.uint8)
    assert np.array_equal(ours, official), int(np.abs(ours.astype(int) - official).max())
    # the references matter here (scale 1 vs 0), so the equality is not vacuous
    at_zero = np.asarray(
        lora_pipe("a cat", ref_embeds=embeds, control_images=[control_image], scale=0.0, **kw), dtype=np.uint8
    )
    assert np.abs(ours.astype(int) - at_zero).max() > 0


def _flat(residuals) -> list[torch.Tensor]:
    down, mid = residuals
    return [*down, mid]


def test_controlnet_residuals_see_the_text_tokens_only(tiny, nets, lora_pipe):
    """Given ``[text ; references]`` our ControlNet's down/mid residuals equal those of diffusers' stock
    ControlNet given the text alone, and of the official CNAttnProcessor given everything; they differ
    from the stock ControlNet attending to all tokens (the rule matters)."""
    ours = lora_pipe.controlnets[0]
    assert all(isinstance(p, control.TextOnlyAttnProcessor) for p in ours.attn_processors.values())
    stock, official = _controlnet(nets[0]), _controlnet(nets[0])
    official.set_attn_processor(OfficialCNAttnProcessor())
    g = torch.Generator().manual_seed(4)
    text = torch.randn(2, 77, 64, generator=g)
    context = torch.cat([text, torch.randn(2, NUM_TOKENS, 64, generator=g)], dim=1)
    common = dict(
        sample=torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g),
        timestep=torch.tensor(500),
        controlnet_cond=torch.rand(2, 3, SIZE, SIZE, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2).float(),
        },
        return_dict=False,
    )
    with torch.no_grad():
        got = _flat(ours(encoder_hidden_states=context, **common))
        text_only = _flat(stock(encoder_hidden_states=text, **common))
        official_out = _flat(official(encoder_hidden_states=context, **common))
        everything = _flat(stock(encoder_hidden_states=context, **common))
    assert len(got) == len(text_only) > 1
    assert all(torch.equal(a, b) for a, b in zip(got, text_only, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got, official_out, strict=True))
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(got, everything, strict=True))


# ---- 3. behaviour --------------------------------------------------------------------------------


def test_a_control_image_changes_the_image(pipe, embeds):
    """The tiny ControlNet is not a no-op: its control image shows in the image."""
    a, b, plain = (
        _u8(pipe.generate([_request(embeds, control_images=images)]))[0] for images in ((_image(1),), (_image(2),), ())
    )
    assert np.abs(a.astype(int) - b).max() > 2
    assert np.abs(a.astype(int) - plain).max() > 2


@pytest.mark.parametrize("mode", ["controlnet", "img2img", "inpaint"])
def test_batch_equals_singles(mode, pipe, embeds):
    _, controlled, init, mask = MODES[mode]
    requests = _mode_requests(embeds, controlled, init, mask)
    steps = []
    batch = _u8(pipe.generate(requests, step_callback=lambda i, n: steps.append((i, n))))
    singles = [_u8(pipe.generate([r]))[0] for r in requests]
    for a, b in zip(batch, singles, strict=True):
        assert _levels(a, b) <= 1  # as text-to-image (test_pipeline): see _levels
    # img2img and inpainting denoise the last strength × steps (3 × 0.7 → 2) of the schedule
    assert steps == [(1, 2), (2, 2)]


def test_a_batch_never_mixes_modes(pipe, embeds):
    plain = _request(embeds)
    others = [
        _request(embeds, control_images=(_image(1),)),
        _request(embeds, init_image=_image(2)),
        _request(embeds, init_image=_image(2), mask_image=_mask()),
    ]
    keys = {r.batch_key() for r in [plain, *others]}
    assert len(keys) == 4
    # per-image inputs are not part of the key: two control images share a batch
    assert others[0].batch_key() == _request(embeds, seed=2, control_images=(_image(3),)).batch_key()
    for other in others:
        with pytest.raises(UsageError, match="mode"):
            pipe.generate([plain, other])


BAD = {
    "too many control images": (dict(control_images=(_image(1), _image(2))), "1 ControlNet"),
    "scale per net": (dict(control_images=(_image(1),), control_scale=(1.0, 0.5)), "control_scale"),
    "no start": (dict(control_images=(_image(1),), control_start=()), "control_start"),
    "start after end": (dict(control_images=(_image(1),), control_start=(0.6,), control_end=(0.4,)), "start < end"),
    "end past 1": (dict(control_images=(_image(1),), control_end=(1.5,)), "start < end"),
    "rescale": (dict(control_images=(_image(1),), guidance_rescale=0.7), "guidance_rescale"),
    "mask alone": (dict(mask_image=_mask()), "init image"),
    "strength 0": (dict(init_image=_image(2), strength=0.0), r"\(0, 1\]"),
    "strength 1.5": (dict(init_image=_image(2), strength=1.5), r"\(0, 1\]"),
    "no step left": (dict(init_image=_image(2), strength=0.2), "no denoising step"),
    "official seeds": (dict(init_image=_image(2), seed_mode="official"), "official replays"),
    "init size": (dict(init_image=_image(2).resize((32, 32))), "init image is 32x32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_inputs_are_checked_before_work(case, pipe, embeds, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(pipe, "encode_text", no_work)
    monkeypatch.setattr(pipe._modes, "get", no_work)
    changes, message = BAD[case]
    with pytest.raises(UsageError, match=message):
        pipe.generate([_request(embeds, **changes)])


def test_control_images_need_a_loaded_controlnet(pipe, embeds, monkeypatch):
    monkeypatch.setattr(pipe, "controlnets", [])
    with pytest.raises(UsageError, match="no ControlNet is loaded"):
        pipe.generate([_request(embeds, control_images=(_image(1),))])


def test_official_seeds_replay_controlnet_calls(pipe, tiny, nets, embeds):
    """seed_mode official passes latents, which a ControlNet call takes (img2img and inpainting refuse,
    above): image i equals image i of one official call of n images (one generator for the call)."""
    n, s, control_image = 2, 42, _image(1)
    kw = dict(control_images=(control_image,), seed_mode="official", noise_samples=n)
    ours = [_u8(pipe.generate([_request(embeds, seed=s + i, noise_index=i, **kw)]))[0] for i in range(n)]
    ref = _diffusers("StableDiffusionXLControlNetPipeline", tiny, controlnet=_controlnet(nets[0]))
    with torch.inference_mode():
        out = ref(
            prompt="a cat", negative_prompt=OFFICIAL_NEGATIVE_PROMPT, image=control_image, num_images_per_prompt=n,
            num_inference_steps=2, width=SIZE, height=SIZE, generator=torch.Generator("cpu").manual_seed(s),
            output_type="np",
        )  # fmt: skip
    official = _u8(ref.image_processor.numpy_to_pil(out.images))
    for i in range(n):
        assert _levels(ours[i], official[i]) <= 1, i  # one call of n vs n calls of one: see _levels
    assert _levels(ours[0], ours[1]) > 10  # distinct slices of the stream


def _copy_config(src, dst, **changes):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_check_controlnet_names_the_folder(tiny, nets, tmp_path):
    control.check_controlnet(nets[0], tiny.base_model)  # fits
    control.check_controlnet(nets[0], None)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    cases = {
        empty: "no config.json",
        bad_json: "cannot read config.json",
        _copy_config(nets[0], tmp_path / "unet", _class_name="UNet2DConditionModel"): "not a diffusers ControlNet",
        _copy_config(nets[0], tmp_path / "sd15", cross_attention_dim=768): "cross_attention_dim is 768",
        _copy_config(nets[0], tmp_path / "no_time", addition_embed_type=None): "addition_embed_type",
        tmp_path / "missing": "not a folder",
    }
    for folder, message in cases.items():
        with pytest.raises(UsageError, match=message) as info:
            control.check_controlnet(folder, tiny.base_model)
        assert str(folder) in str(info.value)
    control.check_controlnet(tmp_path / "sd15", None)  # no base model: the config alone is checked
    control.check_controlnet(tmp_path / "sd15", tiny.base_model / "unet" / "config.json")  # not a folder
    # from_pretrained checks before loading anything
    with pytest.raises(UsageError, match="cross_attention_dim"):
        EasyRefPipeline.from_pretrained(
            tiny.base_model, tiny.mllm, tiny.adapter, device="cpu", controlnets=[tmp_path / "sd15"]
        )


def test_unloadable_controlnet_is_a_model_error(tiny, nets, tmp_path):
    from easyref_cli.errors import ModelError

    broken = tmp_path / "broken"
    shutil.copytree(nets[0], broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="broken"):
        EasyRefPipeline.from_pretrained(tiny.base_model, tiny.mllm, tiny.adapter, device="cpu", controlnets=[broken])


def test_offload_on_cpu_is_a_noop(tiny, nets, pipe, embeds, caplog):
    offloaded = EasyRefPipeline.from_pretrained(
        tiny.base_model, tiny.mllm, tiny.adapter, device="cpu", controlnets=nets[:1], offload="model"
    )
    assert offloaded.offload == "none" and "no effect on the CPU" in caplog.text
    request = _request(embeds, control_images=(_image(1),))
    assert np.array_equal(_u8(offloaded.generate([request]))[0], _u8(pipe.generate([request]))[0])


def test_model_offload_hooks_follow_the_mode(tiny, nets, pipe, embeds):
    """accelerate's model offload hooks, forced on the CPU: the pipeline of the mode in use gets them
    over all its components, the ControlNet included, and gives the images of the unhooked pipeline
    (within one level: the hooks' ``.to("cpu:0")`` copies the weights, and CPU GEMMs round by alignment).
    Sequential offload cannot run on the CPU (accelerate fails there for diffusers' own SDXL pipeline)."""
    from accelerate.hooks import CpuOffload

    hooked = EasyRefPipeline.from_pretrained(
        tiny.base_model, tiny.mllm, tiny.adapter, device="cpu", controlnets=nets[:1]
    )
    hooked.sdxl.enable_model_cpu_offload(device="cpu")
    hooked._modes.offload = "model"  # what from_pretrained sets up with offload="model" on a GPU
    requests = [
        _request(embeds, control_images=(_image(1),)),
        _request(embeds),
        _request(embeds, init_image=_image(2), mask_image=_mask()),
        _request(embeds, control_images=(_image(3),)),
    ]
    for request in requests:
        assert _levels(_u8(hooked.generate([request]))[0], _u8(pipe.generate([request]))[0]) <= 1
        owner = hooked._modes.get(control.mode_of(request))
        assert owner is hooked._modes._hooked and owner.__class__.__name__ == control.mode_of(request).pipeline_class
    assert isinstance(hooked.controlnets[0]._hf_hook, CpuOffload)


# ---- 4. several ControlNets -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_pipe(tiny, nets):
    return EasyRefPipeline.from_pretrained(tiny.base_model, tiny.mllm, tiny.adapter, device="cpu", controlnets=nets)


MULTI = dict(control_scale=(0.6, 1.3), control_start=(0.0, 0.5), control_end=(1.0, 1.0))


def test_multi_controlnet_equals_diffusers(multi_pipe, tiny, nets, embeds):
    request = _request(embeds, seed=8, control_images=(_image(1), _image(2)), **MULTI)
    ours = _u8(multi_pipe.generate([request]))
    ref = _diffusers("StableDiffusionXLControlNetPipeline", tiny, controlnet=[_controlnet(p) for p in nets])
    theirs = _run_diffusers(
        ref,
        [request],
        image=list(request.control_images),
        controlnet_conditioning_scale=list(MULTI["control_scale"]),
        control_guidance_start=list(MULTI["control_start"]),
        control_guidance_end=list(MULTI["control_end"]),
        width=SIZE,
        height=SIZE,
    )
    assert np.array_equal(ours[0], theirs[0]), int(np.abs(ours[0].astype(int) - theirs[0]).max())
    # each net and its scale matter
    swapped = _u8(multi_pipe.generate([_request(embeds, seed=8, control_images=(_image(1), _image(3)), **MULTI)]))
    assert not np.array_equal(ours[0], swapped[0])


def test_multi_controlnet_batch_equals_singles(multi_pipe, embeds):
    requests = [
        _request(embeds, prompt=p, seed=s, control_images=(_image(s), _image(s + 10)), control_scale=(0.7,))
        for p, s in [("a cat", 1), ("a dog", 2)]
    ]
    batch = _u8(multi_pipe.generate(requests))
    for r, image in zip(requests, batch, strict=True):
        assert _levels(image, _u8(multi_pipe.generate([r]))[0]) <= 1


# ---- the tiny ControlNet ----------------------------------------------------------------------------


def test_ensure_tiny_controlnet_builds_once_beside_the_tiny_models(tiny, tmp_path):
    from easyref_cli import tiny as tiny_mod

    root = tmp_path / "models"
    root.mkdir()
    (root / "sdxl").symlink_to(tiny.base_model, target_is_directory=True)
    folder = tiny_mod.ensure_tiny_controlnet(root)
    assert folder == root / "controlnet"
    control.check_controlnet(folder, tiny.base_model)
    config = json.loads((folder / "config.json").read_text())
    assert config["conditioning_channels"] == 3 and config["conditioning_embedding_out_channels"] == [16, 32]
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert tiny_mod.ensure_tiny_controlnet(root) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert sorted(p.name for p in root.iterdir()) == ["controlnet", "sdxl"]  # no temporary folder left
    assert tiny_mod._BUILD_VERSION == "easyref-tiny-models v2"
