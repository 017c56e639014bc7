#!/usr/bin/env bash
# The main job on a fresh machine: venv, the offline Qwen2.5-Coder 0.5B/1.5B pair and data (skipped when
# already prepared), then `bild bench` on the first 3 HumanEval problems in bfloat16 (where the CPU has it):
# the large model alone, the small one, stock assisted generation with the plain and the int4-compressed
# drafter, and lossless BiLD with both, ending with the results table.
# Extra arguments go to `bild bench` (e.g. --limit 20, --config configs/qwen-coder-de-en.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/prepare_models.py
.venv/bin/python scripts/prepare_data.py
.venv/bin/bild bench --config configs/qwen-coder-main.yaml --out runs/main "$@"
