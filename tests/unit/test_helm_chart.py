"""The Helm chart k8s/axpo: it lints and renders with both values files (and the switches
that add objects), every rendered object is valid Kubernetes (kubernetes-validate, strict),
the KEDA ScaledObject has the fields KEDA knows and names the Redis keys axpo really uses,
every AXPO_* variable is a field of its service's settings class (and the env of each
container builds that class), images, NetworkPolicies and probes are what the deployment
needs.

Rendering uses Helm's own engine: the ``helm`` binary when one is on PATH, else the
``helm-python-sdk`` package (Helm's Go SDK as a library: ``pip install helm-python-sdk``).
Tests that render skip, saying why, only when neither is installed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import types
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings

from axpo.jobs import JobState, JobStore
from axpo.queue import TrajectoryQueue
from axpo.settings.api import ApiSettings
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo.settings.rollout import RolloutSettings
from tests.settings_fields import SETTINGS, env_error

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "axpo"
RELEASE, NAMESPACE = "axpo", "ml"
TEMPLATE_ARGS = (RELEASE, str(CHART), "--namespace", NAMESPACE)
# The chart's kubeVersion floor, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", "latest")
KUBE_FLAG = ("--kube-version", "1.30.0")

SERVICES = tuple(SETTINGS)

# Values files, and the switches that render the objects the defaults leave out (KEDA with
# either trigger, path transport with its RWX volume, an Ingress, an external Redis, the tool
# server without its sandbox, no gRPC token).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpu": ("values.yaml", {}),
    "cpu-tiny": ("values-cpu-tiny.yaml", {}),
    "keda-jobs": (
        "values.yaml",
        {
            "autoscaling": {"keda": {"enabled": True}},
            "publishTransport": "path",
            "inference": {"replicas": 3},
            "api": {"ingress": {"enabled": True, "className": "nginx"}},
        },
    ),
    "keda-stream": (
        "values.yaml",
        {
            "autoscaling": {
                "minReplicas": 2,
                "keda": {
                    "enabled": True,
                    "trigger": "stream",
                    "stream": {"jobId": "grpo-0a1b2c3d4e"},
                },
            },
            "redis": {"external": {"url": "redis://:secret@redis.example.net:6380/2"}},
            "tools": {"sandbox": {"userNamespace": True}, "runtimeClassName": "gvisor"},
        },
    ),
    "no-sandbox": (
        "values-cpu-tiny.yaml",
        {"tools": {"sandbox": {"enabled": False}}, "grpcAuth": {"enabled": False}},
    ),
}
BASE_VARIANTS = ("gpu", "cpu-tiny")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------ Helm


class Helm:
    """``helm lint`` and ``helm template`` through the binary or the Python SDK."""

    def __init__(self) -> None:
        self.binary = shutil.which("helm")
        self.sdk: types.ModuleType | None = None
        if self.binary is None:
            try:
                import helm_python

                self.sdk = helm_python
            except ImportError:
                pass

    @property
    def missing(self) -> str | None:
        if self.binary is None and self.sdk is None:
            return (
                "no Helm: neither a `helm` binary on PATH nor the helm-python-sdk package "
                "(pip install helm-python-sdk)"
            )
        return None

    def _values_file(self, values: dict[str, Any], tmp: Path) -> Path:
        path = tmp / "values.json"
        path.write_text(json.dumps(values))
        return path

    def lint(self, values: dict[str, Any], tmp: Path) -> list[str]:
        """Findings of `helm lint --strict` (warnings and errors; info is not a finding)."""
        if self.binary is not None:
            values_file = str(self._values_file(values, tmp))
            proc = subprocess.run(
                [self.binary, "lint", "--strict", str(CHART), *KUBE_FLAG, "-f", values_file],
                capture_output=True,
                text=True,
            )
            out = proc.stdout + proc.stderr
            found = [line for line in out.splitlines() if re.match(r"\[(WARNING|ERROR)\]", line)]
            if proc.returncode != 0 and not found:
                found = [out]
            return found
        assert self.sdk is not None
        report = self.sdk.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
        return list(report["errors"]) + [
            f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2
        ]

    def template(self, values: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
        """Every object `helm template` renders (NOTES.txt aside)."""
        if self.binary is not None:
            values_file = str(self._values_file(values, tmp))
            proc = subprocess.run(
                [self.binary, "template", *TEMPLATE_ARGS, *KUBE_FLAG, "-f", values_file],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"helm template failed: {proc.stderr}")
            text = proc.stdout
        else:
            assert self.sdk is not None
            with self.sdk.Chart.load(str(CHART)) as chart:
                rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
            text = "\n---\n".join(v for k, v in sorted(rendered.items()) if k.endswith(".yaml"))
        return [doc for doc in yaml.safe_load_all(text) if doc]


HELM = Helm()
# Skipped without Helm, except under CI, where setup.sh installs it: there the test fails.
needs_helm = pytest.mark.skipif(
    HELM.missing is not None and not os.environ.get("CI"), reason=HELM.missing or ""
)


def values_of(variant: str) -> dict[str, Any]:
    """The values a variant renders with: the chart's defaults, its file, its switches."""
    file, over = VARIANTS[variant]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return deep_merge(deep_merge(defaults, yaml.safe_load((CHART / file).read_text())), over)


