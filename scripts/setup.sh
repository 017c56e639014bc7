#!/usr/bin/env bash
# Create .venv and install bild with its dev and bench extras.
# CPU torch goes in first: a bare `torch` requirement on a machine without it pulls a multi-GB CUDA build.
# TRANSFORMERS_VERSION=5.17.0 bash scripts/setup.sh pins transformers (default: the newest 5.x).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev,bench]"
if [ -n "${TRANSFORMERS_VERSION:-}" ]; then
  .venv/bin/pip install -q "transformers==${TRANSFORMERS_VERSION}"
fi
