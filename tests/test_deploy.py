"""The deployment files agree with each other and with the server.

Nothing here starts a server: these are the facts that one file states and
another relies on (the replica names the router hashes on, ports, probe
paths, the drain time, what the image copies), checked so that changing one
side without the other fails a test instead of a rollout. tests/test_nginx.py
runs the router itself.
"""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def upstream_servers(config: str, name: str) -> list[str]:
    """The addresses of the ``server`` lines of nginx upstream ``name``."""
    body = re.search(rf"upstream {name} \{{([^}}]*)\}}", config)
    assert body, f"no upstream {name} in deploy/nginx.conf"
    return re.findall(r"^\s*server\s+([^\s;{]+)", body[1], flags=re.M)


@pytest.fixture(scope="module")
def manifests() -> dict:
    """``{(kind, name): manifest}`` of deploy/k8s, plus the kustomization under ``"kustomization"``."""
    yaml = pytest.importorskip("yaml")
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    found = {"kustomization": kustomization}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / resource).read_text()):
            found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def test_router_upstreams_name_every_replica(manifests):
    namespace = manifests["kustomization"]["namespace"]
    replicas = manifests["StatefulSet", "ponder"]["spec"]
    service = manifests["Service", replicas["serviceName"]]["spec"]
    assert service["clusterIP"] == "None", "the replicas' Service must be headless: one DNS name per pod"
    ports = {p["name"]: p["port"] for p in service["ports"]}
    config = (DEPLOY / "nginx.conf").read_text()
    for upstream, port in (("ponder_http", ports["http"]), ("ponder_grpc", ports["grpc"])):
        expected = [
            f"ponder-{i}.{replicas['serviceName']}.{namespace}.svc.cluster.local:{port}" for i in range(replicas["replicas"])
        ]
        assert upstream_servers(config, upstream) == expected, f"{upstream} in deploy/nginx.conf vs the StatefulSet"


def test_replica_pods_probe_health_and_outlast_the_drain(manifests):
    pod = manifests["StatefulSet", "ponder"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "tcpSocket" in container["livenessProbe"], "liveness must not depend on warm-up, which /health does"
    args = container["args"]
    drain_s = float(args[args.index("--drain-s") + 1])
    pause_s = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > drain_s + pause_s
    assert {p["containerPort"] for p in container["ports"]} == {8080, 50051}


def test_replicas_fail_closed_without_their_api_keys(manifests):
    """Issue 21: the API-key Secret was optional, so a missing Secret served without auth behind the
    LoadBalancer. Every Secret a pod reads is required, and the replicas read their keys from one."""
    refs = []
    workloads = [m for key, m in manifests.items() if key[0] in ("StatefulSet", "Deployment")]
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    refs.append((container["name"], env["name"], env["valueFrom"]["secretKeyRef"]))
            for source in container.get("envFrom", []):
                assert not source.get("secretRef", {}).get("optional", False), source
    assert ("ponder", "PONDER_API_KEY") in [(container, name) for container, name, _ in refs]
    for container, name, ref in refs:
        assert ref.get("optional", False) is False, f"{container}: {name} must not be optional (fail closed)"


def test_router_mounts_the_generated_config(manifests):
    generated = manifests["kustomization"]["configMapGenerator"][0]
    assert generated["files"] == ["nginx.conf"]
    pod = manifests["Deployment", "ponder-router"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == generated["name"]
    mount = pod["containers"][0]["volumeMounts"][0]
    assert (mount["mountPath"], mount["subPath"]) == ("/etc/nginx/nginx.conf", "nginx.conf")


def test_image_copies_what_the_server_needs():
    """The packages pyproject installs, the .proto and the bundled checkpoint reach the image."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {source for line in re.findall(r"^COPY (?!--)(.+)$", dockerfile, flags=re.M) for source in line.split()[:-1]}
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    folders = {mapped.get(name, name.replace(".", "/")).split("/")[0] for name in setuptools["packages"]}
    assert folders == {"ponder", "model", "train", "server", "clients", "protos", "checkpoints"}
    needed = (folders - {"protos", "checkpoints"}) | {"pyproject.toml", "README.md", "protos/ponder", "checkpoints"}
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    for path in needed:
        top = path.split("/")[0]
        assert top not in ignored or f"!{path}" in ignored, f".dockerignore keeps {path} out of the build"
