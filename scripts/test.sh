#!/usr/bin/env bash
# Everything the tests need on a fresh machine: the venv, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests scripts
.venv/bin/python -m pytest -q "$@"
