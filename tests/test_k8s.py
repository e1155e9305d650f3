"""deploy/k8s: the manifests render, every object is valid Kubernetes, and the values that
make a relay behave are the relay's own.

``kubernetes-validate`` checks every manifest file, and, where ``kubectl`` is installed, every
object ``kubectl kustomize`` renders of both kustomizations (the relays; the agent example),
against the schemas of the Kubernetes release named below, offline and strictly (an unknown
field is an error: a misspelt probe would otherwise be ignored by the cluster). Then the
values that depend on the relay: the probes' paths and port, the grace period against the
drain, the ingress timeouts against the idle limits, the image's user.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay.settings import RelaySettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
#: The Kubernetes release the manifests are checked against (kubectl's here is 1.32).
KUBERNETES = "1.32.0"
#: The Dockerfile's relay user.
IMAGE_UID = 10001



def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def render(path: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def relays() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in render(K8S)}


@pytest.fixture(scope="module")
def agent() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in render(K8S / "agent-example")}


def env_of(container: dict[str, Any], settings: dict[str, Any]) -> dict[str, str]:
    found = {e["name"]: e.get("value") for e in container.get("env", [])}
    return {**settings, **found}


def check(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path: Path):
    # The files as written (kustomize adds the namespace, labels and generated names).
    for obj in yaml.safe_load_all(path.read_text()):
        if obj:
            check(obj)


@pytest.mark.parametrize("path", [K8S, K8S / "agent-example"], ids=["relays", "agent-example"])
def test_every_rendered_object_is_valid_kubernetes(path: Path):
    objects = render(path)
    assert objects
    for obj in objects:
        check(obj)


def test_the_validation_can_fail():
    # Guard against a vacuous check: a misspelt field is refused.
    broken = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
              "spec": {"ports": [{"port": 80, "targetPortt": 8080}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_relay_has_every_object_it_needs(relays):
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "Ingress"} <= set(relays)


def test_probes_are_the_relays_health_endpoints(relays):
    container = relays["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert str(port) == env_of(container, {})["RELAY_PORT"]
    # Ready: Redis answers and the node is not draining; alive: the process answers.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_the_grace_period_outlasts_the_drain(relays):
    pod = relays["Deployment"]["spec"]["template"]["spec"]
    settings = relays["ConfigMap"]["data"]
    drain = float(settings.get("RELAY_DRAIN_TIMEOUT", RelaySettings.model_fields["drain_timeout"].default))
    pause = sum(float(word) for word in pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1:])
    assert pod["terminationGracePeriodSeconds"] > pause + drain


def test_the_ingress_outwaits_the_relays_idle_limits(relays):
    annotations = relays["Ingress"]["metadata"]["annotations"]
    settings = relays["ConfigMap"]["data"]
    longest = max(float(settings.get(f"RELAY_{name.upper()}", RelaySettings.model_fields[name].default))
                  for name in ("idle_timeout", "first_chunk_timeout", "heartbeat_timeout"))
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{name}"]) > 10 * longest
    # Chunks reach the caller as they come; uploads as they arrive.
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 > RelaySettings.model_fields["max_upload_bytes"].default
    backend = relays["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == relays["Service"]["metadata"]["name"]


def test_redis_comes_from_a_secret(relays):
    container = relays["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    secret = relays["Secret"]["metadata"]["name"]
    assert {"secretRef": {"name": secret}} in container["envFrom"]
    assert "REDIS_URL" in relays["Secret"]["data"]
    assert not any(e["name"] in ("REDIS_URL", "RELAY_REDIS_URL") for e in container.get("env", []))


@pytest.mark.parametrize("which", ["relays", "agent"])
def test_pods_run_as_the_images_user(which, request):
    pod = request.getfixturevalue(which)["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"--uid {IMAGE_UID}" in dockerfile and "\nUSER relay\n" in dockerfile
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_the_autoscaler_and_budget_keep_a_relay_up(relays):
    hpa, pdb = relays["HorizontalPodAutoscaler"]["spec"], relays["PodDisruptionBudget"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == relays["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and pdb["maxUnavailable"] == 1
    labels = relays["Deployment"]["spec"]["selector"]["matchLabels"]
    assert pdb["selector"]["matchLabels"] == labels == relays["Service"]["spec"]["selector"]


def test_the_agent_example_reads_its_token_from_a_secret(agent):
    container = agent["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["relay-agent", "run"]
    token = {e["name"]: e for e in container["env"]}["AGENT_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == agent["Secret"]["metadata"]["name"]