@cache
def _rendered(variant: str, tmp: str) -> tuple[dict[str, Any], ...]:
    return tuple(HELM.template(values_of(variant), Path(tmp)))


def render(variant: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.getbasetemp() / "helm"
    tmp.mkdir(exist_ok=True)
    return copy.deepcopy(list(_rendered(variant, str(tmp))))


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every Deployment and StatefulSet."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def served(container: dict[str, Any]) -> str | None:
    """The service a container runs (`axpo serve <service>`), None for other containers."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    for i, word in enumerate(argv[:-1]):
        if word == "serve":
            return str(argv[i + 1])
    return None


def service_containers(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict]]:
    """service -> (its container, its pod template)."""
    found: dict[str, tuple[dict[str, Any], dict]] = {}
    for _, template in pod_specs(docs):
        for c in template["spec"]["containers"]:
            svc = served(c)
            if svc is not None:
                assert svc not in found, f"two containers serve {svc}"
                found[svc] = (c, template)
    return found


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -------------------------------------------------------------- (1) lint and template


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chart_lints_and_renders(variant: str, tmp_path: Path, tmp_path_factory) -> None:
    assert HELM.lint(values_of(variant), tmp_path) == []
    docs = render(variant, tmp_path_factory)
    assert docs, "nothing rendered"
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects of one kind share a name"
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    assert set(service_containers(docs)) == set(SERVICES)


@needs_helm
@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"publishTransport": "nfs"}, "publishTransport"),
        ({"model": {"source": "s3"}}, "model.source"),
        ({"autoscaling": {"keda": {"enabled": True, "trigger": "stream"}}}, "stream.jobId"),
    ],
)
def test_chart_refuses_bad_values(over: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        HELM.template(deep_merge(values_of("gpu"), over), tmp_path)


# ------------------------------------------------- (2) valid Kubernetes, KEDA's fields


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_are_valid_kubernetes(variant: str, tmp_path_factory) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install it)"
    )
    checked = 0
    for doc in render(variant, tmp_path_factory):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: test_scaled_object_* below
        for version in KUBE_VERSIONS:
            v = kv.latest_version() if version == "latest" else version
            try:
                kv.validate(doc, v, strict=True)
            except kv.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{doc['kind']} {doc['metadata']['name']} ({v}): {where}: {exc.message}"
                )
        checked += 1
    assert checked > 20


# KEDA's ScaledObject CRD (keda.sh/v1alpha1) is not available offline in any package this
# project installs, so this schema is written here: the fields the chart uses, with the CRD's
# types, and no others (unknown fields are refused, as the API server's strict field
# validation does). The trigger metadata keys are those of KEDA's redis, redis-streams and
# cpu scalers (pkg/scalers/redis_scaler.go, redis_streams_scaler.go, cpu_memory_scaler.go).
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": _STR_MAP},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": ["redis", "redis-streams", "cpu"]},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": _STR_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
TRIGGER_KEYS = {
    "redis": {"address", "databaseIndex", "listName", "listLength", "activationListLength"},
    "redis-streams": {
        "address",
        "databaseIndex",
        "stream",
        "consumerGroup",
        "lagCount",
        "activationLagCount",
        "pendingEntriesCount",
    },
    "cpu": {"value"},
}
TRIGGER_REQUIRED = {"redis": {"address", "listName"}, "redis-streams": {"address", "stream"}}


def scaled_object(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = objects(docs, "ScaledObject")
    return found


@needs_helm
@pytest.mark.parametrize("variant", ["keda-jobs", "keda-stream"])
def test_scaled_object_has_kedas_fields(variant: str, tmp_path_factory) -> None:
    docs = render(variant, tmp_path_factory)
    so = scaled_object(docs)
    jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
    spec = so["spec"]
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]  # the CRD's CEL rule
    assert spec.get("idleReplicaCount", -1) < spec["minReplicaCount"]
    for trigger in spec["triggers"]:
        keys = set(trigger["metadata"])
        assert keys <= TRIGGER_KEYS[trigger["type"]], trigger
        assert TRIGGER_REQUIRED.get(trigger["type"], set()) <= keys, trigger
    # What it scales is the rollout Deployment, and no HPA competes with KEDA's.
    (rollout,) = [
        d
        for d in objects(docs, "Deployment")
        if served(d["spec"]["template"]["spec"]["containers"][0]) == "rollout"
    ]
    assert spec["scaleTargetRef"]["name"] == rollout["metadata"]["name"]
    assert "replicas" not in rollout["spec"]
    assert objects(docs, "HorizontalPodAutoscaler") == []


@needs_helm
def test_scaled_object_names_the_real_redis_keys(tmp_path_factory) -> None:
    queue = QueueSettings()
    # trigger jobs: the job store's set of running jobs, as JobStore names it.
    so = scaled_object(render("keda-jobs", tmp_path_factory))
    (redis_trigger,) = [t for t in so["spec"]["triggers"] if t["type"] == "redis"]
    store = JobStore(mock.MagicMock(), key_prefix=values_of("keda-jobs")["keyPrefix"])
    assert redis_trigger["metadata"]["listName"] == store._state_prefix + JobState.RUNNING
    assert redis_trigger["metadata"]["address"] == f"{RELEASE}-redis:6379"
    # trigger stream: that job's prompts stream and the rollout workers' consumer group.
    values = values_of("keda-stream")
    so = scaled_object(render("keda-stream", tmp_path_factory))
    (trigger,) = so["spec"]["triggers"]
    job = values["autoscaling"]["keda"]["stream"]["jobId"]
    tq = TrajectoryQueue(mock.MagicMock(), job, queue.model_copy(update={"key_prefix": "axpo"}))
    assert trigger["metadata"]["stream"] == tq.prompts_key
    assert trigger["metadata"]["consumerGroup"] == queue.prompts_consumer_group
    assert trigger["metadata"]["address"] == "redis.example.net:6380"
    assert trigger["metadata"]["databaseIndex"] == "2"


# --------------------------------------------- (3) AXPO_* variables are settings fields


def resolve_env(cls: type[BaseSettings], name: str) -> None:
    """Raise KeyError unless ``name`` is a field path of ``cls`` (``AXPO_LEARNER_QUEUE__
    REDIS_URL`` -> ``queue.redis_url``), following nested models through ``__``."""
    problem = env_error(cls, name)
    if problem is not None:
        raise KeyError(problem)


def test_resolve_env_refuses_a_typo() -> None:
    resolve_env(LearnerSettings, "AXPO_LEARNER_QUEUE__REDIS_URL")
    resolve_env(RolloutSettings, "AXPO_ROLLOUT_INFERENCE__AUTH_TOKEN")
    for cls, name in [
        (LearnerSettings, "AXPO_LEARNER_QUEUE__REDIS_URI"),
        (LearnerSettings, "AXPO_LEARNER_MODEL__NAME"),
        (RolloutSettings, "AXPO_LEARNER_JOB_STORE"),
        (ApiSettings, "AXPO_API_TOKEN"),
    ]:
        with pytest.raises(KeyError):
            resolve_env(cls, name)


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_axpo_variable_is_a_settings_field(variant: str, tmp_path_factory) -> None:
    seen = 0
    for workload, template in pod_specs(render(variant, tmp_path_factory)):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            svc = served(c)
            for env in c.get("env", []):
                if not env["name"].startswith("AXPO_"):
                    continue
                where = f"{workload['metadata']['name']}/{c['name']}: {env['name']}"
                assert svc is not None, f"{where}: not in a container that runs `axpo serve`"
                try:
                    resolve_env(SETTINGS[svc], env["name"])
                except KeyError as exc:
                    pytest.fail(f"{where}: {exc}")
                seen += 1
    assert seen > 30


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_containers_env_builds_its_settings(
    variant: str, tmp_path_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the container would see it: secrets and pod fields as placeholders, `$(VAR)`
    expanded from the variables defined before it (Kubernetes expands no others)."""
    import os

    for svc, (container, _) in service_containers(render(variant, tmp_path_factory)).items():
        for name in [n for n in os.environ if n.startswith("AXPO_")]:
            monkeypatch.delenv(name)
        defined: dict[str, str] = {}
        names = [e["name"] for e in container["env"]]
        assert len(names) == len(set(names)), f"{svc}: a variable set twice"
        for env in container["env"]:
            value = env.get("value")
            if value is None:
                source = env["valueFrom"]
                value = "pod-name" if "fieldRef" in source else "secret-value"
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                assert ref in defined, f"{svc}: {env['name']} uses $({ref}) defined after it"
                value = value.replace(f"$({ref})", defined[ref])
            defined[env["name"]] = value
            if env["name"].startswith("AXPO_"):
                monkeypatch.setenv(env["name"], value)
        settings = SETTINGS[svc]()
        rpc = getattr(settings, "rpc", None)
        if rpc is not None:
            assert rpc.host == "0.0.0.0", f"{svc} listens on {rpc.host}"


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_targets_name_rendered_services(variant: str, tmp_path_factory) -> None:
    docs = render(variant, tmp_path_factory)
    values = values_of(variant)
    containers = service_containers(docs)
    env = {svc: {e["name"]: e.get("value") for e in c["env"]} for svc, (c, _) in containers.items()}
    services = {s["metadata"]["name"]: s for s in objects(docs, "Service")}

    def port_of(host: str, port: int, component: str) -> None:
        svc = services[host]
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == component
        assert port in [p["port"] for p in svc["spec"]["ports"]]

    for name in ("inference", "tools", "verifier"):
        host, port = env["rollout"][f"AXPO_ROLLOUT_{name.upper()}__TARGET"].rsplit(":", 1)
        port_of(host, int(port), name)
    # The learner names every inference replica by its StatefulSet pod's DNS name.
    (sts,) = [
        s for s in objects(docs, "StatefulSet") if s["metadata"]["name"].endswith("-inference")
    ]
    targets = json.loads(env["learner"]["AXPO_LEARNER_INFERENCE_TARGETS"])
    assert len(targets) == sts["spec"]["replicas"] == values["inference"]["replicas"]
    headless = sts["spec"]["serviceName"]
    assert services[headless]["spec"]["clusterIP"] == "None"
    for i, t in enumerate(targets):
        host, port = t["target"].rsplit(":", 1)
        pod, svc, ns, *_ = host.split(".")
        assert (pod, svc, ns) == (f"{sts['metadata']['name']}-{i}", headless, NAMESPACE)
        port_of(headless, int(port), "inference")
    # The transport and its volume agree.
    transport = env["learner"]["AXPO_LEARNER_PUBLISH_TRANSPORT"]
    assert transport == values["publishTransport"]
    if transport == "path":
        publish = env["learner"]["AXPO_LEARNER_PUBLISH_DIR"]
        for svc in ("learner", "inference"):
            mounts = {m["mountPath"]: m["name"] for m in containers[svc][0]["volumeMounts"]}
            assert mounts.get(publish) == "publish", f"{svc} lacks the publish volume"
        (pvc,) = objects(docs, "PersistentVolumeClaim")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------------- (4) images

IMAGE = re.compile(
    r"^(?:[a-z0-9.-]+(?::\d+)?(?:/[a-z0-9._-]+)*/)?axpo/(api|verifier|tools|inference|learner|rollout)"
    r":[A-Za-z0-9_][A-Za-z0-9_.-]*$"
)


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_images_are_the_projects_or_redis(variant: str, tmp_path_factory) -> None:
    for workload, template in pod_specs(render(variant, tmp_path_factory)):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            image, svc = c["image"], served(c)
            if image.startswith("redis:"):
                assert c["name"] == "redis"
                continue
            m = IMAGE.match(image)
            assert m, f"{workload['metadata']['name']}/{c['name']}: image {image}"
            if svc is not None:
                assert m.group(1) == svc, f"{svc} runs in the {m.group(1)} image"


@needs_helm
def test_registry_and_tags(tmp_path: Path) -> None:
    values = deep_merge(
        values_of("cpu-tiny"), {"image": {"registry": "ghcr.io/acme/", "tag": "0.1.0"}}
    )
    images = {
        c["image"]
        for _, t in pod_specs(HELM.template(values, tmp_path))
        for c in t["spec"]["containers"]
    }
    assert "ghcr.io/acme/axpo/learner:0.1.0" in images
    assert "ghcr.io/acme/axpo/inference:dev-cpu" in images


# ------------------------------------------------------------------ (5) NetworkPolicies


@needs_helm
@pytest.mark.parametrize("variant", BASE_VARIANTS)
@pytest.mark.parametrize("svc", ["tools", "verifier"])
def test_tools_and_verifier_accept_only_rollout_and_send_nothing(
    variant: str, svc: str, tmp_path_factory
) -> None:
    docs = render(variant, tmp_path_factory)
    containers = service_containers(docs)
    labels = {s: t["metadata"]["labels"] for s, (_, t) in containers.items()}
    port = SETTINGS[svc].model_fields["rpc"].default.port
    policies = [
        p
        for p in objects(docs, "NetworkPolicy")
        if matches(p["spec"]["podSelector"]["matchLabels"], labels[svc])
    ]
    assert len(policies) == 1, f"{len(policies)} policies select the {svc} pods"
    spec = policies[0]["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert not spec.get("egress"), f"{svc} has egress rules: {spec.get('egress')}"
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    assert rule["from"], "an ingress rule without `from` admits everyone"
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, peer  # no namespaceSelector / ipBlock
        selector = peer["podSelector"]["matchLabels"]
        allowed = [s for s, lab in labels.items() if matches(selector, lab)]
        assert allowed == ["rollout"], f"{svc} admits {allowed}"


@needs_helm
@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_every_pod_has_a_policy_and_only_the_api_is_exposed(variant: str, tmp_path_factory) -> None:
    docs = render(variant, tmp_path_factory)
    policies = objects(docs, "NetworkPolicy")
    for workload, template in pod_specs(docs):
        labels = template["metadata"]["labels"]
        assert any(matches(p["spec"]["podSelector"]["matchLabels"], labels) for p in policies), (
            f"no NetworkPolicy selects {workload['metadata']['name']}"
        )
    for policy in policies:
        component = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for rule in policy["spec"].get("ingress", []):
            if component != "api":
                assert rule.get("from"), f"{policy['metadata']['name']} admits anyone"
    for svc in objects(docs, "Service"):
        if svc["spec"]["selector"]["app.kubernetes.io/component"] != "api":
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]


# ----------------------------------------------------------------------- (6) probes


@needs_helm
@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_probe_ports_are_the_settings_default_ports(variant: str, tmp_path_factory) -> None:
    for svc, (c, _) in service_containers(render(variant, tmp_path_factory)).items():
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        probes = [c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
        if svc == "api":
            default = ApiSettings.model_fields["port"].default
            assert ports == {"http": default}
            assert env["AXPO_API_PORT"] == str(default)
            paths = {k: c[k]["httpGet"]["path"] for k in ("readinessProbe", "livenessProbe")}
            assert paths == {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
            for probe in probes:
                assert ports[probe["httpGet"]["port"]] == default
            continue
        default = SETTINGS[svc].model_fields["rpc"].default.port
        assert ports == {"grpc": default}, svc
        assert env[f"AXPO_{svc.upper()}_RPC__PORT"] == str(default)
        for probe in probes:
            assert probe["grpc"] == {"port": default}, f"{svc}: {probe}"


# ------------------------------------------------------------------------- security


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_security_contexts(variant: str, tmp_path_factory) -> None:
    values = values_of(variant)
    for workload, template in pod_specs(render(variant, tmp_path_factory)):
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False
        tools_sandbox = (
            any(served(c) == "tools" for c in spec["containers"])
            and values["tools"]["sandbox"]["enabled"]
        )
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{workload['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert c["resources"]["requests"], where
            assert c["resources"]["limits"]["memory"], where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: no writable /tmp"
            if tools_sandbox:
                # The named exceptions (values.yaml, tools.sandbox), and nothing beyond them.
                assert spec["securityContext"]["runAsUser"] == 0
                assert set(sc["capabilities"]["add"]) == {
                    "SYS_ADMIN", "SYS_CHROOT", "SETUID", "SETGID", "SETPCAP",
                    "MKNOD", "CHOWN", "DAC_OVERRIDE", "KILL",
                }  # fmt: skip
                assert not sc.get("privileged")
                continue
            assert "add" not in sc["capabilities"], where
            assert sc["allowPrivilegeEscalation"] is False, where
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True, where
            assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod["runAsUser"] in (10001, 999), where  # the images' users (redis: 999)


@needs_helm
@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_gpu_requests_follow_the_values(variant: str, tmp_path_factory) -> None:
    values = values_of(variant)
    containers = service_containers(render(variant, tmp_path_factory))
    want = {
        "inference": values["inference"]["gpusPerReplica"],
        "learner": values["learner"]["gpus"],
    }
    for svc, (c, _) in containers.items():
        gpus = c["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus == want.get(svc, 0), f"{svc}: {gpus} GPUs"
    env = {e["name"]: e.get("value") for e in containers["learner"][0]["env"]}
    assert env["AXPO_LEARNER_JOB_STORE"] == "true"
    assert env["AXPO_LEARNER_MODEL_NAME"] == values["model"]["name"]
