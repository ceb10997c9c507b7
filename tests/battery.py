"""Behaviour battery: run the real ``easyref`` CLI over a fixed set of cases and fingerprint the result.

Used to prove a refactor changes nothing a user can observe: record once on the old code, once on
the new, and compare. Every case runs in a subprocess (``python -m easyref_cli``) in a fixed work
folder (records hold absolute paths, so the folder must be the same for both runs), with one CPU
thread for bit-exact arithmetic. What is fingerprinted per case:

* the exit code, stdout and stderr (temporary paths and wall-clock numbers masked);
* the sha256 of every file the case leaves under its output folder (PNG bytes, encode tensors);
* every manifest line, minus its wall-clock ``time`` and ``timings``.

    python tests/battery.py record before.json            # on the old code
    python tests/battery.py record after.json             # on the new code
    python tests/battery.py compare before.json after.json

Not collected by pytest (slow: about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/easyref-battery")

PROMPTS = """\
defaults:
  steps: 3
  guidance: 4.0
prompts:
  - a lighthouse at dusk
  - prompt: a knight in the same style
    id: knight
    seeds: [1, 2]
    scale: 0.7
    negative_prompt: blurry, lowres
  - prompt: a cat on a sofa
    groups: [beta]
    ref_text: none
    scheduler: euler_a
    steps: 2
  - prompt: a small house
    width: 48
    height: 32
    seed: 5
    images_per_prompt: 2
