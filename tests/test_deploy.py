"""deploy/kubernetes, checked offline against the real code, and every deployment's processes
against the queues inferq publishes to.

The kustomization is built here without kubectl: its ``resources`` read in order, its
``configMapGenerator`` files loaded as ConfigMaps, its namespace, labels and images applied.
Built-in kinds are validated with ``kubernetes-validate`` (strict: unknown fields fail); KEDA's
ScaledObject against a schema of the fields KEDA documents (keda.sh, ScaledObject
specification and the Prometheus and Redis scalers, v2.18).

The queue check runs each deployment's `inferq` commands for real (tests/queue_census.py) and
asks what each consumes; the queues come from the Celery app the code builds for the
deployment's config, which refuses to publish anywhere else.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.settings import Settings
from router.config import RouterConfig, load_config
from tasks.app import create_celery
from tasks.queues import model_queues
from tests.conftest import BROKER_PREFIX, free_port, service_env
from tests.queue_census import MARK
from tests.test_compose import (
    ROOT,
    SECRET_NAME,
    SERVICES,
    command_of,
    compose_duration_s,
    drain_seconds,
    mounted_config_path,
    parse_inferq,
)

K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
# The oldest Kubernetes we claim, and the newest the validator knows.
K8S_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
CLUSTER_SCOPED = {"Namespace"}
SECRET = "inferq-secrets"


def build() -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/kubernetes` would give, for what this set uses."""
    objects: list[dict[str, Any]] = []
    for resource in KUSTOMIZATION["resources"]:
        path = K8S / resource
        assert path.is_file(), f"kustomization.yaml lists {resource}, which is not there"
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in KUSTOMIZATION.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
            data[key or Path(source).name] = (K8S / source).read_text()
        metadata = {"name": generator["name"]}
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    images = {i["name"]: i for i in KUSTOMIZATION.get("images", [])}
    labels = {k: v for group in KUSTOMIZATION.get("labels", []) for k, v in group["pairs"].items()}
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if obj["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = KUSTOMIZATION["namespace"]
        metadata["labels"] = {**metadata.get("labels", {}), **labels}
        for container in _containers(obj):
            image = images.get(container["image"])
            if image:
                name = image.get("newName", container["image"])
                container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    return objects


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(obj)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


OBJECTS = build()
NAMESPACE = KUSTOMIZATION["namespace"]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in of_kind(kind) if o["metadata"]["name"] == name]
    return found


def ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def inferq_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (o, c) for o in OBJECTS for c in _containers(o) if c.get("command", [])[:1] == ["inferq"]
    ]


def worker_deployments() -> dict[str, dict[str, Any]]:
    """Model -> the Deployment running `inferq worker --model MODEL`."""
    found = {}
    for obj, container in inferq_containers():
        if container["command"][1:2] == ["worker"]:
            model = parse_inferq(container["command"]).params["model"]
            assert model not in found, f"two Deployments serve {model}"
            found[model] = obj
    return found


def k8s_config() -> RouterConfig:
    """The models and routes the pods mount at INFERQ_CONFIG (a generated ConfigMap)."""
    env = named("ConfigMap", "inferq-env")["data"]
    folder, file = env["INFERQ_CONFIG"].rsplit("/", 1)
    for obj, container in inferq_containers():
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in _pod_spec(obj)["volumes"]}  # type: ignore[index]
        assert folder in mounts, f"{ident(obj)}: nothing mounted at {folder}"
        config_map = volumes[mounts[folder]]["configMap"]["name"]
        assert config_map == "inferq-config", ident(obj)
    text = named("ConfigMap", "inferq-config")["data"][file]
    return RouterConfig.model_validate(yaml.safe_load(text))


# --- the kustomization and its kinds ------------------------------------------------------


