"""A wheel (plain ``pip install .``, not editable) carries the .proto and the bundled checkpoint."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_build_folder():
    """pip builds in the checkout's build/ (git-ignored), where files deleted from the tree would linger
    and reach the next wheel: a build/ this test made goes away with it."""
    existed = (ROOT / "build").exists()
    yield
    if not existed:
        shutil.rmtree(ROOT / "build", ignore_errors=True)


def test_wheel_serves_its_own_proto_and_default_checkpoint(tmp_path, clean_build_folder):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("ponder-*.whl")
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    # The wheel's code first, the dependencies from this environment; run away from the checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    script = (
        "import server, server.main, server.protos\n"
        "print(server.__file__); print(server.main.DEFAULT_CHECKPOINT); print(server.protos.PROTO)\n"
        "print(server.protos.completion_pb2.CompleteRequest.DESCRIPTOR.full_name)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    code, checkpoint, proto, message = run.stdout.split()
    assert Path(code).is_relative_to(target) and Path(checkpoint) == target / "ponder_checkpoints" / "default"
    assert Path(proto) == target / "ponder_protos" / "ponder" / "v1" / "completion.proto"
    assert message == "ponder.v1.CompleteRequest"
    generate = subprocess.run([sys.executable, "-m", "ponder", "generate", "--max-tokens", "4", "def f("],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.startswith("def f(") and "finish_reason=length" in generate.stderr
