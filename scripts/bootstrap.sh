#!/usr/bin/env bash
# All set-up on a fresh machine, idempotent: a local virtual environment in .venv,
# torch/torchvision, the pinned requirements, and spanet + spanet_ops installed
# in editable mode (which builds the native extension from csrc/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null; then
    $PIP install -q torch==2.14.1 torchvision==0.29.1
fi
$PIP install -q -r requirements.txt
$PIP install -q --no-build-isolation -e .
