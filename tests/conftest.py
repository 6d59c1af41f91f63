import dataclasses
import gc
import os

import pytest

from ponder.runtime import configure_process

configure_process()  # the XLA flags and malloc policy the server and training run with, before JAX starts
import jax  # noqa: E402

from ponder.model.config import GPTConfig  # noqa: E402
from ponder.model.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="session")
def bundled_tokenizer() -> Tokenizer:
    """The bundled checkpoint's tokenizer: the front ends' tests run it over the fake runner."""
    from pathlib import Path

    return Tokenizer.load(Path(__file__).resolve().parent.parent / "checkpoints" / "default" / "tokenizer.json")


@pytest.fixture(scope="session")
def code_tokenizer() -> Tokenizer:
    """A small code vocabulary trained on a slice of the standard library."""
    from ponder.train.corpus import default_roots, python_sources

    return Tokenizer.train(python_sources(default_roots(), max_bytes=2 << 20), vocab_size=1024)


@pytest.fixture(scope="session")
def small_config(code_tokenizer) -> GPTConfig:
    """The tiny preset, shrunk in context so tests compile fast."""
    return dataclasses.replace(GPTConfig.tiny(vocab_size=len(code_tokenizer)), n_positions=128)


@pytest.fixture
def tiny_corpus_and_base(tmp_path):
    """``(corpus dir, base checkpoint dir)``: a corpus built by ``ponder train corpus`` from small modules
    and an untrained 2-block base with its tokenizer, for 2-step training runs through the CLI."""
    from ponder import cli as ponder_cli
    from ponder.model import checkpoint
    from ponder.model.gpt2 import init_model

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"mod{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {i + j}\n\n" for j in range(8)))
    data = tmp_path / "corpus"
    assert ponder_cli.main(["train", "corpus", "--out", str(data), "--root", str(src), "--vocab-size", "300",
                            "--val-fraction", "0.3"]) == 0
    tokenizer = Tokenizer.load(data / "tokenizer.json")
    base = init_model(GPTConfig(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    checkpoint.save(tmp_path / "base", base, tokenizer)
    return data, tmp_path / "base"


def require_tool(name: str, where: str | None = None) -> str:
    """The path of tool ``name`` (a Debian package or a test extra that scripts/test.sh installs).

    ``where``: the folders to look in (os.pathsep-separated; default: PATH).
    Missing, the test skips on a developer machine and fails under ``CI=true``,
    where the tool must be there.
    """
    import shutil

    path = shutil.which(name, path=where)
    if path is None:
        unavailable(f"{name} is not installed{f' in {where}' if where else ''} (scripts/test.sh installs it)")
    return path


def unavailable(message: str):
    """A test's system prerequisite is missing: skip on a developer machine, fail under ``CI=true``."""
    import os

    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real ``ponder serve`` process on free local ports."""

    def __init__(self, *args: str, env: dict | None = None):
        import os
        import subprocess
        import sys
        import tempfile

        self.port, self.grpc_port = free_port(), free_port()
        self.url, self.grpc_target = f"http://127.0.0.1:{self.port}", f"127.0.0.1:{self.grpc_port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        command = [
            sys.executable, "-m", "ponder", "serve", "--port", str(self.port), "--grpc-port", str(self.grpc_port),
            "--log-level", "warning", *args,
        ]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300) -> "LiveServer":
        import time

        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"ponder serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"ponder serve not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except Exception:
                self.process.kill()
        return self.process.wait()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module: one process runs the whole suite, and
    without this it keeps each module's executables (several GB by the end)."""
    yield
    jax.clear_caches()
    gc.collect()


LIVE_SLOTS = "3"  # every live server of the suite has this many slots, so all share compiled shapes


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """One persistent XLA cache for the whole test run, shared by the xdist workers: every ``ponder serve``
    uses it (``--compile-cache``), and so does each worker's own process (``_persistent_compile_cache``).
    What one process compiled, the others load: compiling dominates the end-to-end tests, and the same
    model and engine shapes come back in many modules."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def _persistent_compile_cache(compile_cache):
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    compilation_cache.reset_cache()  # read the settings above even if something compiled at import


@pytest.fixture(scope="session")
def live_server(compile_cache):
    """``ponder serve`` on the bundled checkpoint (3 slots, the session's compile cache, the λ viewer on)."""
    server = LiveServer("--slots", LIVE_SLOTS, "--compile-cache", compile_cache, "--queue-size", "8", "--ui")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def offline():
    """``generate(prompt, n, suffix=None, stop=())``: the bundled checkpoint's greedy text, computed in-process.

    What a server must answer for the same prompt (plain, or fill-in-the-middle with ``suffix``).
    """
    from ponder.checkpoints import DEFAULT_CHECKPOINT
    from ponder.model import checkpoint
    from ponder.model.generate import SamplingParams, generate_text
    from ponder.server.prompts import fim_tokens

    model, tokenizer = checkpoint.load(DEFAULT_CHECKPOINT)

    def generate(prompt: str, n: int, suffix: str | None = None, stop=()) -> str:
        if suffix is None:
            tokens = tokenizer.encode_document(prompt)
        else:
            tokens, _ = fim_tokens(tokenizer, prompt, suffix)  # the server's layout
        return generate_text(model, tokenizer, tokens, SamplingParams(max_new_tokens=n, stop=tuple(stop))).text

    return generate


@pytest.fixture(scope="module")
def sandboxed():
    """bwrap is installed and can make namespaces here (scripts/test.sh installs it; CI=true fails without it)."""
    from ponder.train import sandbox

    require_tool("bwrap")
    try:
        sandbox.check_sandbox()
    except sandbox.SandboxUnavailable as err:
        unavailable(str(err))
