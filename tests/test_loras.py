"""Community SDXL LoRAs (``--lora FILE[:WEIGHT]``): ``easyref_cli.model.loras`` on the tiny SDXL.

The LoRA files are written here by hand, in the two layouts found in the wild: diffusers/peft
(``unet.<module>.lora_A.weight`` + the ``lora_adapter_metadata`` header diffusers' trainers write)
and kohya (sgm block names ``lora_unet_input_blocks_4_1_…``, ``alpha`` keys, conv LoCon layers with
their own alpha). The reference is diffusers' own ``load_lora_weights`` + ``fuse_lora(lora_scale=w)``,
which needs peft (a test dependency only: the product fuses without it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from easyref_cli.cli import app
from easyref_cli.errors import ModelError
from easyref_cli.model import loras as loras_mod
from easyref_cli.testing import make_reference_images, tiny_cli_args

cli = CliRunner()

# ----------------------------------------------------------------------------------------------
# LoRA files for the tiny SDXL
# ----------------------------------------------------------------------------------------------

#: kohya (sgm) name → diffusers UNet module, Linear layers
UNET_LINEAR = {
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_out_0": (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    ),
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_v": "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_v",
    "middle_block_1_transformer_blocks_0_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "middle_block_1_transformer_blocks_1_ff_net_2": "mid_block.attentions.0.transformer_blocks.1.ff.net.2",
    "output_blocks_1_1_transformer_blocks_0_attn2_to_q": "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q",
    "output_blocks_2_1_proj_out": "up_blocks.0.attentions.2.proj_out",
    "input_blocks_4_0_emb_layers_1": "down_blocks.1.resnets.0.time_emb_proj",
}
#: kohya (sgm) name → diffusers UNet module, Conv2d layers (LoCon: k×k down, 1×1 up)
UNET_CONV = {
    "input_blocks_4_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "output_blocks_3_0_out_layers_3": "up_blocks.1.resnets.0.conv2",
}
#: CLIP layers, in the classic ``text_model.`` naming of both encoders
TE1 = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj",
       "encoder.layers.0.self_attn.v_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.3.mlp.fc1"]  # fmt: skip
TE2 = ["encoder.layers.1.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.4.mlp.fc2"]


def _plain(tiny):
    """A fresh plain float32 SDXL pipeline of the tiny base model."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.base_model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _factors(module: torch.nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(down, up)`` for a Linear or Conv2d, large enough to change the output visibly."""
    out_dim, in_dim, *kernel = module.weight.shape
    fan_in = in_dim * int(np.prod(kernel or [1]))
    down = torch.randn((rank, in_dim, *kernel), generator=g) * fan_in**-0.5
    up = torch.randn((out_dim, rank, *([1, 1] if kernel else [])), generator=g) * 0.2
    return down, up


