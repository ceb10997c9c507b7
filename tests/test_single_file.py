"""Single-file SDXL checkpoints (``--base-model FILE --base-config DIR``) and ``--vae``, on the tiny models.

diffusers reads single files but writes none, so :func:`write_single_file` writes the tiny pipeline in
the original SGM / A1111 layout by inverting the conversions ``from_single_file`` applies
(``diffusers.loaders.single_file_utils``); :func:`test_the_writer_inverts_diffusers_conversions` checks
that inversion, :func:`test_full_size_sdxl_keys_are_the_real_layout` that the names are real SDXL's.
Pixels are compared with the weights copied to aligned memory (:func:`_realign`): on the CPU, equal
weights memory-mapped from two different files can round differently by ~1e-7.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from easyref_cli.cli import app
from easyref_cli.constants import DEFAULT_BASE_MODEL
from easyref_cli.errors import ModelError
from easyref_cli.model import single_file
from easyref_cli.model.pipeline import load_sdxl
from easyref_cli.testing import make_reference_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# ----------------------------------------------------------------------------------------------
# A single-file writer: diffusers state dicts → original SGM key layout
# ----------------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP = {
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _unet_name(key: str, sd: dict, per: int) -> str:
    """``down_blocks.B.resnets.J`` → ``input_blocks.N.0`` etc. (``per``: layers per block + 1)."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        kind, b, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if part == "downsamplers":
            return f"input_blocks.{(b + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        if part == "upsamplers":
            has_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
            return f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.{rest}"
        index = 1 + b * per + j if kind == "down" else b * per + j
        block = f"{'input' if kind == 'down' else 'output'}_blocks.{index}.{0 if part == 'resnets' else 1}"
    else:
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        part, j, rest = m[1], int(m[2]), m[3]
        block = f"middle_block.{2 * j if part == 'resnets' else 1}"
    if part == "resnets":
        head, _, tail = rest.partition(".")
        rest = f"{_RESNET[head]}.{tail}"
    return f"{block}.{rest}"


