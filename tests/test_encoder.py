"""The reference encoder reproduces the official computation (DESIGN §2 rules 1–6), rule by rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from easyref_cli.constants import INSTRUCTION
from easyref_cli.model.checkpoint import load_checkpoint
from easyref_cli.model.encoder import (
    ReferenceEncoder,
    black_image,
    build_prompt,
    qwen_vl_utils_smart_resize,
    sequential_positions,
)


@pytest.fixture(scope="module")
def encoder(tiny):
    return ReferenceEncoder.from_pretrained(tiny.mllm, load_checkpoint(tiny.adapter), dtype=torch.float32)


@pytest.fixture(scope="module")
def refs(ref_group):
    from easyref_cli.files import load_image

    return [load_image(p) for p in sorted(ref_group.iterdir())]


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


# ---------------------------------------------------------------- rule 1: prompt


def test_prompt_text_is_the_chat_template_with_images_first():
    text = build_prompt([2, 1], "a cat", INSTRUCTION)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "Visualize a scene that closely resembles the provided images, capturing the essence and "
        "details described in this prompt:\na cat<|im_end|>\n<|im_start|>assistant\n"
    )


def test_special_tokens_are_single_ids(encoder):
    ids = encoder.tokenize([3], "hi", INSTRUCTION)[0]
    assert int((ids == encoder.image_token_id).sum()) == 3


# ---------------------------------------------------------------- rule 2: preprocessing


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [((1024, 768), (1, 20, 28), 140), ((300, 300), (1, 22, 22), 121), ((512, 512), (1, 24, 24), 144)],
)
def test_double_resize_gives_the_official_patch_grid(encoder, size, grid, tokens):
    batch = encoder.prepare_images([_noise_image(*size)])
    assert tuple(batch.grid_thw[0].tolist()) == grid
    assert batch.token_counts == (tokens,)


def test_processor_config_pixel_bounds_are_overridden(tiny, encoder):
    """The real preprocessor_config.json has min/max_pixels for 12.8 MP images; they must not win."""
    import json

    cfg = json.loads((tiny.mllm / "preprocessor_config.json").read_text())
    assert cfg["max_pixels"] == 16384 * 28 * 28  # the fixture mirrors the real file
    batch = encoder.prepare_images([_noise_image(1024, 768)])  # 54×74 with the config's own bounds
    assert tuple(batch.grid_thw[0].tolist()) == (1, 20, 28)


def test_pre_resize_is_qwen_vl_utils_smart_resize():
    assert qwen_vl_utils_smart_resize(768, 1024) == (756, 1036)
    assert qwen_vl_utils_smart_resize(300, 300) == (308, 308)
    assert qwen_vl_utils_smart_resize(10, 10) == (56, 56)  # min 4·28² pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen_vl_utils_smart_resize(10, 5000)


def test_pre_resize_matters(encoder):
    """The second resize starts from the pre-resized image: skipping the first resize changes pixels."""
    from easyref_cli.model import encoder as enc_mod

    img = _noise_image(1024, 768)
    with_pre = encoder.prepare_images([img])
    direct = encoder.image_processor(images=[img], return_tensors="pt")
    assert tuple(with_pre.grid_thw[0].tolist()) == (1, 20, 28)
    assert tuple(direct["image_grid_thw"][0].tolist()) == (1, 20, 26)  # what skipping the pre-resize would give
    assert enc_mod.pre_resize(img).size == (1036, 756)


# ---------------------------------------------------------------- rules 3–6 against a from-scratch re-computation


def official_reference(tiny, images, caption, instruction=INSTRUCTION, *, causal_final=True, checkpoint=None):
    """A straightforward re-computation of the official algorithm: eager attention with explicit masks,
    per-image vision loop, positions 0…L-1 in all three M-RoPE sections, explicit projector maths."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        tiny.mllm, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    sd = load_file(str(checkpoint or tiny.adapter))
    tok = AutoTokenizer.from_pretrained(tiny.mllm)
    # The processor config (like the real one) has top-level min/max_pixels that beat `size=`.
    proc = Qwen2VLImageProcessorPil.from_pretrained(tiny.mllm, min_pixels=11 * 11 * 784, max_pixels=145 * 784)
    lm, visual = model.model.language_model, model.model.visual

    resized = []
    for im in images:
        h, w = qwen_vl_utils_smart_resize(im.height, im.width)
        resized.append(im.resize((w, h), Image.Resampling.BICUBIC))
    feats, counts = [], []
    with torch.no_grad():
        for im in resized:  # the official per-image vision loop
            p = proc(images=[im], return_tensors="pt")
            f = visual(p["pixel_values"], grid_thw=p["image_grid_thw"]).pooler_output
            feats.append(f)
            counts.append(f.shape[0])
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        text += "".join("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in counts)
        text += instruction + caption + "<|im_end|>\n<|im_start|>assistant\n"
        ids = tok(text, return_tensors="pt")["input_ids"]
        emb = lm.embed_tokens(ids).clone()
        emb[ids == model.config.image_token_id] = torch.cat(feats)

        def run(layer, x, causal):
            n = x.shape[1]
            mask = torch.full((n, n), float("-inf")).triu(1) if causal else torch.zeros(n, n)
            pos = torch.arange(n).view(1, 1, -1).expand(3, 1, -1)
            return layer(x, attention_mask=mask[None, None], position_embeddings=lm.rotary_emb(x, pos))

        h = emb
        for layer in lm.layers[:-1]:
            h = run(layer, h, True)
        h = lm.norm(h)

        tcfg = model.config.text_config
        final = Qwen2VLDecoderLayer(tcfg, layer_idx=tcfg.num_hidden_layers - 1).eval()
        final.load_state_dict(
            {
                k[len("mllm_final_layer.layers.0.") :]: v
                for k, v in sd.items()
                if k.startswith("mllm_final_layer.layers.0.")
            }
        )
        refs = sd["mllm_final_layer.reference_tokens"]
        x = run(final, torch.cat([h, refs[None]], 1), causal_final)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + tcfg.rms_norm_eps) * sd["mllm_final_layer.norm.weight"]
        x = x[0, -refs.shape[0] :]
        x = F.gelu(F.linear(x, sd["image_proj_model.proj.0.weight"], sd["image_proj_model.proj.0.bias"]))
        x = F.linear(x, sd["image_proj_model.proj.2.weight"], sd["image_proj_model.proj.2.bias"])
        return F.layer_norm(x, (x.shape[-1],), sd["image_proj_model.proj.3.weight"], sd["image_proj_model.proj.3.bias"])


