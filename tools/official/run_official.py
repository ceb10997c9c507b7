"""Run the official ``EasyRef`` class on the tiny fixtures and write the golden outputs.

Runs in the *official* venv (transformers 4.45.2, diffusers 0.22.1, qwen-vl-utils 0.0.8; see
``requirements.txt``), never in the project's environment: it imports nothing from ``easyref_cli``.
``run.sh`` builds the venv and the fixtures, then calls::

    python tools/official/run_official.py WORK [--official ../shared/official-easyref] [--out tests/golden]

What it does:

1. copies the official ``ip_adapter/`` package into ``WORK/official_code/`` and patches the
   ``EasyRef`` class for CPU + float32 only (:data:`PATCHES`, each with its expected count; the
   diff is written next to it as ``easyref_cpu_fp32.diff``);
2. installs an in-memory ``torchvision`` stub (``qwen_vl_utils`` imports it for video only);
3. builds ``EasyRef(pipe, mllm, checkpoint, "cpu", num_tokens, use_lora=True, lora_rank)`` and calls
   ``get_image_embeds`` for the group with each caption (``INSTRUCTION + caption``) and for the
   unconditional input (one black 512² image, ``INSTRUCTION``) — the calls ``generate()`` makes — then
   ``generate()`` once for the 64×64 image;
4. writes ``OUT/official.safetensors`` (embeddings + per-stage data, below), ``OUT/official.png`` and
   ``OUT/official.json`` (settings, fingerprint, rendered prompts, versions, patches).

Per embedding call ``K`` (``cond_caption``, ``cond_empty``, ``uncond``), observed with forward hooks
and a processor wrapper (observation only, nothing changes the computation):

* ``K.embeds`` (64, cross): the projector output (what the test compares at 1e-4);
* ``K.input_ids`` (L,), ``K.image_grid_thw`` (n, 3): the processor's output;
* ``K.pixel_values.digest`` (patches, 2): per-patch sum and L2 norm of the processor's pixel values;
* ``K.vision.digest`` (image tokens, 2), ``K.trunk.digest`` (L, 2): the same for the vision tower's
  output and the trunk's last hidden state;
* ``K.final`` (64, hidden): the final layer's reference-token outputs (before the projector).

And for the image: ``image.latents`` (1, 4, h/2, w/2), the latents after the last step (before the VAE).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import importlib.machinery
import json
import re
import shutil
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The official code: ``shared/official-easyref`` next to the repository (as on the dev machines and in CI).
DEFAULT_OFFICIAL = REPO.parent / "shared" / "official-easyref"

#: The only changes to the official code: device and dtype, inside ``class EasyRef`` of
#: ``ip_adapter/ip_adapter.py``. ``(old, new, expected number of replacements)``.
PATCHES = (
    # Qwen2VLForConditionalGeneration.from_pretrained(..., device_map="cuda") ×2 (trunk + final layer copy)
    ('device_map="cuda"', 'device_map="cpu"', 2),
    # from_pretrained torch_dtype ×2, init_proj's .to(dtype) ×1, the cast before the final layer ×1
    ("torch.bfloat16", "torch.float32", 4),
    # the attention processors' .to(dtype) ×4 (set_ip_adapter), the cast of the projector output ×1
    ("torch.float16", "torch.float32", 5),
)
CLASS_LINE = "class EasyRef(IPAdapter):"
PATCHED_PACKAGE = "ip_adapter"


# --------------------------------------------------------------------------------------------
# 1-2. patched copy of the official package, torchvision stub
# --------------------------------------------------------------------------------------------


def patched_official_copy(official: Path, dest: Path) -> dict:
    """Copy ``official/ip_adapter`` to ``dest/ip_adapter`` and apply :data:`PATCHES` to ``class EasyRef``."""
    src = official / PATCHED_PACKAGE
    target = dest / PATCHED_PACKAGE
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / "ip_adapter.py"
    original = path.read_text(encoding="utf-8")
    start = original.index(CLASS_LINE)
    if original.find("\nclass ", start + 1) != -1:
        raise RuntimeError("class EasyRef is no longer the last class of ip_adapter.py: adjust the patch range")
    head, body = original[:start], original[start:]
    applied = []
    for old, new, expected in PATCHES:
        count = body.count(old)
        if count != expected:
            raise RuntimeError(f"official code changed: {old!r} occurs {count}× in class EasyRef, expected {expected}")
        body = body.replace(old, new)
        applied.append({"old": old, "new": new, "count": count})
    patched = head + body
    path.write_text(patched, encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            original.splitlines(keepends=True),
            patched.splitlines(keepends=True),
            "official/ip_adapter/ip_adapter.py",
            "patched/ip_adapter/ip_adapter.py",
        )
    )
    (dest / "easyref_cpu_fp32.diff").write_text(diff, encoding="utf-8")
    return {
        "file": "ip_adapter/ip_adapter.py",
        "scope": CLASS_LINE,
        "sha256_original": hashlib.sha256(original.encode()).hexdigest(),
        "replacements": applied,
    }


def install_torchvision_stub() -> None:
    """A ``torchvision`` stand-in for ``qwen_vl_utils.vision_process``'s module-level imports
    (``torchvision``, ``torchvision.io``, ``torchvision.transforms.InterpolationMode``): used only
    to read and resize videos, which this harness never does; any use raises.

    Installed after transformers and diffusers are imported, and without package metadata, so
    their "is torchvision available" checks still say no.
    """

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stub: video input is not supported by this harness")

    modules = {}
    for name in ("torchvision", "torchvision.io", "torchvision.transforms", "torchvision.transforms.functional"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        module.__getattr__ = lambda attr, _name=name: unavailable  # noqa: B023 - bound per module
        modules[name] = module
    modules["torchvision"].__version__ = "0.0.0+stub"
    modules["torchvision"].io = modules["torchvision.io"]
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    modules["torchvision.transforms"].InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    sys.modules.update(modules)


def official_instruction(official: Path) -> str:
    """The instruction string of the official training script (``finetune_sdxl.py``)."""
    text = (official / "finetune_sdxl.py").read_text(encoding="utf-8")
    match = re.search(r'^\s*system_prompt = ("Visualize[^\n]*")\s*$', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("cannot find the training instruction in finetune_sdxl.py")
    return ast.literal_eval(match.group(1))


# --------------------------------------------------------------------------------------------
# 3. observation of the official computation
# --------------------------------------------------------------------------------------------


class Recorder:
    """Forward hooks + a processor wrapper on an ``EasyRef`` instance; ``take()`` returns what one
    ``get_image_embeds`` call computed."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self._reset()
        model.multimodal_llm.visual.register_forward_hook(self._on_visual)
        model.multimodal_llm.register_forward_hook(self._on_trunk)
        model.mllm_final_layer.register_forward_hook(self._on_final)
        model.image_processor = _RecordingProcessor(model.image_processor, self)

    def _reset(self):
        self.processed = []
        self.prompts = []
        self.visual = []
        self.trunk = []
        self.final = []

    def _on_visual(self, module, args, output):
        self.visual.append(output.detach().float().clone())

    def _on_trunk(self, module, args, output):
        self.trunk.append(output.hidden_states[-1].detach().float().clone())

    def _on_final(self, module, args, output):
        self.final.append(output.hidden_states[-1].detach().float().clone())

    def take(self, num_tokens: int) -> tuple[dict, str]:
        torch = self.torch
        if not (len(self.processed) == len(self.trunk) == len(self.final) == 1):
            raise RuntimeError("expected exactly one processor / trunk / final-layer call per get_image_embeds")
        inputs = self.processed[0]
        record = {
            "input_ids": inputs["input_ids"][0].to(torch.int64).clone(),
            "image_grid_thw": inputs["image_grid_thw"].to(torch.int64).clone(),
            "pixel_values.digest": digest(inputs["pixel_values"].float()),
            "vision.digest": digest(torch.cat(self.visual, dim=0)),
            "trunk.digest": digest(self.trunk[0][0]),
            "final": self.final[0][0, -num_tokens:].contiguous(),
        }
        prompt = self.prompts[0]
        self._reset()
        return record, prompt


