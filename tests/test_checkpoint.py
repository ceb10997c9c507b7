"""Official checkpoint layouts: loading, strictness, key mapping, saving."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyref_cli.errors import CheckpointError
from easyref_cli.model import checkpoint as ck


def _unet(tiny):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny.base_model, subfolder="unet")


def _attn2_names(unet):
    return [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]


def test_adapter_only_checkpoint_splits_by_role(tiny):
    c = ck.load_checkpoint(tiny.adapter)
    unet = _unet(tiny)
    assert set(c.ip) == set(_attn2_names(unet))
    assert not c.has_lora and not c.mllm
    assert c.num_tokens == 64 and c.cross_attention_dim == unet.config.cross_attention_dim
    assert len(c.sha256) == 64
    c.check_unet(unet)


def test_lora_checkpoint_has_rank_and_all_layers(tiny):
    c = ck.load_checkpoint(tiny.adapter_lora)
    unet = _unet(tiny)
    assert c.lora_rank == 4
    assert set(c.lora) == {n[: -len(".processor")] for n in unet.attn_processors}
    c.check_unet(unet)


def test_missing_to_k_ip_is_named(tiny, tmp_path):
    sd = load_file(str(tiny.adapter))
    victim = sorted(k for k in sd if k.startswith("unet.") and k.endswith("to_k_ip.weight"))[1]
    del sd[victim]
    bad = tmp_path / "missing.safetensors"
    save_file(sd, str(bad))
    c = ck.load_checkpoint(bad)
    with pytest.raises(CheckpointError) as err:
        c.check_unet(_unet(tiny))
    assert victim in str(err.value)


def test_partial_lora_is_rejected(tiny, tmp_path):
    sd = load_file(str(tiny.adapter_lora))
    victim = sorted(k for k in sd if k.startswith("unet.") and "to_out_lora.up" in k)[0]
    del sd[victim]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="all-or-nothing") as err:
        ck.load_checkpoint(tmp_path / "partial.safetensors").check_unet(_unet(tiny))
    assert victim in str(err.value)


def test_misshaped_adapter_weight_is_named(tiny, tmp_path):
    sd = load_file(str(tiny.adapter))
    victim = sorted(k for k in sd if k.startswith("unet.") and k.endswith("to_v_ip.weight"))[0]
    sd[victim] = torch.zeros(3, 5)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError) as err:
        ck.load_checkpoint(tmp_path / "shape.safetensors").check_unet(_unet(tiny))
    assert victim in str(err.value) and "(3, 5)" in str(err.value)


def test_misshaped_final_layer_is_named(tiny, tmp_path):
    from transformers import AutoConfig

    from easyref_cli.model.encoder import FinalLayer, ReferenceProjector

    sd = load_file(str(tiny.adapter))
    sd["mllm_final_layer.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 7)
    save_file(sd, str(tmp_path / "final.safetensors"))
    c = ck.load_checkpoint(tmp_path / "final.safetensors")
    tcfg = AutoConfig.from_pretrained(tiny.mllm).text_config
    with pytest.raises(CheckpointError, match=r"mllm_final_layer\.layers\.0\.mlp\.up_proj\.weight \(7, 7\)"):
        c.apply_encoder(FinalLayer(tcfg), ReferenceProjector(tcfg.hidden_size, c.cross_attention_dim))


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "cannot read"), (b"\x00" * 100, "cannot read"), (b"not a checkpoint at all", "cannot read")],
)
def test_corrupt_safetensors(tmp_path, content, match):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        ck.load_checkpoint(bad)


def test_truncated_safetensors(tiny, tmp_path):
    data = tiny.adapter.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        ck.load_checkpoint(bad)


def test_missing_file_and_wrong_model(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope.safetensors")
    save_file({"some.other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an EasyRef checkpoint"):
        ck.load_checkpoint(tmp_path / "other.safetensors")


def test_deepspeed_pt_loads_with_weights_only(tiny, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    c = ck.load_checkpoint(tiny.adapter_deepspeed)
    assert calls == [True]
    ref = ck.load_checkpoint(tiny.adapter_lora)
    assert set(c.state_dict()) == set(ref.state_dict())


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"module": {"x": Evil()}}, str(path))
    with pytest.raises(CheckpointError, match="weights_only"):
        ck.load_checkpoint(path)


def test_adapter_modules_duplicates_are_ignored(tiny):
    raw = load_file(str(tiny.adapter_lora))
    assert any(k.startswith("adapter_modules.") for k in raw)
    assert not any(k.startswith("adapter_modules.") for k in ck.load_checkpoint(tiny.adapter_lora).state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_round_trip_in_official_names(tiny, tmp_path, suffix):
    c = ck.load_checkpoint(tiny.adapter_mllm)
    out = ck.save_checkpoint(c, tmp_path / f"rt{suffix}")
    raw = load_file(str(tiny.adapter_mllm))
    saved = ck.read_state_dict(out)
    official = {
        k: v for k, v in raw.items() if not k.startswith("adapter_modules.") and k != "multimodal_llm.lm_head.weight"
    }
    assert set(saved) == set(official)  # same official (transformers-4.45) key names
    assert all(torch.equal(saved[k], official[k]) for k in official)


def test_mllm_key_mapping_both_ways():
    old = {
        "visual.blocks.0.attn.qkv.weight": 1,
        "model.layers.0.mlp.up_proj.weight": 2,
        "model.norm.weight": 3,
        "lm_head.weight": 4,
    }
    new = ck.mllm_keys_445_to_5(old)
    assert set(new) == {
        "model.visual.blocks.0.attn.qkv.weight",
        "model.language_model.layers.0.mlp.up_proj.weight",
        "model.language_model.norm.weight",
        "lm_head.weight",
    }
    assert ck.mllm_keys_5_to_445(new) == old
    assert ck.mllm_keys_445_to_5(new) == new  # already-new names pass through


def test_full_unet_weights_override_the_base_model_with_a_warning(tiny, tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    from easyref_cli.model.pipeline import EasyRefPipeline

    state = load_file(str(tiny.adapter_lora))
    unet = _unet(tiny)
    key = "conv_in.weight"
    state[f"unet.{key}"] = torch.full_like(unet.state_dict()[key], 0.5)
    path = tmp_path / "with_unet.safetensors"
    save_file(state, str(path))
    with caplog.at_level("WARNING"):
        pipe = EasyRefPipeline.from_pretrained(tiny.base_model, tiny.mllm, path, device="cpu")
    assert torch.equal(pipe.sdxl.unet.state_dict()[key], state[f"unet.{key}"])
    assert any(
        "1 full UNet tensors" in r.getMessage() and "replace the base model" in r.getMessage() for r in caplog.records
    )