def test_parity_with_official_algorithm(tiny, encoder, refs):
    ours = encoder.encode(refs, "a cat on a mat", INSTRUCTION)
    ref = official_reference(tiny, refs, "a cat on a mat")
    assert ours.shape == (64, 64)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_parity_bidirectional_option(tiny, refs):
    enc = ReferenceEncoder.from_pretrained(tiny.mllm, load_checkpoint(tiny.adapter), bidirectional_final=True)
    ours = enc.encode(refs, "x", INSTRUCTION)
    assert (ours - official_reference(tiny, refs, "x", causal_final=False)).abs().max().item() <= 1e-4


def test_uncond_is_black_512_with_empty_caption(tiny, encoder):
    uncond = encoder.encode_uncond(INSTRUCTION)
    assert black_image().size == (512, 512) and black_image().getextrema() == ((0, 0), (0, 0), (0, 0))
    assert torch.equal(uncond, encoder.encode([black_image()], "", INSTRUCTION))
    assert (uncond - official_reference(tiny, [black_image()], "")).abs().max().item() <= 1e-4
    assert encoder.encode_uncond(INSTRUCTION) is uncond  # computed once


# ---------------------------------------------------------------- individual rules


def _hidden(encoder, refs, caption):
    batch = encoder.prepare_images(refs)
    ids = encoder.tokenize(batch.token_counts, caption, INSTRUCTION)
    with torch.inference_mode():
        embeds = encoder.embed(ids, encoder.image_features(batch))
        return ids, embeds, encoder.trunk(embeds)


