"""What a user's ``pip install`` gets: one ``ponder`` package, and a client that needs no JAX.

The wheels are built from this checkout and installed into fresh virtual
environments, run from outside the checkout so that nothing here is
importable by accident. The server wheel's environment borrows this one's
dependencies (a ``.pth`` file) instead of downloading JAX again; the client
wheel's environment installs its own dependencies from the package index, so
its metadata is what is tested.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import unavailable
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def read_lines(path):\n    "


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs)


def _wheel(source: Path, out: Path) -> Path:
    """Builds ``source``'s wheel (pip builds in the source's build/; a build/ made here goes away again)."""
    made = [folder / "build" for folder in (source, ROOT) if not (folder / "build").exists()]
    try:
        build = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, source)
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        for info in source.glob("*.egg-info"):
            shutil.rmtree(info, ignore_errors=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _venv(path: Path) -> Path:
    made = _run(sys.executable, "-m", "venv", path)
    assert made.returncode == 0, made.stderr
    return path / "bin"


@pytest.fixture(scope="module")
def server_install(tmp_path_factory):
    """The ``ponder`` wheel in a fresh venv; its dependencies come from this environment."""
    tmp = tmp_path_factory.mktemp("server-wheel")
    wheel = _wheel(ROOT, tmp / "dist")
    bin = _venv(tmp / "venv")
    purelib = _run(bin / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run(bin / "python", "-m", "pip", "install", "--no-deps", "-q", wheel)
    assert install.returncode == 0, install.stderr
    return wheel, bin, Path(purelib), tmp


def test_the_wheel_installs_one_package_named_ponder(server_install):
    wheel, bin, site, tmp = server_install
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"ponder", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for name in ("model", "server", "train", "clients", "ponder_cli", "completion_pb2"):
        gone = _run(bin / "python", "-c", f"import {name}", cwd=tmp)
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr, name
    help = _run(bin / "ponder", "serve", "--help", cwd=tmp)
    assert help.returncode == 0 and "--checkpoint" in help.stdout, help.stderr


def test_the_wheel_serves_its_own_stubs_and_default_checkpoint(server_install):
    wheel, bin, site, tmp = server_install
    script = (
        "import ponder.server.grpc_server, ponder.v1.completion_pb2 as pb\n"
        "from ponder.checkpoints import DEFAULT_CHECKPOINT\n"
        "print(ponder.server.grpc_server.__file__); print(DEFAULT_CHECKPOINT)\n"
        "print(pb.CompleteRequest.DESCRIPTOR.full_name)\n"
    )
    run = _run(bin / "python", "-c", script, cwd=tmp)
    assert run.returncode == 0, run.stderr
    code, checkpoint, message = run.stdout.split()
    assert Path(code).is_relative_to(site) and Path(checkpoint) == site / "ponder" / "checkpoints" / "default"
    assert message == "ponder.v1.CompleteRequest"
    assert not list((site / "ponder").rglob("gen"))  # nothing generated at import
    generate = _run(bin / "ponder", "generate", "--max-tokens", "4", "def f(", cwd=tmp)
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.startswith("def f(") and "finish_reason=length" in generate.stderr


def test_importing_the_model_leaves_the_process_as_it_was(server_install):
    """XLA flags and malloc settings are the entry points' business (ponder.runtime), not an import's."""
    _, bin, _, tmp = server_install
    script = "import os, ponder.model.ttt_lm, ponder.model.checkpoint; print(repr(os.environ.get('XLA_FLAGS')))"
    run = _run(bin / "python", "-c", script, cwd=tmp, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert run.returncode == 0 and run.stdout.strip() == "None", run.stderr


def test_the_client_needs_no_jax_and_streams_from_a_live_server(tmp_path, live_server, offline):
    wheel = _wheel(ROOT / "clients" / "python", tmp_path / "dist")
    bin = _venv(tmp_path / "venv")
    install = _run(bin / "python", "-m", "pip", "install", "-q", wheel)
    if install.returncode != 0 and "Could not find a version" in install.stderr + install.stdout:
        unavailable(f"the package index is out of reach: {install.stderr[-400:]}")
    assert install.returncode == 0, install.stderr
    for name in ("jax", "numpy", "ponder.model", "ponder.server"):
        gone = _run(bin / "python", "-c", f"import {name}", cwd=tmp_path)
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr, name
    script = (
        "import sys\n"
        "from ponder.client import Client, Completion\n"
        "for where in ({'url': sys.argv[1]}, {'grpc': sys.argv[2]}):\n"
        "    with Client(**where) as ponder:\n"
        "        *deltas, final = ponder.stream(sys.argv[3], max_tokens=12, session='pkg')\n"
        "    assert isinstance(final, Completion) and final.text == ''.join(d.text for d in deltas)\n"
        "    print(repr(final.text))\n"
    )
    run = _run(bin / "python", "-c", script, live_server.url, live_server.grpc_target, PROMPT, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    expected = repr(offline(PROMPT, 12))
    assert run.stdout.splitlines() == [expected, expected]
    health = _run(bin / "ponder", "health", "--url", live_server.url, cwd=tmp_path)
    assert health.returncode == 0 and health.stdout.startswith("ok"), health.stderr
    assert httpx.get(live_server.url + "/health").status_code == 200


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_the_client_distribution_asks_for_what_the_server_install_has():
    server = {Requirement(r).name: Requirement(r) for r in _project(ROOT / "pyproject.toml")["dependencies"]}
    for line in _project(ROOT / "clients" / "python" / "pyproject.toml")["dependencies"]:
        wanted = Requirement(line)
        assert wanted.name in server and server[wanted.name].specifier == wanted.specifier, line


def test_accelerator_extras_pull_the_matching_jax_build(tmp_path):
    project = _project(ROOT / "pyproject.toml")
    (base,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "jax"]
    for extra in ("cuda12", "tpu"):
        (jax,) = [Requirement(r) for r in project["optional-dependencies"][extra]]
        assert (jax.name, jax.extras, jax.specifier) == ("jax", {extra}, base.specifier)
    # The index has a jax in that range that defines both extras (metadata only: nothing is installed).
    report = tmp_path / "report.json"
    resolve = _run(sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q",
                   "--report", report, str(base))
    if resolve.returncode != 0:
        unavailable(f"the package index is out of reach: {resolve.stderr[-400:]}")
    (jax_found,) = json.loads(report.read_text())["install"]
    assert base.specifier.contains(jax_found["metadata"]["version"])
    assert {"cuda12", "tpu"} <= set(jax_found["metadata"]["provides_extra"])
