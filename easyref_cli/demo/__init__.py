"""The demo model: a tiny EasyRef trained with ``easyref train`` on a synthetic domain.

* :mod:`easyref_cli.demo.synthetic` — the domain: groups of one colour and one shape (torch-free);
* :mod:`easyref_cli.demo.build` — the training recipe (``python -m easyref_cli.demo.build``);
* :mod:`easyref_cli.demo.evidence` — does the colour follow the references? (README numbers);
* ``weights/`` — the trained model ``easyref generate --model demo`` uses.
"""

from __future__ import annotations

from pathlib import Path


def weights_dir() -> Path:
    """The shipped demo weights (``sdxl/``, ``qwen2vl/``, ``easyref.safetensors``, ``build.json``)."""
    return Path(__file__).resolve().parent / "weights"