def test_kustomization_lists_every_manifest_in_the_folder() -> None:
    """A worker-<model>.yaml copied but not listed would never be applied."""
    manifests = {
        path.name
        for path in K8S.glob("*.yaml")
        if path.name != "kustomization.yaml"
        and any("apiVersion" in (doc or {}) for doc in yaml.safe_load_all(path.read_text()))
    }
    assert manifests == set(KUSTOMIZATION["resources"])
    names = [ident(o) for o in OBJECTS]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "obj", [o for o in OBJECTS if o["apiVersion"] != "keda.sh/v1alpha1"], ids=ident
)
def test_builtin_kinds_are_valid(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{ident(obj)} on Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_validation_is_strict() -> None:
    """An unknown field (a typo of a real one) fails, so the test above can fail."""
    api = copy.deepcopy(named("Deployment", "inferq-api"))
    api["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, K8S_VERSIONS[0], strict=True)


def config_map_references(obj: dict[str, Any]) -> Iterator[tuple[str, str | None]]:
    """(ConfigMap, key or None) for each ConfigMap a pod template uses."""
    spec = _pod_spec(obj) or {}
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            yield volume["configMap"]["name"], None
    for container in _containers(obj):
        for source in container.get("envFrom", []):
            yield source["configMapRef"]["name"], None
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                yield ref["name"], ref["key"]


@pytest.mark.parametrize("obj", [o for o in OBJECTS if _pod_spec(o)], ids=ident)
def test_what_a_pod_uses_is_in_the_set(obj: dict[str, Any]) -> None:
    """Every ConfigMap (and key) a pod uses is built here, and its selector matches its pods;
    the Secret is the exception, created by hand (docs/deployment.md)."""
    for name, key in config_map_references(obj):
        assert key is None or key in named("ConfigMap", name)["data"], f"{name}: no {key}"
    if "selector" in obj["spec"]:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("service", of_kind("Service"), ids=ident)
def test_services_select_pods_and_their_ports(service: dict[str, Any]) -> None:
    selector = service["spec"]["selector"].items()
    [deployment] = [
        d
        for d in of_kind("Deployment")
        if selector <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    ports = {p["name"] for c in _containers(deployment) for p in c.get("ports", [])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


# --- KEDA ---------------------------------------------------------------------------------

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
# Trigger metadata, by scaler: every documented key (required ones listed). Values are strings
# (KEDA's metadata is a map of strings: an unquoted 128 is refused by the CRD).
SCALER_METADATA: dict[str, tuple[set[str], set[str]]] = {
    "prometheus": (
        {"serverAddress", "query", "threshold"},
        {
            "activationThreshold",
            "namespace",
            "customHeaders",
            "ignoreNullValues",
            "queryParameters",
            "unsafeSsl",
            "timeout",
            "authModes",
        },
    ),
    "redis": (
        {"listName", "listLength"},
        {
            "address",
            "addressFromEnv",
            "host",
            "hostFromEnv",
            "port",
            "portFromEnv",
            "usernameFromEnv",
            "passwordFromEnv",
            "activationListLength",
            "enableTLS",
            "unsafeSsl",
            "databaseIndex",
        },
    ),
}


def _scaler(kind: str) -> dict[str, Any]:
    required, optional = SCALER_METADATA[kind]
    return {
        "if": {"properties": {"type": {"const": kind}}},
        "then": {
            "properties": {
                "metadata": {
                    **_STRINGS,
                    "required": sorted(required),
                    "propertyNames": {"enum": sorted(required | optional)},
                }
            }
        },
    }


def _closed(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_INT = {"type": "integer", "minimum": 0}
SCALED_OBJECT_SCHEMA = _closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": _closed(
            {
                "scaleTargetRef": _closed(
                    {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                    "name",
                ),
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "fallback": _closed(
                    {
                        "failureThreshold": _INT,
                        "replicas": _INT,
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                            ]
                        },
                    },
                    "failureThreshold",
                    "replicas",
                ),
                "advanced": _closed(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": _closed(
                            # behavior: checked against Kubernetes' own HPA schema below.
                            {"name": {"type": "string"}, "behavior": {"type": "object"}}
                        ),
                        "scalingModifiers": _closed(
                            {
                                "target": {"type": "string"},
                                "activationTarget": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value"]},
                                "formula": {"type": "string"},
                            },
                            "target",
                            "formula",
                        ),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        **_closed(
                            {
                                "type": {"enum": sorted(SCALER_METADATA)},
                                "name": {"type": "string"},
                                "metadata": _STRINGS,
                                "useCachedMetrics": {"type": "boolean"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "authenticationRef": _closed(
                                    {"name": {"type": "string"}, "kind": {"type": "string"}},
                                    "name",
                                ),
                            },
                            "type",
                            "metadata",
                        ),
                        "allOf": [_scaler(kind) for kind in SCALER_METADATA],
                    },
                },
            },
            "scaleTargetRef",
            "triggers",
        ),
    },
    "apiVersion",
    "kind",
    "metadata",
    "spec",
)


