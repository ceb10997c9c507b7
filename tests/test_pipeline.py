"""End to end on tiny models: references + prompt + seed → image."""

from __future__ import annotations

import io

import numpy as np
import pytest

from easyref_cli.constants import OFFICIAL_NEGATIVE_PROMPT
from easyref_cli.errors import UsageError
from easyref_cli.model.pipeline import EasyRefPipeline, GenerationRequest


@pytest.fixture(scope="module")
def pipe(tiny):
    return EasyRefPipeline.from_pretrained(
        tiny.base_model, tiny.mllm, tiny.adapter_lora, device="cpu", attention="auto"
    )


@pytest.fixture(scope="module")
def refs(ref_group):
    from easyref_cli.files import load_image

    return [load_image(p) for p in sorted(ref_group.iterdir())]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_one_image_per_seed_deterministic(pipe, refs):
    kw = dict(refs=refs, steps=2, width=64, height=64, guidance=5.0)
    a = pipe("a cat", seed=1, **kw)
    b = pipe("a cat", seed=1, **kw)
    c = pipe("a cat", seed=2, **kw)
    assert a.size == (64, 64)
    assert _png(a) == _png(b)
    assert _png(a) != _png(c)


def test_precomputed_embeds_equal_encoding_in_the_call(pipe, refs):
    embeds = pipe.encode_references(refs, "a cat")
    kw = dict(steps=2, width=64, height=64, seed=3)
    assert _png(pipe("a cat", refs=refs, **kw)) == _png(pipe("a cat", ref_embeds=embeds, **kw))


def test_references_change_the_image(pipe, refs):
    from PIL import Image

    kw = dict(steps=2, width=64, height=64, seed=4)
    other = [Image.new("RGB", (64, 64), (250, 10, 10))]
    a = np.asarray(pipe("a cat", refs=refs, **kw), dtype=np.float32)
    b = np.asarray(pipe("a cat", refs=other, **kw), dtype=np.float32)
    assert np.abs(a - b).max() > 0


def test_batch_equals_singles(pipe, refs):
    embeds = pipe.encode_references(refs, "a cat")
    reqs = [
        GenerationRequest(prompt=p, ref_embeds=embeds, seed=s, steps=2, width=64, height=64)
        for p, s in [("a cat", 5), ("a dog", 6), ("a cat", 7)]
    ]
    batch = pipe.generate(reqs)
    singles = [pipe.generate([r])[0] for r in reqs]
    for x, y in zip(batch, singles, strict=False):
        diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()
        assert diff <= 1  # fp32 reduction order may differ by one 8-bit level across batch sizes


def test_inputs_checked_before_work(pipe, refs):
    with pytest.raises(UsageError, match="multiples of 8"):
        pipe("x", refs=refs, width=60, height=64, steps=1)
    with pytest.raises(UsageError, match="exactly one"):
        pipe("x", steps=1)


def test_attention_backend_is_recorded(pipe):
    assert pipe.attention.backend == "sdpa"  # no working xformers on CPU
    assert pipe.attention.reason


def test_empty_and_given_negative_prompts_never_share_a_batch_where_empty_means_zeros(pipe, refs):
    """With ``zero_negative="empty"`` SDXL zeroes the negative embedding for an all-empty batch; encoding
    "" in a mixed batch would change that image. The pipeline refuses such a batch and the run never
    builds one. With the default (always encode) they may share a batch."""
    from dataclasses import replace

    from easyref_cli.run import batches

    embeds = pipe.encode_references(refs, "a cat")
    plain = GenerationRequest(
        prompt="a cat",
        ref_embeds=embeds,
        seed=1,
        steps=1,
        width=64,
        height=64,
        negative_prompt="",
        zero_negative="empty",
    )
    with pytest.raises(UsageError, match="negative prompt"):
        pipe.generate([plain, replace(plain, negative_prompt="blurry")])

    requests = [plain, replace(plain, seed=2, negative_prompt="blurry"), replace(plain, seed=3)]
    got = batches(requests, lambda r: r.batch_key(), 8)  # the run batches jobs by their request's key
    assert [[r.seed for r in b] for b in got] == [[1], [2], [3]]
    assert [[r.seed for r in b] for b in batches(requests[::2], lambda r: r.batch_key(), 8)] == [[1, 3]]
    encoded = [replace(r, zero_negative="never") for r in requests]
    assert [[r.seed for r in b] for b in batches(encoded, lambda r: r.batch_key(), 8)] == [[1, 2, 3]]


