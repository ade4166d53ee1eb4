#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with torch (installed first, so the project's
# torch range is already satisfied and no other build is pulled), then this project and its tests.
# Idempotent: re-running only fills in what is missing. TORCH_SPEC overrides the torch pin
# (e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>" on GPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[test]"
python -c "import torch, deepspeed; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | tail -1
