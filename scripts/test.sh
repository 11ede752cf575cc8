#!/usr/bin/env bash
# The test command (README, .ci/run): sets up, then lint, format, types, import rules,
# proto staleness and lint, and the whole pytest suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
step() { printf '\n== %s\n' "$*"; }

step "ruff check";         .venv/bin/ruff check .
step "ruff format --check"; .venv/bin/ruff format --check .
step "mypy (core, strict)"; .venv/bin/mypy
step "import rules";       .venv/bin/lint-imports
step "protos: generated code up to date"; bash scripts/gen_protos.sh --check
step "protos: buf lint"
if [[ -x node_modules/.bin/buf ]]; then
  (cd protos && ../node_modules/.bin/buf lint) && echo "buf lint: clean"
else
  echo "buf not installed (no npm): skipped" >&2
fi
step "pytest"
.venv/bin/python -m pytest "$@"