@pytest.mark.parametrize("negative", [OFFICIAL_NEGATIVE_PROMPT, ""])
def test_negative_prompt_is_encoded_as_the_official_code_does(pipe, negative):
    """The official generate() passes its negative prompt ("" too) to diffusers' encode_prompt."""
    import torch

    request = GenerationRequest(prompt="a cat", ref_embeds=None, seed=0, negative_prompt=negative)
    ours = pipe.encode_text([request])
    theirs = pipe.sdxl.encode_prompt(
        ["a cat"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=[negative]
    )
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert ours[1].abs().sum() > 0 and ours[3].abs().sum() > 0  # never zeroed


def test_zero_negative_modes(pipe):
    import torch

    assert pipe.sdxl.config.force_zeros_for_empty_prompt  # the tiny SDXL keeps diffusers' default
    base = GenerationRequest(prompt="a cat", ref_embeds=None, seed=0, negative_prompt="")
    never, empty, always = (pipe.encode_text([replace_(base, zero_negative=m)]) for m in ("never", "empty", "always"))
    assert never[1].abs().sum() > 0
    assert torch.count_nonzero(empty[1]) == 0 and torch.count_nonzero(empty[3]) == 0
    assert torch.count_nonzero(always[1]) == 0 and torch.count_nonzero(always[3]) == 0
    given = replace_(base, negative_prompt="blurry")
    assert torch.count_nonzero(pipe.encode_text([replace_(given, zero_negative="empty")])[1]) > 0
    assert torch.count_nonzero(pipe.encode_text([replace_(given, zero_negative="always")])[1]) == 0


def replace_(request, **changes):
    from dataclasses import replace

    return replace(request, **changes)


def test_official_seed_mode_reproduces_one_official_call(pipe, refs):
    """``seed_mode="official"``: image i of a prompt equals image i of the official
    ``generate(num_samples=n, seed=s)`` (one generator on the device for all n), in any batch."""
    import torch

    from easyref_cli.model import adapter as adapter_mod

    embeds = pipe.encode_references(refs, "a cat")
    n, s = 3, 42
    kw = dict(prompt="a cat", ref_embeds=embeds, steps=2, width=64, height=64, seed_mode="official")
    requests = [GenerationRequest(seed=s + i, noise_index=i, noise_samples=n, **kw) for i in range(n)]
    batched = [np.asarray(im, dtype=np.int16) for im in pipe.generate(requests[::-1])][::-1]
    singles = [np.asarray(pipe.generate([r])[0], dtype=np.int16) for r in requests]

    # the official generate(): the embeddings repeated num_samples times, one generator for the call
    pe, ne, pp, npp = pipe.encode_text(requests[:1])
    cond, uncond = embeds.cond[None].to(pe.dtype), embeds.uncond[None].to(pe.dtype)
    adapter_mod.set_scale(pipe.sdxl.unet, 1.0)
    with torch.inference_mode():
        out = pipe.sdxl(
            prompt_embeds=torch.cat([pe, cond], 1).repeat(n, 1, 1),
            negative_prompt_embeds=torch.cat([ne, uncond], 1).repeat(n, 1, 1),
            pooled_prompt_embeds=pp.repeat(n, 1),
            negative_pooled_prompt_embeds=npp.repeat(n, 1),
            num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
            generator=torch.Generator("cpu").manual_seed(s), output_type="np",
        )  # fmt: skip
    official = [np.asarray(im, dtype=np.int16) for im in pipe.sdxl.image_processor.numpy_to_pil(out.images)]
    for i in range(n):
        assert np.abs(singles[i] - official[i]).max() <= 1, i  # batched kernels may round one level off
        assert np.abs(batched[i] - official[i]).max() <= 1, i
    assert np.abs(singles[0] - singles[1]).max() > 10  # distinct slices of the stream


def test_official_seed_mode_refuses_a_stochastic_scheduler(pipe, refs):
    request = GenerationRequest(
        prompt="a", ref_embeds=pipe.encode_references(refs, "a"), seed=1, steps=1, width=64, height=64,
        seed_mode="official", scheduler="euler_a",
    )  # fmt: skip
    with pytest.raises(UsageError, match="per-step noise"):
        pipe.generate([request])
