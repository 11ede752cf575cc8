"""compose.yaml: what the containers are told agrees with the code they run.

Read as data (``yaml.safe_load``, ``${VAR:-default}`` filled with its default): every AXPO_*
variable is a field of the service's settings class and its value validates; every image has
its Dockerfile; gRPC targets name a service of the file at the port that service listens on;
GPUs are reserved by the GPU services only; the published weights and the model live on
volumes the services share. The last test runs a Compose validator (``config``) on both
profiles; it is skipped only when no ``docker-compose`` (or ``docker compose``) is installed
(CI: ``apt-get install -y --no-install-recommends docker-compose``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from axpo.settings.api import ApiSettings
from axpo.settings.learner import LearnerSettings
from axpo.settings.rollout import RolloutSettings
from tests.settings_fields import SETTINGS, field_path_error, validator_missing

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

GPU_KINDS = {"inference", "learner"}
PROFILES = ("gpu", "cpu")
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """``${VAR:-default}`` / ``${VAR-default}`` become the default (the host's environment is
    not read: the test checks the file as shipped), ``$$`` a literal ``$``. A variable
    without a default is an error: the file must work with an empty .env."""

    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3)
        if op not in (":-", "-"):
            raise AssertionError(f"${{{name}}} has no default in compose.yaml")
        return default

    return VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def resolve(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [resolve(v) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v) for k, v in node.items()}
    return node


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    return resolve(data)  # type: ignore[no-any-return]


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return {k: v for k, _, v in (e.partition("=") for e in env)}
    return {k: None if v is None else str(v) for k, v in env.items()}


def kind(svc: dict[str, Any]) -> str | None:
    """The service ``axpo serve`` runs in this container, or None for another command."""
    command = svc.get("command") or []
    if svc.get("entrypoint") == ["axpo"] and command[:1] == ["serve"] and len(command) == 2:
        return str(command[1])
    return None


def profile(svc: dict[str, Any]) -> str | None:
    profiles = svc.get("profiles") or []
    assert len(profiles) <= 1, f"at most one profile per service, got {profiles}"
    return profiles[0] if profiles else None


def active(name: str, which: str) -> bool:
    return profile(services()[name]) in (None, which)


def axpo_services() -> dict[str, tuple[str, dict[str, Any]]]:
    """Services running ``axpo serve``: name -> (its service, its definition)."""
    found = {}
    for name, svc in services().items():
        k = kind(svc)
        if k is not None:
            found[name] = (k, svc)
    return found


# --------------------------------------------------------------------------- settings


def test_the_file_runs_every_service_in_each_profile() -> None:
    for which in PROFILES:
        kinds = {k for name, (k, _) in axpo_services().items() if active(name, which)}
        assert kinds == set(SETTINGS), f"profile {which}: runs {sorted(kinds)}"
    for name, svc in services().items():
        assert profile(svc) in (None, *PROFILES), name
        for dep in svc.get("depends_on", {}):
            # A dependency is active whenever the service is: never one of the other profile.
            assert profile(services()[dep]) in (None, profile(svc)), f"{name} -> {dep}"


def test_every_axpo_variable_is_a_field_of_the_services_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problems = []
    for name, svc in services().items():
        env = environment(svc)
        axpo_vars = {k: v for k, v in env.items() if k.startswith("AXPO_")}
        k = kind(svc)
        if k is None:
            if axpo_vars:
                problems.append(f"{name}: runs no `axpo serve` but sets {sorted(axpo_vars)}")
            continue
        cls = SETTINGS[k]
        prefix = cls.model_config["env_prefix"]
        for var in axpo_vars:
            if not var.startswith(prefix):
                problems.append(f"{name} (serve {k}): {var} lacks the prefix {prefix}")
                continue
            error = field_path_error(cls, var[len(prefix) :].lower().split("__"))
            if error:
                problems.append(f"{name} (serve {k}): {var}: {error}")
        # The values validate too: the settings class built from exactly this environment.
        for existing in list(os.environ):
            if existing.startswith(prefix):
                monkeypatch.delenv(existing)
        for var, value in axpo_vars.items():
            assert value is not None, f"{name}: {var} has no value"
            monkeypatch.setenv(var, value)
        try:
            cls()
        except ValidationError as exc:
            problems.append(f"{name} (serve {k}): {exc}")
        for var in axpo_vars:
            monkeypatch.delenv(var)
    assert not problems, "\n".join(problems)


def test_field_path_check_catches_a_typo() -> None:
    # The check above is only as good as this: a misspelt variable is not a field path.
    assert field_path_error(LearnerSettings, ["jobs_dir"]) is None
    assert field_path_error(LearnerSettings, ["queue", "redis_url"]) is None
    assert (
        field_path_error(LearnerSettings, ["job_dir"]) == "LearnerSettings has no field 'job_dir'"
    )
    assert "no field 'hots'" in str(field_path_error(RolloutSettings, ["rpc", "hots"]))
    assert "not a settings model" in str(field_path_error(RolloutSettings, ["consumer", "x"]))


def test_services_listen_on_every_interface_and_the_api_port_is_published() -> None:
    for name, (k, svc) in axpo_services().items():
        env = environment(svc)
        host_var = "AXPO_API_HOST" if k == "api" else f"AXPO_{k.upper()}_RPC__HOST"
        assert env.get(host_var) == "0.0.0.0", f"{name}: {host_var} must be 0.0.0.0"
        if k == "api":
            port = env.get("AXPO_API_PORT") or str(ApiSettings.model_fields["port"].default)
            published = [str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])]
            assert published == [port], f"{name}: ports {svc.get('ports')} vs port {port}"
        else:
            assert not svc.get("ports"), f"{name}: only the api is published"


def test_the_api_reads_its_token_from_a_compose_secret() -> None:
    api = [svc for k, svc in axpo_services().values() if k == "api"]
    assert len(api) == 1
    env = environment(api[0])
    assert "AXPO_API_TOKENS" not in env, "a token in the file is a token in git"
    secrets = api[0].get("secrets", [])
    assert len(secrets) == 1
    assert isinstance(secrets[0], str)
    assert env["AXPO_API_TOKENS_FILE"] == f"/run/secrets/{secrets[0]}"
    assert "file" in compose()["secrets"][secrets[0]]


# --------------------------------------------------------------------------- images


def image_service(svc: dict[str, Any]) -> str | None:
    """``axpo/<service>:...`` -> service; None for an image that is not axpo's."""
    m = re.fullmatch(r"axpo/([a-z]+):dev(-cpu)?", svc.get("image", ""))
    return m.group(1) if m else None