def _layers(pipe, seed: int) -> list[tuple[str, str, str, torch.Tensor, torch.Tensor, float, int]]:
    """``(component, diffusers module, kohya name, down, up, alpha, rank)`` of one test LoRA: linear
    layers rank 4 / alpha 2, conv layers rank 2 / alpha 1 (kohya's network and conv alphas)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for kohya, name in UNET_LINEAR.items():
        out.append(("unet", name, f"lora_unet_{kohya}", *_factors(pipe.unet.get_submodule(name), 4, g), 2.0, 4))
    for kohya, name in UNET_CONV.items():
        out.append(("unet", name, f"lora_unet_{kohya}", *_factors(pipe.unet.get_submodule(name), 2, g), 1.0, 2))
    for component, names, prefix in (("text_encoder", TE1, "lora_te1"), ("text_encoder_2", TE2, "lora_te2")):
        model = getattr(pipe, component)
        for name in names:
            module = model.get_submodule(name if not hasattr(model, "text_model") else f"text_model.{name}")
            kohya = f"{prefix}_text_model_{name.replace('.', '_')}"
            out.append((component, f"text_model.{name}", kohya, *_factors(module, 4, g), 2.0, 4))
    return out


def write_kohya(path: Path, layers) -> Path:
    state = {}
    for _component, _name, kohya, down, up, alpha, _rank in layers:
        state[f"{kohya}.lora_down.weight"] = down.contiguous()
        state[f"{kohya}.lora_up.weight"] = up.contiguous()
        state[f"{kohya}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_diffusers(path: Path, layers, *, rank: int = 4, lora_alpha: float | None = 8.0) -> Path:
    """peft keys under each component, and the metadata header diffusers' trainers write (scaling
    ``lora_alpha / r``; ``None``: no header, as older files, scaling 1); the conv layers are left out
    (diffusers' own trainers adapt attention only)."""
    state, config = {}, {}
    for component, name, _kohya, down, up, _alpha, r in layers:
        if r != rank:
            continue
        state[f"{component}.{name}.lora_A.weight"] = down.contiguous()
        state[f"{component}.{name}.lora_B.weight"] = up.contiguous()
        config.update({f"{component}.r": rank, f"{component}.lora_alpha": lora_alpha})
        targets = config.setdefault(f"{component}.target_modules", [])
        targets.append(name.removeprefix("text_model."))  # peft matches name suffixes
    header = {"format": "pt"} if lora_alpha is None else {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    save_file(state, str(path), metadata=header)
    return path


@pytest.fixture(scope="module")
def lora_files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    pipe = _plain(tiny)
    layers, other = _layers(pipe, seed=1), _layers(pipe, seed=2)
    files = {
        "kohya": write_kohya(root / "style_kohya.safetensors", layers),
        "diffusers": write_diffusers(root / "style_diffusers.safetensors", other),
        "other": write_kohya(root / "other.safetensors", other),
        "no-metadata": write_diffusers(root / "old_diffusers.safetensors", layers, lora_alpha=None),
    }
    # SD 1.5: 320-wide first block with attention, 768-wide cross-attention
    g = torch.Generator().manual_seed(3)
    sd15 = {}
    for kohya, out_dim, in_dim in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 640, 768),
    ):
        sd15[f"{kohya}.lora_down.weight"] = torch.randn(4, in_dim, generator=g)
        sd15[f"{kohya}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g)
        sd15[f"{kohya}.alpha"] = torch.tensor(4.0)
    save_file(sd15, str(root / "sd15_style.safetensors"))
    files["sd15"] = root / "sd15_style.safetensors"
    broken = root / "broken_style.safetensors"
    broken.write_bytes(files["kohya"].read_bytes()[:300])
    files["broken"] = broken
    down, up = _factors(pipe.unet.get_submodule(UNET_LINEAR["input_blocks_4_1_proj_in"]), 4, g)
    save_file(
        {
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": down,
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": up,
            "lora_unet_input_blocks_4_1_proj_in.dora_scale": torch.ones(1, 64),
        },
        str(root / "dora_style.safetensors"),
    )
    files["dora"] = root / "dora_style.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(root / "flux_style.safetensors"))  # fmt: skip
    files["flux"] = root / "flux_style.safetensors"
    return {"files": files, "layers": layers, "other": other, "unet_config": pipe.unet.config}


# ----------------------------------------------------------------------------------------------
# Parity with diffusers' load_lora_weights + fuse_lora
# ----------------------------------------------------------------------------------------------

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def _image(pipe) -> np.ndarray:
    return pipe(
        "a watercolor lighthouse",
        num_inference_steps=2,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]


def _diffusers_fused(tiny, loras):
    pipe = _plain(tiny)
    for i, (path, weight) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        pipe.fuse_lora(lora_scale=weight, adapter_names=[f"lora{i}"])
        pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
    return pipe


@pytest.mark.parametrize(
    "names",
    [pytest.param([("kohya", 0.7)], id="kohya"), pytest.param([("diffusers", 1.3)], id="diffusers"),
     pytest.param([("no-metadata", 0.8)], id="diffusers-without-metadata"),
     pytest.param([("kohya", 0.6), ("diffusers", -0.5)], id="two-in-sequence")],
)  # fmt: skip
def test_fusion_matches_diffusers(tiny, lora_files, names):
    pytest.importorskip("peft")
    loras = [(lora_files["files"][name], weight) for name, weight in names]
    plain = _weights(_plain(tiny))
    ours = _plain(tiny)
    fused = loras_mod.fuse_loras(ours, loras)
    theirs = _diffusers_fused(tiny, loras)

    a, b = _weights(ours), _weights(theirs)
    assert a.keys() == b.keys() == plain.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    changed = {k for k in a if not torch.equal(a[k], plain[k])}
    assert diff < 1e-6, diff
    assert fused >= len(changed) > 0 and {k.split(".")[0] for k in changed} == set(COMPONENTS)
    pixels = float(np.abs(_image(ours) - _image(theirs)).max())
    assert pixels < 1e-5, pixels
    print(f"max |ours - diffusers|: weights {diff:.2e}, pixels {pixels:.2e}")
    assert float(np.abs(_image(ours) - _image(_plain(tiny))).max()) > 1e-3  # the LoRA does change the image


def test_fused_values_follow_alpha_over_rank(tiny, lora_files):
    """Independent of diffusers: W + weight × alpha/rank × up @ down, per module (conv alpha 1/rank 2,
    linear alpha 2/rank 4), the text encoders included."""
    pipe = _plain(tiny)
    plain = _weights(pipe)
    loras_mod.fuse_loras(pipe, [(lora_files["files"]["kohya"], 0.7)])
    after = _weights(pipe)
    for component, name, _kohya, down, up, alpha, rank in lora_files["layers"]:
        model = getattr(pipe, component)
        key = f"{component}.{name if hasattr(model, 'text_model') else name.removeprefix('text_model.')}.weight"
        delta = (up.flatten(1) @ down.flatten(1)).reshape(plain[key].shape)
        torch.testing.assert_close(after[key], plain[key] + 0.7 * alpha / rank * delta, atol=1e-6, rtol=0)


def test_fusion_keeps_the_layer_dtype(tiny, lora_files):
    pipe = _plain(tiny).to(torch.float16)
    loras_mod.fuse_loras(pipe, [(lora_files["files"]["kohya"], 1.0)])
    assert {p.dtype for c in COMPONENTS for p in getattr(pipe, c).parameters()} == {torch.float16}


# ----------------------------------------------------------------------------------------------
# Composition with EasyRef's own LoRA
# ----------------------------------------------------------------------------------------------


def test_easyref_lora_first_then_community_lora(tiny, lora_files):
    from easyref_cli.model.checkpoint import load_checkpoint
    from easyref_cli.model.pipeline import EasyRefPipeline

    weight = 0.7
    pipe = EasyRefPipeline.from_pretrained(
        tiny.base_model, tiny.mllm, tiny.adapter_lora, device="cpu", loras=[(lora_files["files"]["kohya"], weight)]
    )
    expected = {k: v.float() for k, v in _plain(tiny).unet.state_dict().items()}
    for attn_path, kinds in load_checkpoint(tiny.adapter_lora).lora.items():  # 1. EasyRef's LoRA, scale 1
        for kind, parts in kinds.items():
            key = f"{attn_path}.{'to_out.0' if kind == 'to_out' else kind}.weight"
            expected[key] = expected[key] + parts["up"].float() @ parts["down"].float()
    community = 0
    for component, name, _kohya, down, up, alpha, rank in lora_files["layers"]:  # 2. the community LoRA
        if component == "unet":
            key = f"{name}.weight"
            delta = (up.flatten(1) @ down.flatten(1)).reshape(expected[key].shape)
            expected[key] = expected[key] + weight * alpha / rank * delta
            community += 1
    assert community == len(UNET_LINEAR) + len(UNET_CONV)
    got = pipe.sdxl.unet.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


# ----------------------------------------------------------------------------------------------
# Bad files: named, ModelError, before any work
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("sd15", "is not an SDXL LoRA for this base"),
        ("broken", "LoRA: cannot read"),
        ("dora", "DoRA files are not supported"),
        ("flux", "is not an SDXL LoRA for this base"),
    ],
)
def test_check_loras_names_the_bad_file(tiny, lora_files, name, fragment):
    path = lora_files["files"][name]
    with pytest.raises(ModelError, match=fragment) as info:
        loras_mod.check_loras(tiny.base_model, None, [(lora_files["files"]["kohya"], 1.0), (path, 0.8)])
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_sd15_lora_says_which_layers_do_not_fit(tiny, lora_files):
    with pytest.raises(ModelError) as info:
        loras_mod.check_loras(tiny.base_model, None, [(lora_files["files"]["sd15"], 1.0)])
    message = str(info.value)
    assert "no such layer: unet.down_blocks.0.attentions.0" in message
    assert "shape mismatch: unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v" in message