def check_scaled_object(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, SCALED_OBJECT_SCHEMA)
    spec = obj["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    if "idleReplicaCount" in spec:
        assert spec["idleReplicaCount"] < spec.get("minReplicaCount", 0)
    names = [t.get("name", t["type"]) for t in spec["triggers"]]
    assert len(names) == len(set(names)), "two triggers with one name"
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "keda-hpa"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(hpa, version, strict=True)


@pytest.mark.parametrize("obj", of_kind("ScaledObject"), ids=ident)
def test_scaled_object_has_only_documented_fields(obj: dict[str, Any]) -> None:
    check_scaled_object(obj)
    named(
        obj["spec"]["scaleTargetRef"].get("kind", "Deployment"),
        obj["spec"]["scaleTargetRef"]["name"],
    )


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s["spec"].update(cooldownPeriod="900"),
        lambda s: s["spec"].update(coolDownPeriod=900),
        lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=128),
        lambda s: s["spec"]["triggers"][0]["metadata"].pop("query"),
        lambda s: s["spec"]["triggers"][0]["metadata"].update(treshold="1"),
        lambda s: s["spec"]["fallback"].pop("replicas"),
        lambda s: s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"].update(
            scaleDown={"stabilizationWindowSeconds": "600"}
        ),
    ],
    ids=["string-int", "misspelt-field", "unquoted", "no-query", "misspelt-key", "fallback", "hpa"],
)
def test_scaled_object_check_refuses_what_keda_would(breakage: Any) -> None:
    broken = copy.deepcopy(of_kind("ScaledObject")[0])
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        check_scaled_object(broken)


# --- workers: one per model, a GPU each, probes, grace, autoscaling ----------------------


def test_kubernetes_config_is_the_shipped_default() -> None:
    assert k8s_config() == load_config(mounted_config_path(SERVICES["api"]))


def test_every_configured_model_has_one_gpu_worker_and_one_scaled_object() -> None:
    workers = worker_deployments()
    assert set(workers) == set(k8s_config().models)
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in of_kind("ScaledObject")]
    assert sorted(targets) == sorted(d["metadata"]["name"] for d in workers.values())
    for model, deployment in workers.items():
        [container] = _containers(deployment)
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) == k8s_config().models[model].gpu_count
        assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
        assert "replicas" not in deployment["spec"], f"{model}: KEDA owns the replica count"


def scaled_object_of(deployment: dict[str, Any]) -> dict[str, Any]:
    name = deployment["metadata"]["name"]
    [found] = [s for s in of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name]
    return found


def queue_gauges() -> dict[str, str]:
    """The API's queue gauges (api/metrics.py), by help text: their names and label."""
    from api.metrics import ModelQueue, QueueCollector

    collector = QueueCollector(lambda: None, ttl_s=60)  # type: ignore[arg-type, return-value]
    collector.snapshot = lambda: {"m": ModelQueue(1, 2, 3, 4.0)}  # type: ignore[method-assign]
    families = list(collector.collect())
    assert all(s.labels == {"model": "m"} for f in families for s in f.samples)
    return {f.documentation: f.name for f in families}


def test_scaling_metrics_are_what_the_api_exports() -> None:
    gauges = queue_gauges()
    assert gauges["Requests committed and not yet claimed."] == "inferq_queued_requests"
    assert gauges["Requests claimed by a worker."] == "inferq_running_requests"


def prometheus_triggers(scaled: dict[str, Any]) -> dict[str, dict[str, str]]:
    triggers = scaled["spec"]["triggers"]
    return {t["name"]: t["metadata"] for t in triggers if t["type"] == "prometheus"}


