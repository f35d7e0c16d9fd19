"""deploy/k8s/ validates offline: the core kinds with ``kubernetes-validate`` (strict: no unknown fields), KEDA's
kinds against the CRD schemas kept in deploy/k8s/crds/ (KEDA v2.20.1), and the pieces fit together: the
probes, the drain, the queues KEDA reads are tuwen's, and the names each manifest refers to exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tuwen.pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.33.0"
CRDS = {"ScaledObject": "keda.sh_scaledobjects.v2.20.1.yaml",
        "TriggerAuthentication": "keda.sh_triggerauthentications.v2.20.1.yaml"}


def documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((K8S / "crds" / CRDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("doc", [d for d in documents() if d["kind"] not in CRDS],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_kinds_validate_strictly(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("doc", [d for d in documents() if d["kind"] in CRDS],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_keda_kinds_validate_against_the_crd_schema(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_a_schema_check_that_can_fail() -> None:
    """The CRD schema does refuse a ScaledObject without its target (the check above is not vacuous)."""
    broken = {**by_kind("ScaledObject")["tuwen-worker"]}
    broken["spec"] = {k: v for k, v in broken["spec"].items() if k != "scaleTargetRef"}
    with pytest.raises(jsonschema.ValidationError, match="scaleTargetRef"):
        jsonschema.validate(broken, crd_schema("ScaledObject"))


def test_workers_scale_on_tuwens_queues_and_drain_before_they_go() -> None:
    scaled = by_kind("ScaledObject")["tuwen-worker"]
    worker = by_kind("Deployment")[scaled["spec"]["scaleTargetRef"]["name"]]
    defaults = Settings()
    # KEDA reads the two queues tuwen routes to, through the sentinels, with the password from the Secret
    queues = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"]}
    assert queues == {defaults.interactive_queue, defaults.bulk_queue}
    assert all(t["type"] == "redis-sentinel" and t["authenticationRef"]["name"] in by_kind("TriggerAuthentication")
               for t in scaled["spec"]["triggers"])
    # a worker is never scaled to zero (the gateways are ready only while one consumes interactive)
    assert scaled["spec"]["minReplicaCount"] >= 1
    # SIGTERM drains within the worker's own deadline, before Kubernetes' SIGKILL
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["TUWEN_SHUTDOWN_TIMEOUT_S"]) < pod["terminationGracePeriodSeconds"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the probes read the worker's own heartbeat, under the name it announces
    assert container["args"][-2:] == ["--hostname", "$(POD_NAME)"]
    assert "tuwen status --worker \"$POD_NAME\"" in container["livenessProbe"]["exec"]["command"][-1]


def test_gateways_are_two_behind_one_service_with_readiness_and_liveness() -> None:
    gateway = by_kind("Deployment")["tuwen-gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert gateway["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = by_kind("Service")["tuwen-gateway"]
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    assert by_kind("PodDisruptionBudget")["tuwen-gateway"]["spec"]["minAvailable"] == 1
    # every ConfigMap key is a setting tuwen knows
    known = {f"TUWEN_{name.upper()}" for name in Settings.model_fields}
    assert set(by_kind("ConfigMap")["tuwen-config"]["data"]) <= known


def test_the_worker_liveness_probe_command_answers_from_the_heartbeat(redis_server: Any) -> None:
    """``tuwen status --worker NAME`` exits 0 for a live heartbeat and 1 for none (the probe's contract)."""
    from tuwen.pipeline import registry
    from tuwen.pipeline.jobs import connect

    url = redis_server.url.rsplit("/", 1)[0] + "/11"
    client = connect(url)
    registry.announce(client, "probe@pod-1", {"queues": ["interactive"]})
    env = {"TUWEN_REDIS_URL": url, "PATH": "/usr/bin:/bin"}

    def probe(name: str) -> int:
        return subprocess.run([sys.executable, "-m", "tuwen.workers.cli", "status", "--worker", name], env=env,
                              capture_output=True, timeout=60).returncode

    assert probe("probe@pod-1") == 0
    assert probe("probe@pod-2") == 1
    client.flushdb()
