#!/usr/bin/env bash
# Regenerates the committed Python code for protos/axpo/v1/*.proto into axpo/v1/.
#   scripts/gen_protos.sh            write the generated files
#   scripts/gen_protos.sh --check    fail (exit 1) if the committed files are stale
# Uses the pinned grpcio-tools (protoc) and mypy-protobuf (.pyi stubs) from .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")

generate() {  # $1: output root (the folder that holds axpo/v1)
  mkdir -p "$1/axpo/v1"
  "$PY" -m grpc_tools.protoc -I protos \
    --python_out="$1" --grpc_python_out="$1" \
    --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" --mypy_out="$1" \
    --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" --mypy_grpc_out="$1" \
    protos/axpo/v1/*.proto 2> >(grep -v '^Writing mypy to' >&2)
}

if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  generate "$tmp"
  if ! diff -r -q -x '__init__.py' -x '__pycache__' "$tmp/axpo/v1" axpo/v1 >/dev/null; then
    echo "Generated gRPC code in axpo/v1 is stale; run scripts/gen_protos.sh and commit:" >&2
    diff -r -q -x '__init__.py' -x '__pycache__' "$tmp/axpo/v1" axpo/v1 >&2 || true
    exit 1
  fi
  echo "protos: generated code is up to date"
else
  rm -f axpo/v1/*_pb2*.py axpo/v1/*_pb2*.pyi
  generate .
  echo "protos: regenerated $(ls axpo/v1/*_pb2*.py* | wc -l) files in axpo/v1"
fi