def test_trunk_is_causal_prefix_independent_of_caption(encoder, refs):
    ids_a, _, ha = _hidden(encoder, refs, "a red fox")
    ids_b, _, hb = _hidden(encoder, refs, "a completely different and longer caption")
    counts = encoder.prepare_images(refs).token_counts
    prefix_text = build_prompt(counts, "", INSTRUCTION).split(INSTRUCTION)[0] + INSTRUCTION
    prefix = len(encoder.tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
    assert torch.equal(ids_a[0, :prefix], ids_b[0, :prefix])
    assert torch.allclose(ha[0, :prefix], hb[0, :prefix], atol=1e-5)  # kernels tile by length: fp32 rounding only
    assert not torch.allclose(ha[0, -1], hb[0, -1])


def test_trunk_uses_sequential_positions_in_all_sections(encoder, refs):
    _, embeds, hidden = _hidden(encoder, refs, "pos")
    n = embeds.shape[1]
    with torch.inference_mode():
        explicit = encoder.language_model(
            inputs_embeds=embeds, position_ids=sequential_positions(0, n, 1, embeds.device)
        ).last_hidden_state
        mrope = sequential_positions(0, n, 1, embeds.device).clone()
        mrope[1] = mrope[1] // 2  # any M-RoPE-style height/width indices change the result
        other = encoder.language_model(inputs_embeds=embeds, position_ids=mrope).last_hidden_state
    assert torch.allclose(hidden, explicit, atol=1e-6)
    assert not torch.allclose(hidden, other, atol=1e-4)


def test_trunk_drops_last_layer_and_applies_final_norm(tiny, encoder, refs):
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(tiny.mllm).text_config.num_hidden_layers
    assert len(encoder.language_model.layers) == n_layers - 1
    norm = encoder.language_model.norm
    saved = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.fill_(2.0)
        _, _, hidden = _hidden(encoder, refs, "norm")
        rms = hidden.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.full_like(rms, 2.0), atol=1e-3)
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)


def test_final_layer_is_causal_by_default_bidirectional_on_request(tiny, encoder, refs):
    _, _, hidden = _hidden(encoder, refs, "causal")

    def outputs(enc, last_token_shift):
        tokens = enc.final_layer.reference_tokens
        saved = tokens.detach().clone()
        try:
            with torch.no_grad():
                tokens[-1] += last_token_shift
            with torch.inference_mode():
                return enc.final(hidden)[0]
        finally:
            with torch.no_grad():
                tokens.copy_(saved)

    a, b = outputs(encoder, 0.0), outputs(encoder, 1.0)
    assert torch.allclose(a[:-1], b[:-1], atol=1e-6), "earlier reference tokens must not see later ones"
    assert not torch.allclose(a[-1], b[-1])

    bi = ReferenceEncoder.from_pretrained(tiny.mllm, load_checkpoint(tiny.adapter), bidirectional_final=True)
    c, d = outputs(bi, 0.0), outputs(bi, 1.0)
    assert not torch.allclose(c[:-1], d[:-1], atol=1e-6)


def test_fine_tuned_mllm_subset_is_loaded_with_a_warning(tiny, refs, caplog):
    base = ReferenceEncoder.from_pretrained(tiny.mllm, load_checkpoint(tiny.adapter_lora))
    tuned_ckpt = load_checkpoint(tiny.adapter_mllm)
    assert tuned_ckpt.mllm and all(k.startswith(("model.visual.", "model.language_model.")) for k in tuned_ckpt.mllm)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        tuned = ReferenceEncoder.from_pretrained(tiny.mllm, tuned_ckpt)
    assert not torch.allclose(base.encode(refs, "x"), tuned.encode(refs, "x"))
    [warning] = [r for r in caplog.records if "partial" in r.getMessage()]
    assert f"({len(tuned_ckpt.mllm)} of " in warning.getMessage()


def test_reduced_precision_runs(tiny, refs):
    enc = ReferenceEncoder.from_pretrained(tiny.mllm, load_checkpoint(tiny.adapter), dtype=torch.bfloat16)
    out = enc.encode(refs, "x")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
