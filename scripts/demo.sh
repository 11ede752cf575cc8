#!/usr/bin/env bash
# The main job on the embedded default: set up, then train the tiny Qwen3-VL model with AXPO on
# the generated zoom task (configs/tiny-cpu-axpo.yaml) with every service as a local process.
# Writes runs/tiny-cpu-axpo-<time>/ (metrics.jsonl, report.md with plots, checkpoints, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/axpo run configs/tiny-cpu-axpo.yaml "$@"
