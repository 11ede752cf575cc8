#!/usr/bin/env bash
# A real image build and run without registry pulls (docs/platform.md: none reach this
# machine): podman builds services/verifier/Dockerfile exactly as written on a stand-in for
# its base image, starts the container, waits for the image's own HEALTHCHECK to pass, scores
# an answer over gRPC from the host, and stops it.
#
# The stand-in for python:3.11.17-slim-bookworm is a Debian bookworm rootfs made here with
# debootstrap (Debian's packages are reachable): python3 (3.11), python3-venv, and a `python`
# link as the official image has; the builder stage's pip reaches PyPI. What this proves: the
# Dockerfile builds (its venv, its checks), the final stage runs as uid 10001, `axpo serve
# verifier` starts from AXPO_* settings only, the HEALTHCHECK command works, and the service
# answers. What it does not: the official base image itself.
#
# Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap). Not part of
# `make test` (minutes of downloads). Usage: bash scripts/podman_smoke.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/axpo-podman-smoke}
BASE=docker.io/library/python:3.11.17-slim-bookworm
IMAGE=localhost/axpo/verifier:smoke
NAME=axpo-verifier-smoke
PORT=${PORT:-15053}
# podman here needs explicit limits (docs/platform.md), and runc: crun refuses this machine's
# hybrid cgroups ("cgroups in hybrid mode not supported").
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
podman() { command podman --runtime "${OCI_RUNTIME:-runc}" "$@"; }
mkdir -p "$WORK"
say() { printf '== %s\n' "$*"; }

if ! podman image exists "$BASE"; then
  say "debootstrap a bookworm rootfs with python3 (stand-in for $BASE)"
  if [[ ! -x "$WORK/rootfs/usr/bin/python3" ]]; then
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  fi
  ln -sf /usr/bin/python3 "$WORK/rootfs/usr/local/bin/python"
  # This machine reaches PyPI through a TLS proxy whose CA only the host's bundle holds: the
  # stand-in base trusts what the host trusts (the official image would on a real host).
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb
  tar -C "$WORK/rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$BASE" >/dev/null
fi

# --format docker: OCI images have no HEALTHCHECK (podman drops it), Docker images keep it.
say "podman build -f services/verifier/Dockerfile"
podman build "${LIMITS[@]}" --pull=never --format docker -f services/verifier/Dockerfile -t "$IMAGE" . \
  >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }

podman rm -f "$NAME" >/dev/null 2>&1 || true
say "podman run $IMAGE (port $PORT)"
podman run -d "${LIMITS[@]}" --name "$NAME" -p "127.0.0.1:$PORT:50053" "$IMAGE" >/dev/null
trap 'podman rm -f "$NAME" >/dev/null 2>&1 || true' EXIT

say "user: $(podman exec "$NAME" id -u)"
test "$(podman exec "$NAME" id -u)" = 10001

say "waiting for the image's HEALTHCHECK"
for _ in $(seq 60); do
  if podman healthcheck run "$NAME" >/dev/null 2>&1; then break; fi
  sleep 1
done
podman healthcheck run "$NAME" >/dev/null

say "Score over gRPC from the host"
.venv/bin/python - "$PORT" <<'EOF'
import sys

from axpo.rpc.client import open_channel
from axpo.settings.base import RpcClientSettings
from axpo.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc

channel = open_channel(RpcClientSettings(target=f"127.0.0.1:{sys.argv[1]}", deadline_s=30))
stub = verifier_pb2_grpc.VerifierServiceStub(channel)
item = verifier_pb2.ScoreItem(
    item_id="smoke",
    output="<think>6 times 7</think><answer>42</answer>",
    gold="42",
    kind=common_pb2.ANSWER_KIND_NUMBER,
)
reward = stub.Score(verifier_pb2.ScoreRequest(items=[item])).results[0].reward
print(f"correct={reward.correct} reward={reward.total:.2f}")
assert reward.correct, reward
EOF

say "podman stop (SIGTERM)"
start=$(date +%s.%N)
podman stop -t 20 "$NAME" >/dev/null
printf 'stopped in %.1f s, exit code %s\n' "$(echo "$(date +%s.%N) - $start" | bc)" \
  "$(podman inspect -f '{{.State.ExitCode}}' "$NAME")"
say "ok"
