#!/usr/bin/env bash
# All set-up on a fresh machine, idempotent: a local virtual environment in .venv,
# torch/torchvision, the pinned requirements, and the distribution spanet-spectral (the
# packages spanet and spanet_ops) installed in editable mode, which builds the native
# extension from csrc/. SPANET_TORCH_INDEX_URL chooses the index torch comes from, e.g.
# https://download.pytorch.org/whl/cpu for the CPU-only build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null; then
    $PIP install -q torch==2.14.1 torchvision==0.29.1 ${SPANET_TORCH_INDEX_URL:+--index-url "$SPANET_TORCH_INDEX_URL"}
fi
$PIP install -q -r requirements.txt
# This checkout was once installed under the distribution name `spanet` (on PyPI another
# project's name): remove that editable install, so that one distribution owns the packages.
if .venv/bin/python - "$PWD" <<'PY'
import json, os, sys
from importlib import metadata

try:
    dist = metadata.distribution("spanet")
except metadata.PackageNotFoundError:
    sys.exit(1)
url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
sys.exit(0 if url.startswith("file://") and os.path.realpath(url[7:]) == os.path.realpath(sys.argv[1]) else 1)
PY
then
    $PIP uninstall -q -y spanet
fi
$PIP install -q --no-build-isolation -e .
