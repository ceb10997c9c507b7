"""Decoupled cross-attention, LoRA merging and attention-backend selection (DESIGN §2 rules 7–8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from easyref_cli.errors import UsageError
from easyref_cli.model import adapter
from easyref_cli.model.checkpoint import load_checkpoint


def _unet(tiny):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny.base_model, subfolder="unet").eval()


def _inputs(unet, num_tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77 + num_tokens, cross, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).float(),
        },
    )


class _Lora(nn.Module):
    def __init__(self, down, up):
        super().__init__()
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down.weight.data.copy_(down)
        self.up.weight.data.copy_(up)

    def forward(self, x):
        return self.up(self.down(x))


class OfficialLoRAProcessor(nn.Module):
    """The official LoRA(IP)AttnProcessor2_0 semantics: LoRA applied on the fly, scale 1, no alpha."""

    def __init__(self, lora_parts, ip=None, num_tokens=64, scale=1.0):
        super().__init__()
        self.lora = nn.ModuleDict({k: _Lora(v["down"], v["up"]) for k, v in lora_parts.items()})
        self.ip, self.num_tokens, self.scale = ip, num_tokens, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states) + self.lora["to_q"](hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ip_ctx = None
        if self.ip is not None:
            ctx, ip_ctx = ctx[:, : -self.num_tokens], ctx[:, -self.num_tokens :]
        k = attn.to_k(ctx) + self.lora["to_k"](ctx)
        v = attn.to_v(ctx) + self.lora["to_v"](ctx)
        h = attn.heads
        sh = lambda x: x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(sh(q), sh(k), sh(v))
        if ip_ctx is not None:
            ik = F.linear(ip_ctx, self.ip["to_k_ip"])
            iv = F.linear(ip_ctx, self.ip["to_v_ip"])
            out = out + self.scale * F.scaled_dot_product_attention(sh(q), sh(ik), sh(iv))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out) + self.lora["to_out"](out))


def test_merged_lora_equals_lora_on_the_fly(tiny):
    ckpt = load_checkpoint(tiny.adapter_lora)
    assert ckpt.has_lora
    reference = _unet(tiny)
    procs = {}
    for name in reference.attn_processors:
        path = name[: -len(".processor")]
        ip = ckpt.ip.get(path) if path.endswith("attn2") else None
        procs[name] = OfficialLoRAProcessor(ckpt.lora[path], ip=ip)
    reference.set_attn_processor(procs)

    merged = _unet(tiny)
    ckpt.check_unet(merged)
    assert adapter.merge_lora(merged, ckpt.lora) == 4 * len(list(merged.attn_processors))
    adapter.install_adapter(merged, ckpt.ip, num_tokens=64, cross_attention_dim=ckpt.cross_attention_dim)

    inputs = _inputs(merged)
    with torch.no_grad():
        a = reference(**inputs).sample
        b = merged(**inputs).sample
    assert (a - b).abs().max().item() < 1e-4
    # and the LoRA matters at all
    plain = _unet(tiny)
    adapter.install_adapter(plain, ckpt.ip, num_tokens=64, cross_attention_dim=ckpt.cross_attention_dim)
    with torch.no_grad():
        assert (plain(**inputs).sample - b).abs().max().item() > 1e-3


def test_scale_zero_is_the_text_only_unet(tiny):
    ckpt = load_checkpoint(tiny.adapter)
    base = _unet(tiny)
    unet = _unet(tiny)
    adapter.install_adapter(unet, ckpt.ip, num_tokens=64, cross_attention_dim=ckpt.cross_attention_dim, scale=0.0)
    inputs = _inputs(unet)
    text_only = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :77])
    with torch.no_grad():
        assert torch.allclose(unet(**inputs).sample, base(**text_only).sample, atol=1e-5)
        adapter.set_scale(unet, 1.0)
        assert not torch.allclose(unet(**inputs).sample, base(**text_only).sample, atol=1e-4)


def test_reference_tokens_only_reach_attn2_through_ip_weights(tiny):
    """Rule 7: text K/V see the first 77 tokens only; the last 64 go through to_k_ip/to_v_ip."""
    ckpt = load_checkpoint(tiny.adapter)
    unet = _unet(tiny)
    adapter.install_adapter(unet, ckpt.ip, num_tokens=64, cross_attention_dim=ckpt.cross_attention_dim)
    attn_path = next(p[: -len(".processor")] for p in unet.attn_processors if p.endswith("attn2.processor"))
    attn = unet.get_submodule(attn_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, attn.to_q.in_features, generator=g)
    ctx = torch.randn(1, 77 + 64, ckpt.cross_attention_dim, generator=g)
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=ctx)
        h = attn.heads
        sh = lambda t: t.view(1, -1, h, t.shape[-1] // h).transpose(1, 2)  # noqa: E731
        q = sh(attn.to_q(x))
        text = F.scaled_dot_product_attention(q, sh(attn.to_k(ctx[:, :77])), sh(attn.to_v(ctx[:, :77])))
        ip = F.scaled_dot_product_attention(
            q,
            sh(F.linear(ctx[:, 77:], ckpt.ip[attn_path]["to_k_ip"])),
            sh(F.linear(ctx[:, 77:], ckpt.ip[attn_path]["to_v_ip"])),
        )
        want = attn.to_out[0]((text + ip).transpose(1, 2).reshape(1, 16, -1))
    assert torch.allclose(got, want, atol=1e-5)


def test_attention_auto_falls_back_to_sdpa_when_xformers_cannot_run(monkeypatch):
    monkeypatch.setattr(
        adapter, "probe_xformers", lambda device, dtype: (False, "xformers not importable: ImportError")
    )
    choice = adapter.resolve_attention("auto", "cpu", torch.float32)
    assert choice.backend == "sdpa" and "fallback" in choice.reason
    with pytest.raises(UsageError, match="xformers"):
        adapter.resolve_attention("xformers", "cpu", torch.float32)
    assert adapter.resolve_attention("sdpa", "cpu", torch.float32).backend == "sdpa"
    with pytest.raises(UsageError):
        adapter.resolve_attention("flash", "cpu", torch.float32)


def test_real_xformers_probe_reports_instead_of_raising():
    ok, reason = adapter.probe_xformers("cpu", torch.float32)
    assert isinstance(ok, bool) and reason