@pytest.mark.parametrize("model", sorted(worker_deployments()))
def test_worker_scales_on_the_requests_waiting_for_its_model(model: str) -> None:
    """Queued requests (every priority, both queues, prefetched and not yet claimed) from the
    API's gauge; max, since every API replica reports the same database-wide number."""
    triggers = prometheus_triggers(scaled_object_of(worker_deployments()[model]))
    gauges = queue_gauges()
    queued, running = (
        gauges["Requests committed and not yet claimed."],
        gauges["Requests claimed by a worker."],
    )
    assert triggers["queued"]["query"] == f'max({queued}{{model="{model}"}})'
    assert triggers["running"]["query"] == f'max({running}{{model="{model}"}})'
    for metadata in triggers.values():
        assert float(metadata["threshold"]) > 0
        assert float(metadata.get("activationThreshold", "0")) == 0, "any request wakes it"
        assert metadata.get("ignoreNullValues") == "false", "no data must not read as idle"
    spec = k8s_config().models[model]
    assert float(triggers["running"]["threshold"]) == spec.max_batch_size
    assert float(triggers["queued"]["threshold"]) >= spec.max_batch_size


def test_keda_asks_a_prometheus_that_scrapes_the_api() -> None:
    """KEDA's operator runs in its own namespace: the address must name this one."""
    api_service = named("Service", "inferq-api")
    api_port = api_service["spec"]["ports"][0]["port"]
    for scaled in of_kind("ScaledObject"):
        for metadata in prometheus_triggers(scaled).values():
            where = urlsplit(metadata["serverAddress"])
            service, namespace, svc = str(where.hostname).split(".")
            assert (namespace, svc) == (NAMESPACE, "svc"), where.hostname
            ports = [p["port"] for p in named("Service", service)["spec"]["ports"]]
            assert where.port in ports
    scrape = yaml.safe_load(named("ConfigMap", "inferq-prometheus")["data"]["prometheus.yml"])
    targets = {
        t for job in scrape["scrape_configs"] for g in job["static_configs"] for t in g["targets"]
    }
    assert f"inferq-api:{api_port}" in targets
    assert all(
        job.get("metrics_path", "/metrics") == "/metrics" for job in scrape["scrape_configs"]
    )


def startup_window_s(container: dict[str, Any]) -> int:
    probe = container["startupProbe"]
    period, failures = probe.get("periodSeconds", 10), probe.get("failureThreshold", 3)
    return int(probe.get("initialDelaySeconds", 0) + period * failures)


@pytest.mark.parametrize("model", sorted(worker_deployments()))
def test_scale_to_zero_waits_longer_than_a_load(model: str) -> None:
    deployment = worker_deployments()[model]
    scaled = scaled_object_of(deployment)["spec"]
    [container] = _containers(deployment)
    assert scaled.get("minReplicaCount", 0) == 0, "scale to zero is the point"
    assert scaled.get("cooldownPeriod", 300) > startup_window_s(container)
    assert scaled["fallback"]["replicas"] >= 1, "an unreadable metric keeps a worker"