def unet_to_sgm(sd: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAPPING

    direct = {**MAPPING["unet"]["layers"], **MAPPING["unet"]["addition_embed_type"]}
    per = config["layers_per_block"] + 1
    return {"model.diffusion_model." + (direct[k] if k in direct else _unet_name(k, sd, per)): v for k, v in sd.items()}


def vae_to_sgm(sd: dict, config, prefix: str = "first_stage_model.") -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAPPING

    n_up = len(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        if key in MAPPING["vae"]:
            out[prefix + MAPPING["vae"][key]] = value
            continue
        side, _, rest = key.partition(".")
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
        if m:
            kind, i, part, j, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
            block = f"{kind}.{i if kind == 'down' else n_up - 1 - i}"
            name = (
                f"{block}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
                if part == "resnets"
                else f"{block}.{kind}sample.{tail}"
            )
        else:
            m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest)
            part, j, tail = m[1], int(m[2]), m[3]
            if part == "resnets":
                name = f"mid.block_{j + 1}.{tail}"
            else:  # 1x1 convolutions in the original
                module, _, param = tail.rpartition(".")
                name = f"mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
                value = value[:, :, None, None] if value.ndim == 2 else value
        out[f"{prefix}{side}.{name}"] = value
    return out


def clip_to_sgm(sd: dict) -> dict:
    return {single_file.CLIP_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def open_clip_to_sgm(sd: dict) -> dict:
    p, out, qkv = single_file.OPEN_CLIP_PREFIX, {}, {}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out[p + "text_projection"] = value.T.contiguous()
            continue
        key = key.removeprefix("text_model.")
        if key in _OPEN_CLIP:
            out[p + _OPEN_CLIP[key]] = value
            continue
        i, rest = re.match(r"encoder\.layers\.(\d+)\.(.*)", key).groups()
        q = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if q:
            qkv.setdefault((i, q[2]), {})[q[1]] = value
            continue
        for new, old in (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
            rest = rest.replace(new, old)
        out[f"{p}transformer.resblocks.{i}.{rest}"] = value
    for (i, kind), parts in qkv.items():
        out[f"{p}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def sgm_state_dict(pipe, *, vae: bool = True) -> dict:
    sd = {**unet_to_sgm(pipe.unet.state_dict(), pipe.unet.config)}
    if vae:
        sd.update(vae_to_sgm(pipe.vae.state_dict(), pipe.vae.config))
    sd.update(clip_to_sgm(pipe.text_encoder.state_dict()))
    sd.update(open_clip_to_sgm(pipe.text_encoder_2.state_dict()))
    return sd


def write_single_file(folder: Path, path: Path, *, vae: bool = True) -> Path:
    """The diffusers SDXL ``folder`` as one A1111/ComfyUI-style file (``.safetensors``, or a ``.ckpt`` holding
    ``{"state_dict": ...}`` as the original SGM checkpoints do)."""
    from diffusers import StableDiffusionXLPipeline

    sd = {
        k: v.contiguous() for k, v in sgm_state_dict(StableDiffusionXLPipeline.from_pretrained(folder), vae=vae).items()
    }
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1}, path)
    return path


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny SDXL as single files, a modified VAE (decoder output scaled, ``force_upcast: false``) as a
    folder and as an original-layout file, and a copy of the SDXL folder with that VAE as its own."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("single_file")
    vae = AutoencoderKL.from_pretrained(tiny.base_model, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
        vae.decoder.conv_out.bias.add_(0.25)
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(root / "vae_fp16fix")
    (root / "vae_file").mkdir()
    save_file({k: v.contiguous() for k, v in vae_to_sgm(vae.state_dict(), vae.config, "").items()},
              str(root / "vae_file" / "sdxl_vae.safetensors"))  # fmt: skip
    with_vae = shutil.copytree(tiny.base_model, root / "sdxl_with_vae")
    shutil.rmtree(with_vae / "vae")
    shutil.copytree(root / "vae_fp16fix", with_vae / "vae")
    return {
        "safetensors": write_single_file(tiny.base_model, root / "tiny_sdxl.safetensors"),
        "ckpt": write_single_file(tiny.base_model, root / "tiny_sdxl.ckpt"),
        "no_vae": write_single_file(tiny.base_model, root / "tiny_sdxl_no_vae.safetensors", vae=False),
        "vae_folder": root / "vae_fp16fix",
        "vae_file": root / "vae_file" / "sdxl_vae.safetensors",
        "with_vae": with_vae,
        "root": root,
    }


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding nothing (read by ``snapshot_download`` at call time)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _reference(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def _assert_same_components(pipe, reference) -> None:
    for name in COMPONENTS:
        ours, theirs = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert dict(pipe.scheduler.config) == dict(reference.scheduler.config)
    assert pipe.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert pipe.tokenizer_2.pad_token == reference.tokenizer_2.pad_token


# ----------------------------------------------------------------------------------------------
# The writer, and the real SDXL layout
# ----------------------------------------------------------------------------------------------


def test_the_writer_inverts_diffusers_conversions(tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    pipe = _reference(tiny.base_model)
    sd = sgm_state_dict(pipe)
    for name, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        module = getattr(pipe, name)
        back = convert(sd, module.config)
        assert back.keys() == module.state_dict().keys()
        assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in module.state_dict().items())


def test_full_size_sdxl_keys_are_the_real_layout():
    """The writer on SDXL-base-1.0-shaped modules (meta device: names and shapes only) gives what diffusers
    recognises as SDXL base, and the header check accepts it with no workaround (768 vs 1280 wide)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench._common import SDXL_SHAPES

    shapes = SDXL_SHAPES["full"]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**shapes["unet"]), AutoencoderKL(**shapes["vae"])
        te = CLIPTextModel(CLIPTextConfig(**shapes["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**shapes["text_encoder_2"]))
    pipe = type("Pipe", (), {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2})
    sd = sgm_state_dict(pipe)
    assert infer_diffusers_model_type(sd) == "xl_base"
    header = {k: list(v.shape) for k, v in sd.items()}
    assert single_file.sdxl_layout_problem(header) is None
    assert header[single_file.CLIP_WIDTH_KEY][-1] == 768 and header[single_file.OPEN_CLIP_WIDTH_KEY][-1] == 1280
    assert header["model.diffusion_model.input_blocks.4.1.proj_in.weight"] == [640, 640]  # transformer block


# ----------------------------------------------------------------------------------------------
# Loading a single file
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_single_file_loads_the_folders_weights(tiny, files, kind):
    pipe = load_sdxl(files[kind], torch.float32, config=tiny.base_model)
    _assert_same_components(pipe, _reference(tiny.base_model))
    assert pipe.config.force_zeros_for_empty_prompt == _reference(tiny.base_model).config.force_zeros_for_empty_prompt


def test_text_encoders_of_different_widths_take_diffusers_own_path(tiny, tmp_path):
    """Real SDXL's encoders differ in width (768 and 1280), which is how diffusers tells them apart; the
    tiny ones share one, where ``text_encoder_2`` is loaded by its prefix instead. Here: 32 and 48 wide."""
    import copy

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    tiny_pipe = _reference(tiny.base_model)
    te2_config = copy.deepcopy(tiny_pipe.text_encoder_2.config)
    te2_config.hidden_size = te2_config.projection_dim = 48
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(
        {**tiny_pipe.unet.config, "cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 6 * 8 + 48}
    )
    wide = StableDiffusionXLPipeline(**{**tiny_pipe.components, "unet": unet,
                                        "text_encoder_2": CLIPTextModelWithProjection(te2_config)})  # fmt: skip
    wide.save_pretrained(tmp_path / "wide")
    path = write_single_file(tmp_path / "wide", tmp_path / "wide.safetensors")
    assert single_file.safetensors_shapes(path)[single_file.OPEN_CLIP_WIDTH_KEY][-1] == 48
    _assert_same_components(load_sdxl(path, torch.float32, config=tmp_path / "wide"), _reference(tmp_path / "wide"))


def test_a_file_without_a_vae_takes_the_given_one(tiny, files):
    pipe = load_sdxl(files["no_vae"], torch.float32, config=tiny.base_model, vae=files["vae_folder"])
    assert pipe.vae.config.force_upcast is False
    with pytest.raises(ModelError, match=r"tiny_sdxl_no_vae\.safetensors: an incomplete SDXL checkpoint: no VAE"):
        load_sdxl(files["no_vae"], torch.float32, config=tiny.base_model)


def _fake_cached_default(cache: Path, configs_of: Path) -> Path:
    """The default SDXL repo in a Hugging Face cache, its configs only (as `hf download --include '*.json'`)."""
    repo = cache / f"models--{DEFAULT_BASE_MODEL.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for f in configs_of.rglob("*"):
        if f.is_file() and f.suffix in {".json", ".txt"}:
            (snapshot / f.relative_to(configs_of)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, snapshot / f.relative_to(configs_of))
    return snapshot


def test_without_base_config_the_cached_default_repo_gives_the_configs(tiny, files, empty_hf_cache):
    with pytest.raises(ModelError) as err:
        load_sdxl(files["safetensors"], torch.float32)
    assert "pass --base-config DIR, a diffusers SDXL folder (e.g. stabilityai/stable-diffusion-xl-base-1.0" in str(
        err.value
    )
    assert "whose configs match this checkpoint" in str(err.value) and "tiny_sdxl.safetensors" in str(err.value)
    snapshot = _fake_cached_default(empty_hf_cache, tiny.base_model)
    assert single_file.check_sdxl_sources(files["safetensors"]) == snapshot
    _assert_same_components(load_sdxl(files["safetensors"], torch.float32), _reference(tiny.base_model))


def _write_header_only(path: Path, shapes: dict) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"weight": (2, 2), "bias": (2,)}, "not an SDXL checkpoint in the A1111/ComfyUI single-file layout"),
        ({"lora_unet_down_blocks_0.lora_up.weight": (2, 2)}, "it looks like a LoRA: use --lora"),
        ({"decoder.conv_out.weight": (3, 4, 3, 3)}, "it looks like a VAE: use --vae"),
        ({"cond_stage_model.transformer.x": (1,), "model.diffusion_model.x": (1,)}, "Stable Diffusion 1.x/2.x"),
        ({"conditioner.embedders.0.model.text_projection": (2, 2)}, "an SDXL refiner checkpoint"),
    ],
)
def test_unknown_single_file_layouts_are_refused_by_name(tmp_path, shapes, message):
    path = _write_header_only(tmp_path / "odd.safetensors", shapes)
    with pytest.raises(ModelError, match=re.escape(message)) as err:
        single_file.check_sdxl_sources(path, config=tmp_path)
    assert str(err.value).startswith(f"--base-model {path}: ")


def test_an_inpainting_unet_is_refused(tiny, tmp_path):
    sd = sgm_state_dict(_reference(tiny.base_model))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "inpaint.safetensors"))
    with pytest.raises(ModelError, match="inpainting or edit checkpoint .* 9 input channels"):
        load_sdxl(tmp_path / "inpaint.safetensors", torch.float32, config=tiny.base_model)


def test_mismatched_configs_and_bad_config_folders(tiny, files, tmp_path):
    demo_sdxl = REPO / "easyref_cli" / "demo" / "weights" / "sdxl"  # another tiny SDXL: other shapes
    with pytest.raises(ModelError, match="configs match it") as err:
        load_sdxl(files["safetensors"], torch.float32, config=demo_sdxl)
    assert str(files["safetensors"]) in str(err.value)
    with pytest.raises(ModelError, match=r"--base-config .*: no model_index\.json"):
        load_sdxl(files["safetensors"], torch.float32, config=tmp_path)


def test_the_checks_are_torch_free(files, tiny, tmp_path):
    """:func:`single_file.check_sdxl_sources` is meant for phase 1: headers and configs, no torch."""
    probe = (
        "import sys\n"
        "from easyref_cli.errors import ModelError\n"
        "from easyref_cli.model.single_file import check_sdxl_sources as check\n"
        f"check({str(files['safetensors'])!r}, config={str(tiny.base_model)!r}, vae={str(files['vae_file'])!r})\n"
        "try:\n"
        f"    check({str(files['safetensors'])!r})  # the Hugging Face cache lookup, an empty cache here\n"
        "except ModelError as exc:\n"
        "    assert '--base-config DIR' in str(exc)\n"
        "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules), sorted(sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------------------
# --vae
# ----------------------------------------------------------------------------------------------


def _vae_state(vae) -> dict:
    return {k: v.clone() for k, v in vae.state_dict().items()}


@pytest.mark.parametrize("kind", ["vae_folder", "vae_file", "parent_folder", "diffusers_file"])
def test_vae_sources_load_the_same_weights(tiny, files, kind):
    from diffusers import AutoencoderKL

    source = {
        "vae_folder": files["vae_folder"],
        "vae_file": files["vae_file"],
        "parent_folder": files["with_vae"],  # a folder holding vae/
        "diffusers_file": files["vae_folder"] / "diffusion_pytorch_model.safetensors",  # config.json beside it
    }[kind]
    pipe = load_sdxl(tiny.base_model, torch.float32, vae=source)
    expected = _vae_state(AutoencoderKL.from_pretrained(files["vae_folder"]))
    assert pipe.vae.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in pipe.vae.state_dict().items())
    # a file alone takes the base model's vae/config.json; with its own config.json beside it, that one
    assert pipe.vae.config.force_upcast is (kind == "vae_file")


def test_bad_vae_sources(tiny, files, tmp_path):
    cases = {
        _write_header_only(tmp_path / "not_a_vae.safetensors", {"weight": (2,)}): "no decoder.conv_out weights",
        tmp_path: "neither config.json nor vae/config.json",
        tiny.base_model / "unet": "is a UNet2DConditionModel config, not an AutoencoderKL",
    }
    for source, message in cases.items():
        with pytest.raises(ModelError, match=re.escape(message)) as err:
            load_sdxl(tiny.base_model, torch.float32, vae=source)
        assert str(err.value).startswith(f"--vae {source}: ")


@pytest.mark.parametrize("fp16_safe", [True, False])
def test_force_upcast_decides_the_decode_dtype(tiny, files, fp16_safe):
    """float16 SDXL: the default VAE (``force_upcast`` true) decodes in float32 and goes back to float16;
    an fp16-safe ``--vae`` (``force_upcast: false``) decodes in float16."""
    pipe = load_sdxl(tiny.base_model, torch.float16, vae=files["vae_folder"] if fp16_safe else None)
    assert pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast is (not fp16_safe)
    seen = []
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):
        seen.append((z.dtype, pipe.vae.dtype))
        return decode(z, *args, **kwargs)

    pipe.vae.decode = spy
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a cat", num_inference_steps=1, guidance_scale=1.0, width=16, height=16, output_type="np")
    expected = torch.float16 if fp16_safe else torch.float32
    assert seen == [(expected, expected)]
    assert pipe.vae.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# easyref generate
# ----------------------------------------------------------------------------------------------

cli = CliRunner()


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sf_groups") / "cats"
    make_reference_images(folder, n=2, size=(64, 48))
    return folder


def generate(tiny, group: Path, out: Path, *models):
    res = cli.invoke(app, [str(a) for a in (
        "generate", group, "--prompt", "a lighthouse", "-o", out, "--mllm", tiny.mllm, "--adapter", tiny.adapter_lora,
        "--device", "cpu", "--width", 64, "--height", 64, "--steps", 2, "--seed", 3, "--batch-size", 1, "-q",
        "--cache-dir", out.parent / "cache", *models,
    )], catch_exceptions=False)  # fmt: skip
    return res


def pixels(out: Path) -> np.ndarray:
    (png,) = sorted(out.rglob("*.png"))
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")).copy()


def _realign(pipe) -> None:
    """Copy every weight into fresh memory. On the CPU, MKL/oneDNN kernels round differently (~1e-7)
    depending on where a tensor starts (64-byte alignment), and weights memory-mapped from a safetensors
    file start wherever the file put them: equal weights from two files can then differ by one 8-bit
    level in a pixel. Copied, they start aligned, so equal weights must give equal pixels."""
    for name in COMPONENTS:
        for tensor in getattr(pipe, name).parameters():
            tensor.data = tensor.data.clone()


@pytest.fixture(scope="module")
def runs(tiny, files, group):
    """One image per way of giving the models (same prompt, references, seed), the weights realigned
    (:func:`_realign`), and the folder once more without that."""
    from easyref_cli.model import pipeline

    def load_aligned(*args, **kwargs):
        pipe = load_sdxl(*args, **kwargs)
        _realign(pipe)
        return pipe

    root = files["root"] / "runs"
    results = {"folder_as_loaded": _run(tiny, group, root / "as_loaded", "--base-model", tiny.base_model),
               "single_file_as_loaded": _run(tiny, group, root / "sf_as_loaded", "--base-model", files["safetensors"],
                                             "--base-config", tiny.base_model)}  # fmt: skip
    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline, "load_sdxl", load_aligned)
    vae_folder = files["vae_folder"]
    ways = {
        "folder": ["--base-model", tiny.base_model],
        "single_file": ["--base-model", files["safetensors"], "--base-config", tiny.base_model],
        "vae_folder": ["--base-model", tiny.base_model, "--vae", files["vae_folder"]],
        "vae_file": ["--base-model", tiny.base_model, "--vae", files["vae_file"]],
        # a file without a VAE + --vae
        "single_file_vae": ["--base-model", files["no_vae"], "--base-config", tiny.base_model, "--vae", vae_folder],
        "diffusers_with_vae": ["--base-model", files["with_vae"]],
    }
    try:
        results.update({name: _run(tiny, group, root / name, *models) for name, models in ways.items()})
    finally:
        patch.undo()
    return results


def _run(tiny, group: Path, out: Path, *models) -> np.ndarray:
    res = generate(tiny, group, out, *models)
    assert res.exit_code == 0, (out.name, res.output)
    return pixels(out)


def test_generate_from_a_single_file_gives_the_folders_pixels(runs):
    assert np.array_equal(runs["single_file"], runs["folder"])
    # as loaded (memory-mapped, see _realign): within one 8-bit level
    diff = np.abs(runs["single_file_as_loaded"].astype(int) - runs["folder_as_loaded"].astype(int))
    assert diff.max() <= 1


def test_generate_with_vae_uses_it(runs):
    assert not np.array_equal(runs["vae_folder"], runs["folder"])
    for name in ("vae_folder", "vae_file", "single_file_vae"):
        assert np.array_equal(runs[name], runs["diffusers_with_vae"]), name


def test_generate_refuses_an_unknown_single_file(tiny, group, tmp_path):
    odd = _write_header_only(tmp_path / "random.safetensors", {"weight": (4, 4)})
    res = generate(tiny, group, tmp_path / "out", "--base-model", odd, "--base-config", tiny.base_model)
    assert res.exit_code == 2, res.output
    assert f"--base-model {odd}: not an SDXL checkpoint" in " ".join(res.output.split())
    assert not list((tmp_path / "out").rglob("*.png"))


def test_generate_without_base_config_and_nothing_cached(tiny, files, group, tmp_path, empty_hf_cache):
    res = generate(tiny, group, tmp_path / "out", "--base-model", files["safetensors"])
    assert res.exit_code == 2, res.output
    assert "pass --base-config DIR, a diffusers SDXL folder" in " ".join(res.output.split())
