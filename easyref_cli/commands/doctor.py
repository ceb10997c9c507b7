"""``easyref doctor``: a paste-into-an-issue report of the environment."""

from __future__ import annotations

import platform
import sys


def _default_models_locally() -> list[str]:
    from easyref_cli.constants import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, DEFAULT_MLLM

    lines = []
    try:
        from huggingface_hub import snapshot_download
    except Exception as exc:  # noqa: BLE001
        return [f"  huggingface_hub unavailable: {exc}"]
    for option, repo in (
        ("--base-model", DEFAULT_BASE_MODEL),
        ("--mllm", DEFAULT_MLLM),
        ("--adapter", DEFAULT_ADAPTER),
    ):
        try:
            path = snapshot_download(repo, local_files_only=True)
            lines.append(f"  {option:<13} {repo}: cached at {path}")
        except Exception:  # noqa: BLE001 - not cached
            lines.append(f"  {option:<13} {repo}: NOT in the local Hugging Face cache")
    return lines


def _demo_model() -> str:
    from easyref_cli.demo import weights_dir

    root = weights_dir()
    if not (root / "easyref.safetensors").exists():
        return f"  --model demo  MISSING ({root}); rebuild: python -m easyref_cli.demo.build WORK --install"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return f"  --model demo  {root} ({size / 2**20:.1f} MiB)"


def _resolved(option: str, spec: str, resolve) -> str:
    """What ``spec`` resolves to here, from local files and the cache only (doctor downloads nothing)."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return f"  {option:<13} {spec} → {resolve(spec, option)}"
    except Exception as exc:  # noqa: BLE001 - the message is the answer
        return f"  {option:<13} {spec}: {exc}"
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline


def _ecosystem(models: dict) -> list[str]:
    """What each ecosystem option given resolves to; where a single file takes its configs from."""
    from easyref_cli.constants import DEFAULT_BASE_MODEL
    from easyref_cli.model import hub
    from easyref_cli.settings import parse_lora

    lines = ["ecosystem:"]
    if models.get("base_model"):
        lines.append(_resolved("--base-model", models["base_model"], hub.resolve_model))
    if models.get("base_config"):
        lines.append(_resolved("--base-config", models["base_config"], hub.resolve_folder))
    else:
        try:
            from huggingface_hub import snapshot_download

            cached = snapshot_download(DEFAULT_BASE_MODEL, local_files_only=True, allow_patterns=["*.json", "*.txt"])
            lines.append(f"  single files  take their configs from {cached} (the cached {DEFAULT_BASE_MODEL})")
        except Exception:  # noqa: BLE001 - not cached
            lines.append(f"  single files  need --base-config DIR ({DEFAULT_BASE_MODEL} configs are not cached)")
    if models.get("vae"):
        lines.append(_resolved("--vae", models["vae"], hub.resolve_model))
    for item in models.get("loras") or ():
        try:
            spec, weight = parse_lora(item)
        except ValueError as exc:
            lines.append(f"  --lora        {item}: {exc}")
            continue
        lines.append(_resolved("--lora", spec, hub.resolve_checkpoint) + f" (weight {weight:g})")
    for spec in models.get("controlnets") or ():
        lines.append(_resolved("--controlnet", spec, _checked_controlnet(models.get("base_model"))))
    return lines


def _checked_controlnet(base_model: str | None):
    """Resolve a ControlNet and check it fits ``--base-model`` (when that is a local folder)."""
    from pathlib import Path

    from easyref_cli.model import hub
    from easyref_cli.model.control import check_controlnet

    def resolve(spec: str, option: str) -> Path:
        folder = hub.resolve_folder(spec, option)
        base = Path(base_model).expanduser() if base_model else None
        check_controlnet(folder, base if base is not None and base.is_dir() else None)
        return folder

    return resolve


def _locks() -> str:
    """Whether runs sharing an output folder here can lock (claims, manifest appends)."""
    import os
    import tempfile

    try:
        import fcntl
    except ImportError:
        return "  file locks    not on this system: shared output folders rely on exclusive creates alone"
    try:
        with tempfile.NamedTemporaryFile(dir=os.getcwd(), prefix=".easyref-doctor-") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f"  file locks    ok in {os.getcwd()} (runs can share an output folder here)"
    except OSError as exc:
        return f"  file locks    not in {os.getcwd()} ({exc.strerror or exc}): claims rely on exclusive creates alone"


def report(device: str | None = None, models: dict | None = None) -> str:
    import torch

    from easyref_cli.env import default_device, easyref_home, package_versions
    from easyref_cli.model.adapter import probe_xformers

    device = device or default_device()
    lines = ["easyref doctor", f"  python        {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"  {name:<13} {ver}" for name, ver in package_versions().items()]
    lines.append("devices:")
    lines.append(f"  cpu           {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"  cuda:{i:<8} {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
            )
    else:
        lines.append("  cuda          not available")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("  mps           available")
    lines.append(f"dtype support on {device}:")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        try:
            x = torch.ones(4, 4, device=device, dtype=dt)
            (x @ x).sum().item()
            ok = "ok"
        except Exception as exc:  # noqa: BLE001
            ok = f"no ({type(exc).__name__})"
        lines.append(f"  {str(dt).removeprefix('torch.'):<13} {ok}")
    probe_dtype = torch.float32 if device.startswith("cpu") else torch.float16
    ok, reason = probe_xformers(device, probe_dtype)
    lines.append("attention:")
    lines.append(f"  --attention auto → {'xformers' if ok else 'sdpa'} ({reason})")
    lines.append("default models:")
    lines += _default_models_locally()
    lines.append(_demo_model())
    lines += _ecosystem(models or {})
    lines.append("shared output folders:")
    lines.append(_locks())
    lines.append(f"easyref home    {easyref_home()}")
    return "\n".join(lines)
