#!/usr/bin/env bash
# The main job on a fresh machine: venv, the offline Qwen2.5-Coder 0.5B/1.5B pair and data (skipped when
# already prepared), then `bild bench` on the first 3 HumanEval problems, 128 new tokens
# (configs/qwen-coder-main.yaml; bfloat16 where the CPU computes in it, else float32; every model on the
# linear kernels timed fastest here): the large model alone, stock assisted generation given the drafter
# `bild.compress_drafter` makes by default (int4 in bfloat16, int8-dynamic in float32 on x86), lossless BiLD with
# the same drafter at its defaults (context drafts included), and with that drafter's step compiled, one line per
# call as it goes, ending with the results table (about 7 minutes on 2 AVX2 cores).
# Extra arguments go to `bild bench` (e.g. --limit 20, --kernels stock, --kernels fp16, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/prepare_models.py
.venv/bin/python scripts/prepare_data.py
.venv/bin/bild bench --config configs/qwen-coder-main.yaml --out runs/main "$@"
