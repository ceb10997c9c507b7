#!/usr/bin/env bash
# Regenerate tests/golden/official.{safetensors,png,json} from the official EasyRef code, from scratch:
#   1. a fresh venv with the official stack (requirements.txt),
#   2. the tiny fixtures + official-stack copies (fixtures.py, in the project's environment),
#   3. the official EasyRef class on them (run_official.py, in the official venv),
#   4. the golden test against the new files.
# See tools/official/README.md. Environment overrides (defaults in brackets):
#   PYTHON [python]                      the project's interpreter (easyref-cli installed)
#   OFFICIAL_VENV [/tmp/easyref-official-venv]   the official venv; REUSE_VENV=1 keeps an existing one
#   OFFICIAL_WORK [/tmp/easyref-official-work]   fixtures and the patched copy of the official code
#   OFFICIAL_EASYREF [../shared/official-easyref] the official checkout (read only)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
VENV=${OFFICIAL_VENV:-/tmp/easyref-official-venv}
WORK=${OFFICIAL_WORK:-/tmp/easyref-official-work}
OFFICIAL=${OFFICIAL_EASYREF:-../shared/official-easyref}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "${REUSE_VENV:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -r tools/official/requirements.txt
fi
"$PYTHON" tools/official/fixtures.py "$WORK"
"$VENV/bin/python" tools/official/run_official.py "$WORK" --official "$OFFICIAL" --out tests/golden
"$PYTHON" -m pytest -q tests/test_official_golden.py