def test_check_loras_accepts_good_files_and_reads_a_single_file_base_config(tiny, lora_files, tmp_path):
    files = lora_files["files"]
    loras_mod.check_loras(tiny.base_model, None, [(files["kohya"], 0.7), (files["diffusers"], 1.0)])
    single = tmp_path / "base.safetensors"  # a single-file base: shapes come from --base-config
    single.write_bytes(b"not read by the check")
    loras_mod.check_loras(single, tiny.base_model, [(files["kohya"], 0.7)])
    with pytest.raises(ModelError, match="is not an SDXL LoRA"):
        loras_mod.check_loras(single, tiny.base_model, [(files["sd15"], 0.7)])


def test_fuse_loras_checks_every_file_before_touching_weights(tiny, lora_files):
    pipe = _plain(tiny)
    before = _weights(pipe)
    with pytest.raises(ModelError, match="sd15_style"):
        loras_mod.fuse_loras(pipe, [(lora_files["files"]["kohya"], 1.0), (lora_files["files"]["sd15"], 1.0)])
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reading_needs_no_peft(lora_files, monkeypatch):
    """The product reads and converts LoRAs without peft (not a dependency): hide it, read both formats."""
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    for name in ("kohya", "diffusers"):
        layers = loras_mod.read_lora(lora_files["files"][name], lora_files["unet_config"])
        assert {layer.component for layer in layers} == set(COMPONENTS)
    with pytest.raises(ImportError):
        import peft  # noqa: F401


