#!/usr/bin/env bash
# The "main job" until the training loop exists (it lands with the rollout issue): start the
# verifier service, score a few sample model outputs through it over gRPC, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
AXPO=.venv/bin/axpo
tmp=$(mktemp -d)
$AXPO serve verifier --port 0 --port-file "$tmp/port" 2> "$tmp/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 300); do [[ -s "$tmp/port" ]] && break; sleep 0.1; done
[[ -s "$tmp/port" ]] || { cat "$tmp/server.log"; echo "verifier did not start" >&2; exit 1; }
target=127.0.0.1:$(cat "$tmp/port")
echo "verifier service listening on $target; scoring sample outputs through gRPC:"

score() {  # $1: model output, rest: axpo verify flags
  local output=$1; shift
  printf '  %-58s -> ' "$(printf '%s' "$output" | tr '\n' ' ' | cut -c1-58)"
  printf '%s' "$output" | $AXPO verify --server "$target" "$@"
}
score $'<think>\nThe red-framed cell is blue, option B.\n</think>\n\nThe answer is (B).' \
  --kind choice --gold B --choices '["red", "blue", "green", "gray"]'
score $'Counting the apples: 3 + 4.</think>\n\n<answer>seven</answer>' --kind number --gold 7
score $'<think>\n45 of 60 is 75%.\n</think>\n\nAbout 75.3%' --kind number --gold 75 --rel-tol 0.05
score $'<think>\n\\boxed{3}\n</think>\n\nSo the value is $\\boxed{\\frac{1}{2}}$.' --kind math --gold 0.5
score $'<think>\nzoom first\n</think>\n\nThe answer is Paris.' --kind text --gold 'paris' \
  --tool-calls 1 --tool-bonus-weight 0.5
kill -TERM $server; wait $server
echo "verifier service stopped cleanly (SIGTERM)."