class _RecordingProcessor:
    """Delegates to the official ``AutoProcessor``; keeps each rendered prompt and processor output."""

    def __init__(self, processor, recorder: Recorder):
        self._processor = processor
        self._recorder = recorder

    def apply_chat_template(self, *args, **kwargs):
        prompt = self._processor.apply_chat_template(*args, **kwargs)
        self._recorder.prompts.append(prompt)
        return prompt

    def __call__(self, *args, **kwargs):
        out = self._processor(*args, **kwargs)
        self._recorder.processed.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self._processor, name)


def digest(x):
    """Per-row ``(sum, L2 norm)`` of a 2-D tensor: ``(rows, 2)`` float32."""
    import torch

    x = x.detach().float().reshape(x.shape[0], -1)
    return torch.stack([x.sum(dim=1), x.norm(dim=1)], dim=1).contiguous()


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib import metadata

    names = (
        "torch",
        "transformers",
        "diffusers",
        "qwen-vl-utils",
        "tokenizers",
        "huggingface-hub",
        "accelerate",
        "safetensors",
        "numpy",
        "pillow",
    )
    return {name: metadata.version(name) for name in names}


def run(work: Path, official: Path, out: Path) -> None:
    fixtures = json.loads((work / "fixtures.json").read_text(encoding="utf-8"))
    settings, paths = fixtures["settings"], fixtures["paths"]
    instruction = fixtures["instruction"]
    if instruction != official_instruction(official):
        raise RuntimeError("the project's INSTRUCTION differs from the official training instruction")

    # Heavy imports first (their torchvision checks), then the stub, then the official code.
    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    install_torchvision_stub()
    patch_info = patched_official_copy(official, work / "official_code")
    sys.path.insert(0, str(work / "official_code"))
    from ip_adapter import EasyRef

    pipe = StableDiffusionXLPipeline.from_pretrained(
        paths["base_model"], torch_dtype=torch.float32, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    model = EasyRef(
        pipe,
        paths["mllm"],
        paths["checkpoint"],
        "cpu",
        num_tokens=settings["num_tokens"],
        use_lora=True,
        lora_rank=settings["lora_rank"],
        cond_image_size=settings["cond_image_size"],
    )
    recorder = Recorder(model)
    refs = [Image.open(p).convert("RGB") for p in paths["refs"]]  # as the official demo loads images
    num_tokens = settings["num_tokens"]

    tensors, prompts = {}, {}
    calls = {
        "cond_caption": (refs, instruction + settings["captions"]["caption"]),
        "cond_empty": (refs, instruction + settings["captions"]["empty"]),
        "uncond": (Image.new(mode="RGB", size=(512, 512)), instruction),  # exactly generate()'s uncond input
    }
    for key, (images, system_prompt) in calls.items():
        embeds = model.get_image_embeds(images, system_prompt)
        record, prompts[key] = recorder.take(num_tokens)
        record["embeds"] = embeds[0].float().contiguous()
        tensors.update({f"{key}.{name}": value for name, value in record.items()})

    latents = []
    images = model.generate(
        refs,
        [instruction + settings["prompt"], instruction],
        prompt=settings["prompt"],
        negative_prompt=settings["negative_prompt"],
        scale=settings["scale"],
        num_samples=1,
        seed=settings["seed"],
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance"],
        width=settings["width"],
        height=settings["height"],
        callback=lambda step, t, lat: latents.append(lat.detach().float().clone()),
        callback_steps=1,
    )
    recorder._reset()
    if len(latents) != settings["steps"]:
        raise RuntimeError(f"expected {settings['steps']} denoising steps, saw {len(latents)}")
    tensors["image.latents"] = latents[-1].contiguous()

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "official.safetensors"), metadata={"format": "pt"})
    images[0].save(out / "official.png")
    record = {
        "about": "Golden outputs of the official EasyRef code on the tiny fixtures; regenerate with tools/official/run.sh",
        "settings": settings,
        "instruction": instruction,
        "fingerprint": fixtures["fingerprint"],
        "prompts": prompts,
        "official": {"source": "TempleX98/EasyRef d8638f4 (shared/official-easyref)", "patch": patch_info},
        "torchvision": "in-memory stub (qwen_vl_utils imports it for video only)",
        "versions": versions(),
    }
    (out / "official.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}/official.safetensors ({len(tensors)} tensors), official.png, official.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="work folder of tools/official/fixtures.py")
    parser.add_argument("--official", type=Path, default=DEFAULT_OFFICIAL, help="official EasyRef checkout")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "golden", help="where to write the goldens")
    args = parser.parse_args(argv)
    run(args.work.resolve(), args.official.resolve(), args.out.resolve())


if __name__ == "__main__":
    main()
