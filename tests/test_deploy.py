"""The deployment files agree with each other and with the server.

Nothing here starts a server: these are the facts that one file states and
another relies on (the replica names the router hashes on, ports, probe
paths, the drain time, what the image copies), checked so that changing one
side without the other fails a test instead of a rollout. tests/test_nginx.py
runs the router itself.

Every manifest under deploy/ is also checked against the Kubernetes OpenAPI
schema of a pinned release, strictly (an unknown field is an error, as
``kubectl apply --validate=strict`` makes it), with kubernetes-validate's
bundled schemas: offline, no cluster.
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


# The oldest Kubernetes release the manifests must apply to; a field added later fails validation.
KUBERNETES_VERSION = "1.33.0"


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest in deploy/: the kustomization's resources and the one-off Jobs beside them."""
    return sorted(DEPLOY.glob("k8s/*.yaml"))


def schema_errors(manifest: dict) -> str | None:
    """Why ``manifest`` is not a valid object of the pinned Kubernetes release (strict: unknown fields count), or None."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(str(part) for part in error.path)
        return f"{manifest.get('kind')} {manifest.get('metadata', {}).get('name')}: {path}: {error.message}"
    return None


def test_every_manifest_validates_against_the_pinned_schema():
    yaml = pytest.importorskip("yaml")
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    files = manifest_files()
    assert {DEPLOY / resource for resource in listed} <= set(files), "the kustomization lists a file outside deploy/k8s"
    errors = []
    for path in files:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert documents, path
        errors += [error for error in map(schema_errors, documents) if error]
    assert not errors, "\n".join(errors)


def test_schema_check_rejects_a_misspelled_field(manifests):
    """The check above can fail: a typo in a field name, a wrong type, a missing required field."""
    import copy

    service = copy.deepcopy(manifests["Service", "ponder"])
    assert schema_errors(service) is None
    service["spec"]["clusterIp"] = service["spec"].pop("clusterIP")
    assert "'clusterIp' was unexpected" in schema_errors(service)
    statefulset = copy.deepcopy(manifests["StatefulSet", "ponder"])
    statefulset["spec"]["replicas"] = "three"
    assert "spec/replicas" in schema_errors(statefulset)
    del statefulset["spec"]["replicas"], statefulset["spec"]["selector"]
    assert "'selector' is a required property" in schema_errors(statefulset)


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


def workload_pods(manifests) -> list[tuple[str, dict]]:
    """``(name, pod spec)`` of every long-running workload the kustomization deploys."""
    kinds = ("StatefulSet", "Deployment")
    return [(key[1], m["spec"]["template"]["spec"]) for key, m in manifests.items() if key[0] in kinds]


def test_workloads_probe_run_as_non_root_and_request_resources(manifests):
    pods = workload_pods(manifests)
    assert {name for name, _ in pods} == {"ponder", "ponder-router"}
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert {"readinessProbe", "livenessProbe"} <= container.keys(), where
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
            assert "memory" in container["resources"]["limits"], where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where


def test_a_disruption_budget_keeps_replicas_serving(manifests):
    budget = manifests["PodDisruptionBudget", "ponder"]["spec"]
    statefulset = manifests["StatefulSet", "ponder"]["spec"]
    assert budget["selector"]["matchLabels"] == statefulset["selector"]["matchLabels"]
    assert budget["maxUnavailable"] < statefulset["replicas"], "an eviction may not take every replica"


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


def test_training_job_names_its_coordinator_and_process_count():
    """deploy/k8s/train-job.yaml: N pods, N processes, and process 0's stable name as the coordinator."""
    yaml = pytest.importorskip("yaml")
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "train-job.yaml").read_text())}
    job, service = docs["Job"], docs["Service"]
    pod = job["spec"]["template"]["spec"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in pod["containers"][0]["args"] if "=" in arg)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(flags["num-processes"])
    host, port = flags["coordinator"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and int(port) in {p["containerPort"] for p in pod["containers"][0]["ports"]}
    index = pod["containers"][0]["env"][0]
    assert flags["process-id"] == f"$({index['name']})"
    assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["containers"][0]["resources"]["requests"]