def test_axpo_images_are_built_from_their_services_dockerfile() -> None:
    for name, svc in services().items():
        image = svc.get("image", "")
        if not image.startswith("axpo/"):
            continue
        which = image_service(svc)
        assert which in SETTINGS, f"{name}: image {image!r} is not axpo/<service>:${{AXPO_VERSION}}"
        build = svc.get("build") or {}
        assert build.get("context") == ".", name
        # The -cpu variant of an image is built from its Dockerfile.cpu (docker-bake.hcl).
        suffix = ".cpu" if image.endswith("-cpu") else ""
        assert build.get("dockerfile") == f"services/{which}/Dockerfile{suffix}", name
        assert (ROOT / build["dockerfile"]).is_file(), name
        k = kind(svc)
        assert k in (None, which), f"{name}: runs `serve {k}` on the {which} image"
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, svc in raw.items():
        if svc.get("image", "").startswith("axpo/"):
            assert ":${AXPO_VERSION:-dev}" in svc["image"], f"{name}: tag from AXPO_VERSION"


def test_each_axpo_image_has_a_dockerfile() -> None:
    missing = sorted(
        {
            f"services/{which}/Dockerfile"
            for svc in services().values()
            if (which := image_service(svc)) is not None
            and not (ROOT / "services" / which / "Dockerfile").is_file()
        }
    )
    assert not missing, f"compose.yaml builds images from files that do not exist: {missing}"