"""

PRESET = """\
description: battery preset
steps: 2
scale: 0.5
scheduler: dpmpp_2m
negative_prompt: ugly
"""

BAD_PROMPTS = {
    "unknown_key": "prompts:\n  - prompt: a\n    stepz: 3\n",
    "bad_value": "defaults:\n  steps: -1\nprompts:\n  - prompt: a\n    guidance: high\n",
    "seed_and_seeds": "prompts:\n  - prompt: a\n    seed: 1\n    seeds: [1, 2]\n",
    "dup_id": "prompts:\n  - prompt: a\n    id: x\n  - prompt: b\n    id: x\n",
    "unknown_group": "prompts:\n  - prompt: a\n    groups: [nope]\n",
    "not_mapping": "- a\n- b\n",
    "yaml_syntax": "prompts: [a, b\n  - c\n",
    "control_token": "prompts:\n  - a <|image_pad|> cat\n",
    "bad_scheduler": "prompts:\n  - prompt: a\n    scheduler: heun\n",
    "dup_key": "prompts:\n  - prompt: a\n    prompt: b\n",
}


def _setup() -> dict[str, Path]:
    sys.path.insert(0, str(REPO))
    from easyref_cli.testing import make_reference_images

    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "home").mkdir(parents=True)
    groups = WORK / "groups"
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        make_reference_images(groups / name, n=2 + seed % 2, size=(64, 48), seed=seed)
    (WORK / "prompts.yaml").write_text(PROMPTS)
    (WORK / "preset.yaml").write_text(PRESET)
    for name, text in BAD_PROMPTS.items():
        (WORK / f"bad_{name}.yaml").write_text(text)
    (WORK / "bad_preset.yaml").write_text("steps: 2\ncolour: red\n")
    return {"groups": groups}


def _cases() -> list[tuple[str, list[str]]]:
    g = str(WORK / "groups")
    p = str(WORK / "prompts.yaml")
    demo = str(REPO / "examples" / "groups")
    demo_prompts = str(REPO / "examples" / "prompts.yaml")
    tiny = ["--model", "tiny"]
    cases: list[tuple[str, list[str]]] = [
        ("demo", ["generate", demo, "--prompts", demo_prompts, "--model", "demo", "-o", "OUT/demo", "-q"]),
        (
            "demo_json",
            [
                "generate",
                demo,
                "--prompt",
                "a small shape on the right",
                "--model",
                "demo",
                "-o",
                "OUT/demo_json",
                "--seed",
                "3",
                "--json",
                "-q",
            ],
        ),
        ("tiny_file", ["generate", g, "--prompts", p, *tiny, "-o", "OUT/tiny_file", "-q"]),
        ("tiny_file_resume", ["generate", g, "--prompts", p, *tiny, "-o", "OUT/tiny_file", "-q", "--json"]),
        ("tiny_batch2", ["generate", g, "--prompts", p, *tiny, "-o", "OUT/tiny_batch2", "--batch-size", "2", "-q"]),
        (
            "tiny_preset_file",
            [
                "generate",
                g,
                "--prompt",
                "a red boat",
                *tiny,
                "--preset",
                str(WORK / "preset.yaml"),
                "-o",
                "OUT/tiny_preset_file",
                "-n",
                "2",
                "-q",
            ],
        ),
        (
            "tiny_preset_builtin",
            [
                "generate",
                g + "/alpha",
                "--prompt",
                "a tree",
                *tiny,
                "--preset",
                "style",
                "--width",
                "64",
                "--height",
                "64",
                "--steps",
                "2",
                "-o",
                "OUT/tiny_preset_builtin",
                "--name-template",
                "{preset}/{group}-{seed:03d}",
                "-q",
            ],
        ),
        (
            "tiny_cli_overrides",
            [
                "generate",
                g,
                "--prompts",
                p,
                *tiny,
                "--steps",
                "2",
                "--guidance",
                "6",
                "--scale",
                "0.9",
                "--negative-prompt",
                "bad",
                "--scheduler",
                "ddim",
                "-o",
                "OUT/tiny_cli_overrides",
                "-q",
            ],
        ),
        (
            "tiny_from_image",
            ["generate", "--from-image", "OUT/tiny_file/alpha/knight_1.png", *tiny, "-o", "OUT/tiny_from_image", "-q"],
        ),
        (
            "demo_from_image",
            [
                "generate",
                "--from-image",
                "OUT/demo/red-circle/centre_0.png",
                "--model",
                "demo",
                "-o",
                "OUT/demo_from_image",
                "-q",
            ],
        ),
        ("dry_run", ["generate", g, "--prompts", p, *tiny, "-o", "OUT/tiny_file", "--dry-run"]),
        ("dry_run_json", ["generate", g, "--prompts", p, *tiny, "-o", "OUT/tiny_file", "--dry-run", "--json"]),
        (
            "dry_run_json_new",
            ["generate", g, "--prompts", p, *tiny, "-o", "OUT/nothing", "--dry-run", "--json", "--preset", "identity"],
        ),
        (
            "from_image_dry",
            [
                "generate",
                "--from-image",
                "OUT/tiny_file/beta/a-cat-on-a-sofa_0.png",
                *tiny,
                "-o",
                "OUT/x",
                "--dry-run",
                "--json",
            ],
        ),
        ("other_settings_clash", ["generate", g, "--prompts", p, *tiny, "--steps", "1", "-o", "OUT/tiny_file", "-q"]),
        (
            "overwrite_one",
            [
                "generate",
                g + "/gamma",
                "--prompt",
                "a lighthouse at dusk",
                *tiny,
                "--steps",
                "3",
                "--guidance",
                "4",
                "-o",
                "OUT/tiny_file",
                "-q",
                "--overwrite",
                "--name-template",
                "{group}/{prompt_id}_{seed}",
            ],
        ),
        (
            "encode",
            [
                "encode",
                g + "/alpha",
                "--prompt",
                "a cat",
                "--mllm",
                "HOME/tiny-models/qwen2-vl",
                "--adapter",
                "HOME/tiny-models/easyref/adapter_lora.safetensors",
                "-o",
                "OUT/encode/cond.safetensors",
                "--dtype",
                "float32",
                "--device",
                "cpu",
            ],
        ),
    ]
    for name in BAD_PROMPTS:
        cases.append(
            (
                f"err_{name}",
                ["generate", g, "--prompts", str(WORK / f"bad_{name}.yaml"), *tiny, "-o", "OUT/err", "--dry-run"],
            )
        )
    cases += [
        (
            "err_bad_preset",
            [
                "generate",
                g,
                "--prompt",
                "a",
                *tiny,
                "--preset",
                str(WORK / "bad_preset.yaml"),
                "-o",
                "OUT/err",
                "--dry-run",
            ],
        ),
        (
            "err_unknown_preset",
            ["generate", g, "--prompt", "a", *tiny, "--preset", "nope", "-o", "OUT/err", "--dry-run"],
        ),
        ("err_two_sources", ["generate", g, "--prompt", "a", "--prompts", p, *tiny, "-o", "OUT/err", "--dry-run"]),
        ("err_no_source", ["generate", g, *tiny, "-o", "OUT/err", "--dry-run"]),
        ("err_missing_group", ["generate", str(WORK / "nope"), "--prompt", "a", *tiny, "-o", "OUT/err", "--dry-run"]),
        ("err_model_conflict", ["generate", g, "--prompt", "a", *tiny, "--mllm", "x", "-o", "OUT/err", "--dry-run"]),
        ("err_bad_model", ["generate", g, "--prompt", "a", "--model", "huge", "-o", "OUT/err", "--dry-run"]),
        ("err_bad_width", ["generate", g, "--prompt", "a", *tiny, "--width", "65", "-o", "OUT/err", "--dry-run"]),
        ("err_bad_dtype", ["generate", g, "--prompt", "a", *tiny, "--dtype", "int8", "-o", "OUT/err", "--dry-run"]),
        (
            "err_bad_attention",
            ["generate", g, "--prompt", "a", *tiny, "--attention", "flash", "-o", "OUT/err", "--dry-run"],
        ),
        ("err_bad_offload", ["generate", g, "--prompt", "a", *tiny, "--offload", "disk", "-o", "OUT/err", "--dry-run"]),
        ("err_bad_device", ["generate", g, "--prompt", "a", *tiny, "--device", "gpu0", "-o", "OUT/err", "--dry-run"]),
        (
            "err_bad_template",
            ["generate", g, "--prompt", "a", *tiny, "--name-template", "{colour}", "-o", "OUT/err", "--dry-run"],
        ),
        (
            "err_template_collision",
            ["generate", g, "--prompt", "a", *tiny, "--name-template", "{prompt_id}", "-o", "OUT/err", "--dry-run"],
        ),
        (
            "err_from_image_flags",
            [
                "generate",
                "--from-image",
                "OUT/tiny_file/alpha/knight_1.png",
                *tiny,
                "--steps",
                "3",
                "-o",
                "OUT/err",
                "--dry-run",
            ],
        ),
        (
            "err_from_image_groups",
            ["generate", g, "--from-image", "OUT/tiny_file/alpha/knight_1.png", *tiny, "-o", "OUT/err", "--dry-run"],
        ),
        ("err_control_prompt", ["generate", g, "--prompt", "x <|im_end|>", *tiny, "-o", "OUT/err", "--dry-run"]),
        (
            "err_seed_overflow",
            ["generate", g, "--prompt", "a", *tiny, "--seed", str(2**64 - 1), "-n", "2", "-o", "OUT/err", "--dry-run"],
        ),
        ("err_empty_prompt", ["generate", g, "--prompt", "  ", *tiny, "-o", "OUT/err", "--dry-run"]),
        ("presets_list", ["presets", "list"]),
        ("presets_show", ["presets", "show", "identity"]),
        ("err_presets_show", ["presets", "show", str(WORK / "bad_preset.yaml")]),
    ]
    return cases


_MASKS = [
    (re.compile(r"in \d+\.\d+s \(\d+\.\d+ images/s\)"), "in <T>s (<R> images/s)"),
    (re.compile(r'"(time|encode_s|generate_s)": [^,}]+'), r'"\1": <T>'),
]


def _mask(text: str) -> str:
    text = text.replace(str(WORK), "<WORK>").replace(str(REPO), "<REPO>")
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return text


def _manifest(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        entry.pop("time", None)
        timings = entry.pop("timings", None)
        if timings is not None:
            entry["batch_size"] = timings.get("batch_size")
        out.append(entry)
    return out


def _safetensors(path: Path) -> dict[str, object]:
    """Tensors (sha256 of their bytes) and metadata: the file's own bytes vary from run to run."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest() for k in f.keys()}  # noqa: SIM118
        return {"tensors": tensors, "metadata": _mask(json.dumps(f.metadata(), sort_keys=True))}