# ----------------------------------------------------------------------------------------------
# End to end: easyref generate --lora
# ----------------------------------------------------------------------------------------------


def _model_args(tiny) -> list[str]:
    return tiny_cli_args(tiny)


def _generate(tiny, *args):
    return cli.invoke(app, ["generate", *map(str, args), *_model_args(tiny), "-q"], catch_exceptions=False)


def _png(out: Path) -> Path:
    (png,) = sorted(out.rglob("*.png"))
    return png


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _record(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["easyref"])


@pytest.fixture
def group(tmp_path) -> Path:
    folder = tmp_path / "groups" / "cats"
    make_reference_images(folder, n=2, size=(64, 48))
    return folder.parent


def test_generate_with_lora_changes_pixels_records_resumes_and_clashes(tiny, lora_files, group, tmp_path):
    files = lora_files["files"]
    lora = tmp_path / "style.safetensors"
    shutil.copy(files["kohya"], lora)
    cmd = (group, "--prompt", "a cat", "--cache-dir", tmp_path / "cache")

    res = _generate(tiny, *cmd, "-o", tmp_path / "plain")
    assert res.exit_code == 0, res.output
    res = _generate(tiny, *cmd, "-o", tmp_path / "out", "--lora", f"{lora}:0.7")
    assert res.exit_code == 0, res.output
    png = _png(tmp_path / "out")
    assert np.abs(_pixels(png) - _pixels(_png(tmp_path / "plain"))).max() > 0

    import hashlib

    (entry,) = _record(png)["loras"]
    assert entry["weight"] == 0.7 and Path(entry["path"]).name == "style.safetensors"
    assert entry["content"] == "sha256:" + hashlib.sha256(lora.read_bytes()).hexdigest()

    mtime = png.stat().st_mtime_ns
    res = _generate(tiny, *cmd, "-o", tmp_path / "out", "--lora", f"{lora}:0.7")
    assert res.exit_code == 0, res.output
    assert png.stat().st_mtime_ns == mtime  # resumed: skipped, not regenerated

    res = _generate(tiny, *cmd, "-o", tmp_path / "out", "--lora", files["other"])
    assert res.exit_code == 2, res.output
    assert "made with other settings" in res.output
    assert png.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("name", "fragment"), [("sd15", "is not an SDXL LoRA for this base"), ("broken", "LoRA: cannot read")]
)
def test_generate_refuses_a_bad_lora_before_encoding(tiny, lora_files, group, tmp_path, monkeypatch, name, fragment):
    from easyref_cli.model.encoder import ReferenceEncoder

    def boom(*_args, **_kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(ReferenceEncoder, "from_pretrained", boom)
    monkeypatch.setattr(ReferenceEncoder, "encode", boom)
    path = lora_files["files"][name]
    res = _generate(tiny, group, "--prompt", "a cat", "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache",
                    "--lora", f"{path}:0.8")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert path.name in res.output and fragment in res.output
    assert not list((tmp_path / "out").rglob("*.png"))


def test_replay_of_an_image_made_with_a_lora_finds_it_and_checks_its_content(tiny, lora_files, group, tmp_path):
    files = lora_files["files"]
    lora = tmp_path / "style.safetensors"
    shutil.copy(files["kohya"], lora)
    res = _generate(tiny, group, "--prompt", "a cat", "-o", tmp_path / "out", "--lora", f"{lora}:0.7")
    assert res.exit_code == 0, res.output
    png = _png(tmp_path / "out")
    models = ["--base-model", tiny.base_model, "--mllm", tiny.mllm, "--adapter", tiny.adapter_lora]
    replay = ["generate", "--from-image", png, "--groups-root", group, *map(str, models), "-q"]

    def run(*extra):
        return cli.invoke(app, [*map(str, replay), *map(str, extra)], catch_exceptions=False)

    res = run("-o", tmp_path / "nowhere")  # the record names the LoRA by file name only
    assert res.exit_code == 2 and "LoRA 'style.safetensors' without its location" in res.output, res.output
    res = run("-o", tmp_path / "other", "--lora", f"{files['other']}:0.7")  # another file: refused
    assert res.exit_code == 2 and "loras had other content" in res.output, res.output
    res = run("-o", tmp_path / "again", "--lora", f"{lora}:0.7")
    assert res.exit_code == 0, res.output
    assert np.array_equal(_pixels(_png(tmp_path / "again")), _pixels(png))