@pytest.mark.parametrize("model", sorted(worker_deployments()))
def test_worker_probes_ask_the_engine(model: str) -> None:
    """Startup and readiness on /readyz (engine loaded), liveness on /healthz (engine making
    progress), on the port `--metrics-port` serves, which listens beyond the pod."""
    [container] = _containers(worker_deployments()[model])
    params = parse_inferq(container["command"]).params
    assert params["metrics_host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    for probe in probes.values():
        assert ports[probe["port"]] == params["metrics_port"]
    paths = {k: p["path"] for k, p in probes.items()}
    assert paths == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    # A loading worker: the readiness path says not ready, the liveness path says alive
    # (every other path of the metrics server answers 200 with metrics).
    assert loading_worker_answers(paths["readinessProbe"]) == 503
    assert loading_worker_answers(paths["livenessProbe"]) == 200
    # Liveness gives up no sooner than the engine's own watchdog would.
    live = container["livenessProbe"]
    stall_s = Settings.model_fields["engine_stall_s"].default
    assert live.get("periodSeconds", 10) * live.get("failureThreshold", 3) >= stall_s


def loading_worker_answers(path: str) -> int:
    from workers.metrics import WorkerMetrics
    from workers.probes import Probes

    port = free_port()
    server = WorkerMetrics().serve(port, probes=Probes())
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("model", sorted(worker_deployments()))
def test_worker_grace_period_is_its_drain_time(model: str, tmp_path: Path) -> None:
    deployment = worker_deployments()[model]
    config = tmp_path / "config.yaml"
    config.write_text(named("ConfigMap", "inferq-config")["data"]["config.yaml"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == drain_seconds(model, config)
    compose = [
        s for s in SERVICES.values() if command_of(s)[:4] == ["inferq", "worker", "--model", model]
    ]
    assert [compose_duration_s(s["stop_grace_period"]) for s in compose] == [grace], "as compose"


def test_rollouts_wait_for_a_loaded_worker() -> None:
    for deployment in worker_deployments().values():
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxUnavailable"] == 0


def test_webhook_sender_outlasts_an_attempt() -> None:
    deadline = Settings.model_fields["webhook_deadline_s"].default
    senders = [o for o, c in inferq_containers() if c["command"][1:] == ["webhooks"]]
    assert senders, "nothing runs `inferq webhooks`: callbacks are never sent"
    for obj in senders:
        assert obj["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30) > deadline


# --- secrets -------------------------------------------------------------------------------


def test_secrets_come_from_the_secret_and_have_no_defaults() -> None:
    assert not of_kind("Secret"), "ship no Secret: its values would be defaults"
    for obj in OBJECTS:
        for container in _containers(obj):
            for var in container.get("env", []):
                if SECRET_NAME.search(var["name"]):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    assert ref, f"{ident(obj)}: {var['name']} must come from a Secret"
                    assert ref["name"] == SECRET and not ref.get("optional"), ident(obj)
                if "value" in var and "://" in var["value"]:
                    credentials = urlsplit(var["value"]).netloc.rpartition("@")[0]
                    assert re.fullmatch(r"(\$\(\w+\))?:?(\$\(\w+\))?", credentials), (
                        f"{ident(obj)}: {var['name']} carries a literal credential"
                    )
    data = named("ConfigMap", "inferq-env")["data"]
    assert not [key for key in data if SECRET_NAME.search(key)], "no secrets in a ConfigMap"


def test_inferq_processes_share_one_environment() -> None:
    """Like compose's x-inferq-env: the same settings everywhere, and each $(VAR) a URL uses
    is defined before it (Kubernetes expands only those)."""
    envs = {ident(o): (c.get("envFrom", []), c["env"]) for o, c in inferq_containers()}
    assert len({yaml.safe_dump(e) for e in envs.values()}) == 1, sorted(envs)
    env_from, env = next(iter(envs.values()))
    defined = {k for s in env_from for k in named("ConfigMap", s["configMapRef"]["name"])["data"]}
    for var in env:
        for used in re.findall(r"\$\((\w+)\)", var.get("value", "")):
            assert used in defined, f"{var['name']} uses $({used}) before it is defined"
        defined.add(var["name"])
    assert {"INFERQ_DATABASE_URL", "INFERQ_BROKER_URL", "INFERQ_CONFIG"} <= defined


def test_flower_uses_basic_auth_from_the_secret() -> None:
    [flower] = [
        c
        for o in OBJECTS
        for c in _containers(o)
        if c.get("command", [])[:2] == ["celery", "flower"]
    ]
    env = {v["name"]: v for v in flower["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == SECRET
    assert "INFERQ_DATABASE_URL" not in env and "envFrom" not in flower, "broker only"
    assert flower["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


# --- every queue has a consumer, in every deployment ----------------------------------------

DEPLOYMENTS = ["compose", "kubernetes"]


def deployment_commands(deployment: str) -> list[list[str]]:
    if deployment == "compose":
        return [command_of(s) for s in SERVICES.values() if command_of(s)[:1] == ["inferq"]]
    return [c["command"] for _, c in inferq_containers()]


def deployment_config(deployment: str) -> RouterConfig:
    return (
        load_config(mounted_config_path(SERVICES["api"]))
        if deployment == "compose"
        else k8s_config()
    )


def published_queues(config: RouterConfig) -> set[str]:
    """Every queue anything can publish to: the app's declared queues, since it refuses the
    rest (no queue is created on demand)."""
    app = create_celery(Settings(broker_url="memory://localhost//"), config)
    assert app.conf.task_create_missing_queues is False
    return {queue.name for queue in app.conf.task_queues}


def local(command: list[str]) -> tuple[str, ...]:
    """The command as run here: ports free on this machine, listening on loopback only."""
    args = list(command[1:])
    for at, arg in enumerate(args[:-1]):
        if arg in ("--port", "--metrics-port"):
            args[at + 1] = str(free_port())
        if arg in ("--host", "--metrics-host"):
            args[at + 1] = "127.0.0.1"
    return tuple(args)


@pytest.fixture(scope="module")
def census(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Queues each distinct command consumes, run against this session's Postgres and Redis
    on a copy of the deployments' models with scripted engines (no weights to load)."""
    from weights.tiny import ensure_tiny_model

    ensure_tiny_model(settings.model_cache)
    folder = tmp_path_factory.mktemp("census")
    config = yaml.safe_load(mounted_config_path(SERVICES["api"]).read_text())
    for spec in config["models"].values():
        spec.update(engine="scripted", options={})
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    own = settings.model_copy(
        update={
            "config": folder / "config.yaml",
            "cache_dir": folder,
            "broker_key_prefix": f"{BROKER_PREFIX}census-{uuid.uuid4().hex[:6]}:",
        }
    )
    commands = {tuple(c[1:]): local(c) for d in DEPLOYMENTS for c in deployment_commands(d)}
    running = {
        key: subprocess.Popen(
            [sys.executable, "-m", "tests.queue_census", *args],
            env=service_env(own),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for key, args in commands.items()
    }
    found: dict[tuple[str, ...], set[str]] = {}
    try:
        for key, proc in running.items():
            out, _ = proc.communicate(timeout=180)
            text = out.decode(errors="replace")
            reported = [line.split(MARK, 1)[1] for line in text.splitlines() if MARK in line]
            assert reported, f"`inferq {' '.join(key)}` reported nothing:\n{text[-3000:]}"
            found[key] = set(yaml.safe_load(reported[-1]))
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
    yield lambda command: found[tuple(command[1:])]


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_every_queue_something_publishes_to_has_a_consumer(deployment: str, census: Any) -> None:
    queues = published_queues(deployment_config(deployment))
    consumed = {q for command in deployment_commands(deployment) for q in census(command)}
    assert queues - consumed == set(), f"{deployment}: published, never consumed"


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_one_evaluation_scheduler_runs(deployment: str) -> None:
    beats = [c for c in deployment_commands(deployment) if c[1:3] == ["eval", "beat"]]
    assert len(beats) == 1, f"{deployment}: {len(beats)} `inferq eval beat`"
    if deployment == "kubernetes":
        [obj] = [o for o, c in inferq_containers() if c["command"][1:3] == ["eval", "beat"]]
        assert obj["spec"]["replicas"] == 1 and obj["spec"]["strategy"]["type"] == "Recreate"
    else:
        [service] = [s for s in SERVICES.values() if command_of(s)[1:3] == ["eval", "beat"]]
        assert service.get("deploy", {}).get("replicas", 1) == 1


def test_a_queue_whose_consumers_scale_to_zero_wakes_one(census: Any) -> None:
    """A worker scaled to zero consumes nothing: for each queue, one of its consumers always
    runs, or a trigger of a consumer's ScaledObject watches that queue (the queued-requests
    gauge of model M counts what waits on M's queues; a Redis trigger, its list)."""
    prefix = named("ConfigMap", "inferq-env")["data"].get("INFERQ_BROKER_KEY_PREFIX", "")
    for queue in published_queues(k8s_config()):
        consumers = [o for o, c in inferq_containers() if queue in census(c["command"])]
        assert consumers, queue
        woken_by: set[str] = set()
        for obj in consumers:
            scaled = [
                s["spec"]
                for s in of_kind("ScaledObject")
                if s["spec"]["scaleTargetRef"]["name"] == obj["metadata"]["name"]
            ]
            if not scaled:
                woken_by |= {ident(obj)} if obj["spec"].get("replicas", 1) > 0 else set()
                continue
            if scaled[0].get("minReplicaCount", 0) > 0:
                woken_by.add(ident(obj))
            for trigger in scaled[0]["triggers"]:
                meta = trigger["metadata"]
                if trigger["type"] == "redis" and meta["listName"] == f"{prefix}{queue}":
                    woken_by.add(trigger["name"])
                gauge = re.fullmatch(
                    r'max\(inferq_queued_requests\{model="([^"]+)"\}\)', meta.get("query", "")
                )
                if gauge and queue in model_queues(gauge[1]):
                    woken_by.add(trigger["name"])
        assert woken_by, f"{queue}: nothing consumes it while its workers are at zero"
