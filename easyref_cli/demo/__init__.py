"""The demo model: a tiny EasyRef trained with ``easyref train`` on a synthetic domain.

* :mod:`easyref_cli.demo.synthetic` — the domain: groups of one colour and one shape (torch-free);
* :mod:`easyref_cli.demo.build` — the training recipe (``python -m easyref_cli.demo.build``);
* :mod:`easyref_cli.demo.base` — its base models and their pre-training (recipe steps 1–3);
* :mod:`easyref_cli.demo.mllm` — the Qwen2-VL pre-training (step 4);
* :mod:`easyref_cli.demo.state` — resumable training state shared by those loops;
* :mod:`easyref_cli.demo.controlnet` — the demo ControlNet (``python -m easyref_cli.demo.controlnet``);
* :mod:`easyref_cli.demo.evidence` — do the colour and shape follow the references? (README numbers);
* ``weights/`` — the trained model ``easyref generate --model demo`` uses (and ``--controlnet demo``).
"""

from __future__ import annotations

from pathlib import Path


def weights_dir() -> Path:
    """The shipped demo weights (``sdxl/``, ``qwen2vl/``, ``easyref.safetensors``, ``build.json``)."""
    return Path(__file__).resolve().parent / "weights"
