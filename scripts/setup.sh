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
.venv/bin/python -m pip install -q -e . -e services/verifier -e services/tools \
  -r requirements-dev.txt
if command -v npm >/dev/null 2>&1; then
  npm install --no-audit --no-fund --silent
else
  echo "setup: npm not found; proto lint (buf) will be skipped by the test command" >&2
fi
echo "setup: ok ($(.venv/bin/python --version), $(.venv/bin/axpo --version))"