def test_build_args_are_declared_by_their_dockerfile() -> None:
    # An argument the Dockerfile does not declare is ignored (a warning at most): the -cpu
    # inference image would silently be the GPU one.
    for name, svc in services().items():
        build = svc.get("build") or {}
        args = build.get("args") or {}
        if not args:
            continue
        dockerfile = ROOT / build["dockerfile"]
        declared = set(re.findall(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)", dockerfile.read_text(), re.M))
        undeclared = sorted(set(args) - declared)
        assert not undeclared, f"{name}: {build['dockerfile']} declares no ARG {undeclared}"


def image_uid(which: str) -> str:
    """The uid of the final stage's USER of services/<which>/Dockerfile."""
    users = re.findall(
        r"^USER\s+(\d+)", (ROOT / "services" / which / "Dockerfile").read_text(), re.M
    )
    assert users, f"services/{which}/Dockerfile sets no numeric USER"
    return users[-1]


def test_the_learners_folders_are_handed_to_the_learner_images_user() -> None:
    # Fresh named volumes belong to root; the learner runs as its image's user and writes its
    # publish and jobs folders: the one-shot model service (root) hands them over first.
    uid = image_uid("learner")
    for name, (k, svc) in axpo_services().items():
        if k != "learner":
            continue
        env = environment(svc)
        (preparer,) = [
            services()[dep]
            for dep, how in svc["depends_on"].items()
            if how["condition"] == "service_completed_successfully"
        ]
        assert preparer.get("user") == "0:0", name
        script = " ".join(preparer["command"])
        assert uid in script, f"{name}: the model service hands folders to uid {uid}"
        for var in ("AXPO_LEARNER_PUBLISH_DIR", "AXPO_LEARNER_JOBS_DIR"):
            point, source, _ = mount_of(svc, str(env[var]))
            assert mounts(preparer).get(point) == (source, False), f"{name}: {var}"
            assert point in preparer["command"] or f" {point} " in f" {script} ", f"{var}"


# --------------------------------------------------------------------------- wiring


def default_port(k: str) -> int:
    port = SETTINGS[k].model_fields["rpc"].default.port
    assert isinstance(port, int), k
    assert port > 0, k
    return port


def targets(svc: dict[str, Any]) -> list[str]:
    """Every gRPC target a service's settings name."""
    found = []
    for var, value in environment(svc).items():
        if var.endswith("__TARGET") and value:
            found.append(value)
        elif var == "AXPO_LEARNER_INFERENCE_TARGETS" and value:
            found += [t["target"] for t in json.loads(value)]
    return found


def test_grpc_targets_are_services_of_the_file_at_their_default_ports() -> None:
    checked = 0
    for name, (_, svc) in axpo_services().items():
        for target in targets(svc):
            host, _, port = target.rpartition(":")
            assert host in services(), f"{name}: target {target}: no service {host!r}"
            other = services()[host]
            assert kind(other) is not None, f"{name}: target {target} runs no axpo service"
            assert int(port) == default_port(str(kind(other))), f"{name}: target {target}"
            assert environment(other).get(f"AXPO_{str(kind(other)).upper()}_RPC__PORT") in (
                None,
                port,
            )
            assert profile(other) in (None, profile(svc)), f"{name}: {target} is off-profile"
            condition = (svc.get("depends_on") or {}).get(host, {}).get("condition")
            assert condition == "service_healthy", f"{name} must wait for {host} to be healthy"
            checked += 1
    # Per profile: the learner's inference target and the rollout's three.
    assert checked == 2 * 4


def test_redis_urls_name_the_redis_service() -> None:
    redis = services()["redis"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-\w+)?", redis["image"]), "pin the Redis version"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes", "AOF on"
    for name, (_, svc) in axpo_services().items():
        for var, value in environment(svc).items():
            if var.endswith("REDIS_URL"):
                assert value == "redis://redis:6379/0", f"{name}: {var}"
                assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name


def reservations(svc: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = svc.get("deploy") or {}
    return list((deploy.get("resources") or {}).get("reservations", {}).get("devices", []))


def test_gpus_are_reserved_by_the_gpu_services_only() -> None:
    gpu_services = 0
    for name, svc in services().items():
        devices = reservations(svc)
        if profile(svc) == "gpu" and kind(svc) in GPU_KINDS:
            assert len(devices) == 1, f"{name}: one GPU reservation"
            (device,) = devices
            assert device["driver"] == "nvidia", name
            assert device["capabilities"] == ["gpu"], name
            assert device["device_ids"], name
            assert all(device["device_ids"]), name
            gpu_services += 1
        else:
            assert not devices, f"{name}: reserves {devices}"
            assert not svc.get("runtime"), name
            assert not svc.get("devices"), name
    assert gpu_services == len(GPU_KINDS)
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    ids = {
        raw[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
        for n in GPU_KINDS
    }
    assert ids == {"${AXPO_INFERENCE_GPUS:-0}", "${AXPO_LEARNER_GPUS:-1}"}, "separate GPUs"
    for name, (k, svc) in axpo_services().items():
        if k == "learner":
            want = "cuda" if profile(svc) == "gpu" else "cpu"
            assert environment(svc)["AXPO_LEARNER_DEVICE"] == want, name


def mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (volume or host path, read-only) of the short syntax."""
    found = {}
    for entry in svc.get("volumes", []):
        source, target, *mode = entry.split(":")
        found[target] = (source, mode == ["ro"])
    return found


def mount_of(svc: dict[str, Any], path: str) -> tuple[str, str, bool]:
    """(mount point, source, read-only) of the mount holding ``path``."""
    for target, (source, ro) in sorted(mounts(svc).items(), key=lambda m: -len(m[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return target, source, ro
    raise AssertionError(f"{path} is on no volume of the service")


def test_the_learner_publishes_where_its_inference_service_reads() -> None:
    learners = [(n, s) for n, (k, s) in axpo_services().items() if k == "learner"]
    assert len(learners) == len(PROFILES)
    for name, svc in learners:
        env = environment(svc)
        publish = str(env["AXPO_LEARNER_PUBLISH_DIR"])
        point, source, ro = mount_of(svc, publish)
        assert not ro, f"{name}: {publish} is read-only"
        assert compose()["volumes"].keys() >= {source}, f"{name}: {source} is a named volume"
        for target in targets(svc):
            inference = services()[target.rpartition(":")[0]]
            assert mount_of(inference, publish)[:2] == (point, source), f"{name} -> {target}"
        jobs = mount_of(svc, str(env["AXPO_LEARNER_JOBS_DIR"]))
        assert not jobs[2], name
        assert jobs[1] in compose()["volumes"], name


def test_the_model_is_prepared_once_and_read_from_a_shared_volume() -> None:
    model_vars = {
        "inference": "AXPO_INFERENCE_MODEL",
        "learner": "AXPO_LEARNER_MODEL",
        "rollout": "AXPO_ROLLOUT_TOKENIZER",
    }
    for name, (k, svc) in axpo_services().items():
        if k not in model_vars:
            continue
        path = str(environment(svc)[model_vars[k]])
        _, source, ro = mount_of(svc, path)
        assert ro, f"{name}: the model volume is mounted read-only"
        preparers = [
            dep
            for dep, how in svc["depends_on"].items()
            if how["condition"] == "service_completed_successfully"
        ]
        assert len(preparers) == 1, f"{name}: waits for one model service"
        preparer = services()[preparers[0]]
        assert preparer["restart"] == "no", preparers[0]
        assert kind(preparer) is None, preparers[0]
        assert mount_of(preparer, path)[1:] == (source, False), f"{preparers[0]} writes {path}"
        assert path in " ".join(preparer["command"]), f"{preparers[0]} must write {path}"
        if profile(svc) == "gpu":
            assert "/models-cache" in mounts(svc), f"{name}: /models/current links into the cache"
    gpu_learner = services()["learner"]
    assert environment(gpu_learner)["AXPO_LEARNER_MODEL_NAME"] == "Qwen/Qwen3-VL-2B-Thinking"
    assert (
        "${AXPO_MODEL:-" in yaml.safe_load(COMPOSE.read_text())["services"]["model"]["command"][1]
    )


def test_restart_policies() -> None:
    for name, svc in services().items():
        if kind(svc) is None and name != "redis":
            assert svc.get("restart") == "no", f"{name}: a one-shot service"
        else:
            assert svc.get("restart") == "unless-stopped", name


def test_only_the_tool_server_gets_privileges_and_only_what_its_sandbox_needs() -> None:
    for name, svc in services().items():
        assert not svc.get("privileged"), name
        if kind(svc) == "tools":
            assert svc["cap_drop"] == ["ALL"], name
            assert "SYS_ADMIN" in svc["cap_add"], name
            assert "no-new-privileges:true" in svc["security_opt"], name
        else:
            assert not svc.get("cap_add"), name
            assert not svc.get("security_opt"), name


def test_env_example_lists_every_variable_the_file_uses() -> None:
    used = set(VARIABLE.findall(COMPOSE.read_text()))
    used_names = {name for name, _, _ in used}
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used_names <= listed, f"not in .env.example: {sorted(used_names - listed)}"
    assert listed - used_names == {"COMPOSE_PROFILES"}, sorted(listed - used_names)
    assert re.search(r"^COMPOSE_PROFILES=gpu$", ENV_EXAMPLE.read_text(), re.MULTILINE)


# --------------------------------------------------------------------------- validator


def compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v2 standalone or v1), if any."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_compose(cli: list[str], *args: str, profile_env: str | None = None) -> str:
    # Only what compose needs from this process: no AXPO_*, HF_HOME or .env of the developer.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    if profile_env is not None:
        env["COMPOSE_PROFILES"] = profile_env
    result = subprocess.run(
        [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, f"{' '.join(cli)} {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def test_compose_validates_both_profiles() -> None:
    cli = compose_cli()
    if cli is None:
        validator_missing(
            "no Compose validator: apt-get install -y --no-install-recommends docker-compose"
        )
    version = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True)
    v1 = version.stdout.strip().startswith("1.")
    for which in PROFILES:
        run_compose(cli, "--env-file", str(ENV_EXAMPLE), "config", "-q", profile_env=which)
    if v1:
        return  # Compose 1.x lists every service whatever the profile
    listed = {
        which: set(
            run_compose(
                cli, "--env-file", str(ENV_EXAMPLE), "--profile", which, "config", "--services"
            ).split()
        )
        for which in PROFILES
    }
    for which in PROFILES:
        assert listed[which] == {n for n in services() if active(n, which)}, which
    # .env.example's COMPOSE_PROFILES=gpu: plain `docker compose up` is the GPU host.
    default = set(run_compose(cli, "--env-file", str(ENV_EXAMPLE), "config", "--services").split())
    assert default == listed["gpu"]