def _outputs(root: Path) -> dict[str, object]:
    found: dict[str, object] = {}
    if not root.exists():
        return found
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(WORK).as_posix()
        if path.name.endswith(".jsonl"):
            found[rel] = _manifest(path)
        elif path.suffix == ".safetensors":  # safetensors writes its metadata in hash-map order
            found[rel] = _safetensors(path)
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def record(dest: Path) -> None:
    _setup()
    env = {
        **os.environ,
        "EASYREF_HOME": str(WORK / "home"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "COLUMNS": "120",
        "NO_COLOR": "1",
    }
    env.pop("EASYREF_DEBUG", None)
    results = {}
    for name, args in _cases():
        args = [a.replace("OUT/", str(WORK / "out") + "/").replace("HOME/", str(WORK / "home") + "/") for a in args]
        proc = subprocess.run(
            [sys.executable, "-m", "easyref_cli", *args], cwd=WORK, env=env, capture_output=True, text=True, timeout=600
        )
        results[name] = {"exit": proc.returncode, "stdout": _mask(proc.stdout), "stderr": _mask(proc.stderr)}
        print(f"{name:<28} exit {proc.returncode}", file=sys.stderr)
    results["_files"] = _outputs(WORK / "out")
    dest.write_text(json.dumps(results, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"{len(results) - 1} cases, {len(results['_files'])} files → {dest}", file=sys.stderr)


def _json_lines(text):
    """stdout with each JSON-object line key-sorted: ``--dry-run --json`` key order is not behaviour."""
    if not isinstance(text, str):
        return text
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        out.append(json.dumps(value, sort_keys=True, ensure_ascii=False) if isinstance(value, dict) else line)
    return "\n".join(out)


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    diffs = 0
    for name in sorted(set(a) | set(b)):
        if name == "_files":
            continue
        for key in ("exit", "stdout", "stderr"):
            va, vb = a.get(name, {}).get(key), b.get(name, {}).get(key)
            if key == "stdout":
                va, vb = _json_lines(va), _json_lines(vb)
            if va != vb:
                diffs += 1
                print(
                    f"DIFF {name}.{key}:\n  before: {a.get(name, {}).get(key)!r}\n  after:  {b.get(name, {}).get(key)!r}"
                )
    fa, fb = a["_files"], b["_files"]
    for rel in sorted(set(fa) | set(fb)):
        if fa.get(rel) != fb.get(rel):
            diffs += 1
            print(f"DIFF file {rel}")
    pngs = sum(rel.endswith(".png") for rel in fa)
    manifests = sum(len(v) for v in fa.values() if isinstance(v, list))
    print(
        f"{len(a) - 1} cases ({sum(1 for k in a if k != '_files' and a[k]['exit'] != 0)} with non-zero exit), "
        f"{pngs} PNGs, {manifests} manifest lines: {diffs} difference(s)"
    )
    return 1 if diffs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("dest", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "record":
        record(args.dest)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
