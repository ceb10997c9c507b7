"""Benchmarks of easyref-cli against plain SDXL and the official EasyRef code's habits.

Run from the repository root (``python -m`` puts it on ``sys.path``, so ``easyref_cli`` need not be
installed)::

    python -m bench.encode      # encode: official path vs ours (CPU, mid-size random Qwen2-VL)
    python -m bench.generate    # plain SDXL vs ours vs the official path (CPU, tiny random models)
    python -m bench.gpu         # full-size random SDXL + Qwen2-VL-2B on one GPU

Modules: ``_common`` (shapes, prompts, interleaved timing rounds and per-round ratios, in-memory model
builders), ``official`` (the official encode path and attention processors, re-implemented for timing).
Importing a module runs nothing: each script's work is in its ``main``.
"""
