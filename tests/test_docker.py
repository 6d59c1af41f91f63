"""The container image, built from the Dockerfile and run for real.

The image must serve the bundled checkpoint on its two ports as a non-root
user, report healthy through its own HEALTHCHECK, give the same greedy text
as the model in-process, and stop cleanly on ``docker stop``.

What this needs, and where it comes from: Debian's ``docker.io`` (scripts/test.sh
installs it); a Docker daemon, started here when none runs (as root, with the
network set up by the daemon but no iptables rules: the build runs on the host
network, published ports go through docker-proxy); and the base image, pulled,
or, on a machine that reaches Debian's mirror but not Docker Hub, made by
scripts/docker_base_image.sh. Without them the test skips locally and fails
under ``CI=true``, like the other end-to-end tests.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, require_tool, unavailable

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "ponder-test:latest"
PROMPT = "def fibonacci(n):\n"
NEW_TOKENS = 24
KEY = "docker-test-key"

pytestmark = pytest.mark.slow


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def daemon_answers() -> bool:
    return docker("info", timeout=30, check=False).returncode == 0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A running Docker daemon: the one already there, or one started (and stopped) here."""
    require_tool("docker")
    if daemon_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        unavailable("no Docker daemon runs, and this test can only start one as root with dockerd installed")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "w") as out:
        process = subprocess.Popen([dockerd, "--iptables=false", "--ip6tables=false"], stdout=out, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 60
        while not daemon_answers():
            if process.poll() is not None or time.monotonic() > end:
                unavailable(f"dockerd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def image(daemon):
    """The Dockerfile built into ``IMAGE`` (on the host network: the build installs from PyPI)."""
    base = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M)[1]
    if docker("image", "inspect", base, check=False).returncode != 0:
        if docker("pull", base, timeout=300, check=False).returncode != 0:
            require_tool("debootstrap")
            made = subprocess.run(
                ["bash", str(ROOT / "scripts" / "docker_base_image.sh"), base], capture_output=True, text=True, timeout=900
            )
            assert made.returncode == 0, f"scripts/docker_base_image.sh failed:\n{made.stderr[-4000:]}"
    docker("build", "--network", "host", "-t", IMAGE, str(ROOT), timeout=1800)
    yield IMAGE
    docker("image", "rm", "--force", IMAGE, check=False)


def wait_for(condition, timeout: float, what: str, logs) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what} within {timeout:.0f} s; the container's log:\n{logs()[-4000:]}"
        time.sleep(1)


def test_image_serves_the_bundled_checkpoint_as_non_root_and_stops_cleanly(image, offline):
    port, grpc_port = free_port(), free_port()
    name = f"ponder-test-{port}"
    docker(
        "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8080",
        "--publish", f"127.0.0.1:{grpc_port}:50051", "--stop-timeout", "40", "--env", f"PONDER_API_KEY={KEY}", image,
    )  # fmt: skip

    def logs() -> str:
        result = docker("logs", name, check=False)
        return result.stdout + result.stderr

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 600, "the server did not become ready", logs)
        assert docker("exec", name, "id", "-u").stdout.strip() == "10001"

        expected = offline(PROMPT, NEW_TOKENS)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        ).json()
        assert answer["choices"][0]["text"] == expected

        from ponder.client import Client

        with Client(grpc=f"127.0.0.1:{grpc_port}", api_key=KEY) as ponder:
            assert ponder.complete(PROMPT, max_tokens=NEW_TOKENS, timeout=60).text == expected

        def health() -> str:
            return docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()

        wait_for(lambda: health() == "healthy", 120, "the image's HEALTHCHECK did not report healthy", logs)

        docker("stop", name, timeout=120)
        assert docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0", logs()[-4000:]
        assert "Finished server process" in logs()
    finally:
        docker("rm", "--force", name, check=False)


def test_image_refuses_to_serve_every_interface_without_a_key(image):
    # The image listens on 0.0.0.0: without PONDER_API_KEY (or --insecure-no-auth) it must not start open.
    result = docker("run", "--rm", image, check=False, timeout=120)
    assert result.returncode != 0
    assert "no API key is set" in result.stderr and "--insecure-no-auth" in result.stderr, result.stderr[-2000:]
