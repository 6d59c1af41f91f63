"""The client library and the ``ponder complete / ingest / sessions / health`` commands.

Fast tests run every client method over both transports (HTTP, gRPC) and
both flavours (``Client``, ``AsyncClient``) against real in-process servers
(uvicorn and ``grpc.server``) over the real engine on the hand-computable
test runner (``tests/fake_runner.py``: the tokens of "hello world\\n" cycled,
λ = 0.5 for every 4 tokens of the document), so results, streams, errors,
retries and deadlines are checked exactly. Then the real model behind ``ponder serve``: the client and
the command line must give the offline greedy generation.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from fake_runner import CHUNK, FLOPS, LAMBDA, RecordingEngine, chunks_closed, lambdas_riding
from test_http import Server

from ponder import cli as ponder_cli
from ponder.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    Completion,
    DeadlineExceeded,
    Delta,
    Health,
    Ingestion,
    InvalidRequest,
    PonderError,
    ServerBusy,
    ServerUnavailable,
    Usage,
)
from ponder.client.cli import parse_position, split_at
from ponder.model.gating import Schedule
from ponder.model.tokenizer import Tokenizer
from ponder.server.grpc_server import build_grpc_server
from ponder.server.http.app import build_app
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionService
from ponder.server.types import ErrorEvent, QueueFull, RequestError, TokenEvent

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-client-key"


REPLY = "hello world\n"


class ScriptedEngine(RecordingEngine):
    """The engine on the fake runner, plus refusals on demand: ``refuse`` holds exceptions the next submits
    raise (one each), ``fail_after`` makes a job fail after that many tokens; ``submits`` counts every submit."""

    def __init__(self, tokenizer, metrics, **config):
        super().__init__(tokenizer.encode(REPLY), metrics=metrics, max_new_tokens=64, **config)
        self.refuse: list[Exception] = []
        self.fail_after: int | None = None
        self.submits = 0

    def submit(self, job) -> None:
        self.submits += 1
        if self.refuse:
            raise self.refuse.pop(0)
        if self.fail_after is not None:
            self.jobs.append(job)
            for i in range(self.fail_after):
                job.put(TokenEvent([self.runner.reply[i % len(self.runner.reply)]], []))
            job.put(ErrorEvent(QueueFull("the engine dropped the job")))
            return
        super().submit(job)


class Stack:
    """HTTP and gRPC servers in this process over one engine and service."""

    def __init__(self, tokenizer, api_keys=(), **engine_config):
        metrics = ServerMetrics.create()
        self.engine = ScriptedEngine(tokenizer, metrics, **engine_config)
        service = CompletionService(self.engine, tokenizer)
        self.http = Server(build_app(service, self.engine, metrics, api_keys=api_keys))
        self.url = self.http.url
        self.grpc_target = f"127.0.0.1:{free_port()}"
        self.grpc = build_grpc_server(service, self.engine, metrics, api_keys, self.grpc_target, max_workers=4)
        self.grpc.start()

    def reset(self) -> "Stack":
        e = self.engine.fresh()
        e.refuse, e.fail_after, e.submits = [], None, 0
        return self

    def address(self, transport: str) -> dict:
        return {"url": self.url} if transport == "http" else {"grpc": self.grpc_target}

    def close(self) -> None:
        self.http.stop()
        self.grpc.stop(grace=None)
        self.engine.stop(drain_s=1)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(ROOT / "checkpoints" / "default" / "tokenizer.json")


@pytest.fixture(scope="module")
def stacks(tokenizer):
    open_stack, keyed_stack = Stack(tokenizer), Stack(tokenizer, api_keys=("other-key", KEY))
    yield open_stack, keyed_stack
    open_stack.close()
    keyed_stack.close()


@pytest.fixture(scope="module")
def budgeted(tokenizer):
    """A stack whose schedule reads a budget (learned_budget at 0.5), so requests may set ``update_rate``."""
    budgeted_stack = Stack(tokenizer, schedule=Schedule("learned_budget", rate=0.5))
    yield budgeted_stack
    budgeted_stack.close()


@pytest.fixture
def stack(stacks):
    return stacks[0].reset()


@pytest.fixture
def keyed(stacks):
    return stacks[1].reset()


def reply_ids(tokenizer, n: int) -> tuple[int, ...]:
    ids = tokenizer.encode(REPLY)
    return tuple(ids[i % len(ids)] for i in range(n))


def reply(tokenizer, n: int) -> str:
    return tokenizer.decode(list(reply_ids(tokenizer, n)))


class Api:
    """One client method call, made with ``Client`` or ``AsyncClient`` (in its own event loop) over HTTP or gRPC.

    ``stream`` is collected into a list. Both flavours and transports thus run the same test body.
    """

    def __init__(self, flavour: str, transport: str):
        self.flavour, self.transport = flavour, transport

    def __call__(self, stack: Stack, method: str, *args, client: dict | None = None, **kwargs):
        options = {"backoff_s": 0.01, **stack.address(self.transport), **(client or {})}
        if self.flavour == "sync":
            with Client(**options) as ponder:
                result = getattr(ponder, method)(*args, **kwargs)
                return list(result) if method == "stream" else result

        async def run():
            async with AsyncClient(**options) as ponder:
                if method == "stream":
                    return [item async for item in ponder.stream(*args, **kwargs)]
                return await getattr(ponder, method)(*args, **kwargs)

        return asyncio.run(run())

    @property
    def grpc(self) -> bool:
        return self.transport == "grpc"


@pytest.fixture(params=[("sync", "http"), ("sync", "grpc"), ("async", "http"), ("async", "grpc")], ids="-".join)
def api(request) -> Api:
    return Api(*request.param)


# --- Results.


def test_complete(api, stack, tokenizer):
    done = api(stack, "complete", "def f():", session="s1", document="a.py", max_tokens=9)
    job = stack.engine.jobs[-1]
    prompt_tokens = 1 + len(tokenizer.encode("def f():"))
    closed = chunks_closed(prompt_tokens, 9)
    assert done == Completion(
        text=reply(tokenizer, 9), finish_reason="length", session_id="s1",
        usage=Usage(prompt_tokens=prompt_tokens, cached_tokens=0, generated_tokens=9),
        chunks_updated=closed, chunks_skipped=0, ttt_flops=FLOPS * closed, chunk_lambda=(LAMBDA,) * closed,
        token_ids=reply_ids(tokenizer, 9) if api.grpc else (),
    )
    assert (job.session_id, job.document_id, job.max_new_tokens, job.sampling.temperature) == ("s1", "a.py", 9, 0.0)
    assert job.tokens == [tokenizer.eot_id, *tokenizer.encode("def f():")] and job.commit_limit is None


def test_fill_in_the_middle_stop_and_sampling(api, stack, tokenizer):
    done = api(stack, "complete", "x = ", "\nprint(x)\n", max_tokens=12, stop="wor", temperature=0.5, seed=7)
    job = stack.engine.jobs[-1]
    prefix, suffix = tokenizer.encode("x = "), tokenizer.encode("\nprint(x)\n")
    assert job.tokens == [tokenizer.eot_id, tokenizer.fim_prefix_id, *prefix, tokenizer.fim_suffix_id, *suffix,
                          tokenizer.fim_middle_id]
    assert job.commit_limit == 2 + len(prefix) and (job.sampling.temperature, job.sampling.seed) == (0.5, 7)
    assert (done.text, done.finish_reason) == ("hello ", "stop")
    assert done.session_id == "anonymous-1"  # none given: the one the engine assigned


def test_stream(api, stack, tokenizer):
    items = api(stack, "stream", "def f():", session="s2", max_tokens=9)
    *deltas, done = items
    prompt_tokens = 1 + len(tokenizer.encode("def f():"))
    closed = chunks_closed(prompt_tokens, 9)
    assert all(isinstance(d, Delta) for d in deltas) and isinstance(done, Completion)
    assert "".join(d.text for d in deltas) == done.text == reply(tokenizer, 9)
    assert [lam for d in deltas for lam in d.chunk_lambda] == [LAMBDA] * closed and done.chunk_lambda == (LAMBDA,) * closed
    assert [i for d in deltas for i in d.token_ids] == (list(reply_ids(tokenizer, 9)) if api.grpc else [])
    assert sum(d.tokens for d in deltas) == 9
    if api.grpc:  # λ rides with the token after the one that closed its chunk, however tokens are grouped
        seen = 0
        for d in deltas:
            assert len(d.chunk_lambda) == sum(lambdas_riding(prompt_tokens, k) for k in range(seen + 1, seen + len(d.token_ids) + 1))
            seen += len(d.token_ids)
    assert (done.finish_reason, done.session_id, done.usage.generated_tokens, done.chunks_updated) == ("length", "s2", 9, closed)


def test_ingest_reset_and_health(api, stack, tokenizer):
    ingested = api(stack, "ingest", "import os\n", session="/home/me/a.py", document="/home/me/a.py")
    job = stack.engine.jobs[-1]
    prompt_tokens = 1 + len(tokenizer.encode("import os\n"))
    closed = chunks_closed(prompt_tokens, 0)
    assert ingested == Ingestion(
        session_id="/home/me/a.py", usage=Usage(prompt_tokens, 0, 0),
        chunks_updated=closed, chunks_skipped=0, ttt_flops=FLOPS * closed, chunk_lambda=(LAMBDA,) * closed,
    )
    assert (job.max_new_tokens, job.document_id) == (0, "/home/me/a.py")
    assert stack.engine.committed_tokens("", "/home/me/a.py") == job.tokens[: closed * CHUNK]
    assert api(stack, "reset", "/home/me/a.py") is True  # a path as the session id: slashes survive HTTP
    assert stack.engine.committed_tokens("", "/home/me/a.py") is None
    for ready, status in ((True, "ok"), (False, "loading")):
        stack.engine.ready = ready
        deadline = time.monotonic() + 5  # gRPC health follows readiness within 0.1 s
        while (health := api(stack, "health")) != Health(status):
            assert time.monotonic() < deadline, health


def test_update_rate_reaches_the_session(api, budgeted, stack):
    budgeted.reset()
    api(budgeted, "complete", "def f():", session="r", max_tokens=2, update_rate=0.25)
    api(budgeted, "stream", "def f():", session="r", max_tokens=2, update_rate=0.75)
    api(budgeted, "ingest", "import os\n", session="r", update_rate=0.0)
    api(budgeted, "complete", "def f():", session="r", max_tokens=2)
    assert [job.update_rate for job in budgeted.engine.jobs] == [0.25, 0.75, 0.0, None]  # None: the session's last one
    assert budgeted.engine.session_schedule("", "r").rate == 0.0
    with pytest.raises(InvalidRequest, match="reads no budget") as caught:
        api(stack, "complete", "x", update_rate=0.5)
    assert caught.value.field == "update_rate"


# --- Auth and errors.


def test_api_key_from_argument_and_environment(api, keyed, monkeypatch):
    monkeypatch.delenv("PONDER_API_KEY", raising=False)
    assert api(keyed, "complete", "x", max_tokens=1, client={"api_key": KEY}).usage.generated_tokens == 1
    assert keyed.engine.jobs[-1].api_key == KEY
    monkeypatch.setenv("PONDER_API_KEY", f"{KEY},unused")
    api(keyed, "ingest", "y")
    assert keyed.engine.jobs[-1].api_key == KEY
    for key in ("wrong", ""):
        with pytest.raises(AuthenticationError, match="missing or wrong API key.*--api-key"):
            api(keyed, "complete", "x", client={"api_key": key, "retries": 0})
    monkeypatch.delenv("PONDER_API_KEY")
    with pytest.raises(AuthenticationError):
        api(keyed, "reset", "s")
    assert keyed.engine.submits == 2


def test_invalid_request_names_the_field_and_is_not_retried(api, stack):
    with pytest.raises(InvalidRequest) as caught:
        api(stack, "complete", "x", max_tokens=65)
    assert caught.value.field == "max_tokens" and "must be between 0 and 64, got 65" in str(caught.value)
    stack.engine.refuse = [RequestError("prompt", "holds no tokens"), QueueFull("unused")]
    with pytest.raises(InvalidRequest, match="prompt: holds no tokens") as caught:
        api(stack, "complete", "x")
    assert caught.value.field == "prompt" and stack.engine.submits == 1  # one attempt: a 400 is final


def test_busy_and_unavailable_are_retried_with_backoff(api, stack, tokenizer):
    stack.engine.refuse = [QueueFull("the queue is full (1 waiting, limit 1)"), QueueFull("still full")]
    assert api(stack, "complete", "x", max_tokens=3).text == reply(tokenizer, 3)
    assert stack.engine.submits == 3
    stack.reset().engine.refuse = [QueueFull("the queue is full (1 waiting, limit 1)")] * 3
    with pytest.raises(ServerBusy, match="is busy: the queue is full"):
        api(stack, "complete", "x", client={"retries": 2})
    assert stack.engine.submits == 3
    from ponder.server.types import NotReady

    stack.reset().engine.refuse = [NotReady("the engine is warming up")]
    items = api(stack, "stream", "x", max_tokens=2)
    assert items[-1].text == reply(tokenizer, 2) and stack.engine.submits == 2
    stack.reset().engine.refuse = [NotReady("the engine is warming up")]
    with pytest.raises(ServerUnavailable, match="not ready: the engine is warming up"):
        api(stack, "ingest", "x", client={"retries": 0})


def test_a_started_stream_is_never_retried(api, stack, tokenizer):
    stack.engine.fail_after = 3
    seen = []

    def consume():
        if api.flavour == "sync":
            with Client(**stack.address(api.transport), backoff_s=0.01) as ponder:
                for item in ponder.stream("x", max_tokens=9):
                    seen.append(item)

        else:
            async def run():
                async with AsyncClient(**stack.address(api.transport), backoff_s=0.01) as ponder:
                    async for item in ponder.stream("x", max_tokens=9):
                        seen.append(item)

            asyncio.run(run())

    # gRPC reports the engine's failure as RESOURCE_EXHAUSTED, HTTP as an in-band server error
    with pytest.raises(ServerBusy if api.grpc else PonderError, match="dropped the job"):
        consume()
    assert "".join(d.text for d in seen) == reply(tokenizer, 3) and stack.engine.submits == 1


def test_deadline(api, stack, tokenizer):
    stack.engine.runner.delay_s = 0.2  # 20 tokens take 4 s
    for method in ("complete", "stream"):
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="the 0.5 s timeout passed"):
            api(stack, method, "x", max_tokens=20, timeout=0.5)
        assert time.monotonic() - start < 1.5, method
    stack.engine.runner.delay_s = 0.0
    assert api(stack, "complete", "x", max_tokens=4, timeout=5).text == reply(tokenizer, 4)


class Nowhere(Stack):
    """The addresses of servers that are not there."""

    def __init__(self):
        self.url, self.grpc_target = f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"


def test_unreachable_server(api):
    nobody = Nowhere()
    for method, args in (("complete", ("x",)), ("health", ())):
        with pytest.raises(ServerUnavailable, match="cannot reach ponder at .*: is `ponder serve` running"):
            api(nobody, method, *args, client={"retries": 1})


def test_client_arguments():
    with pytest.raises(ValueError, match="not both"):
        Client("http://x", grpc="y:1")
    with pytest.raises(ValueError, match="timeout must be a positive"):
        Client(retries=0).complete("x", timeout=0)
    assert repr(Client(grpc="h:1")) == "Client(grpc='h:1')" and Client().url == "http://127.0.0.1:8080"


# --- The command line.


def test_parse_position_and_split_at():
    assert parse_position("a/b.py:12") == (Path("a/b.py"), 12, None)
    assert parse_position("C:/x.py:3:7") == (Path("C:/x.py"), 3, 7)
    assert parse_position("odd:name.py:4") == (Path("odd:name.py"), 4, None)
    for bad in ("a.py", "a.py:", "a.py:x", ":3", "a.py:0", "a.py:2:0"):
        with pytest.raises(ValueError, match="FILE:LINE|count from 1"):
            parse_position(bad)
    text = "def f():\n    return 1\n"
    assert split_at(text, 1, None) == ("def f():", "\n    return 1\n")
    assert split_at(text, 2, 5) == ("def f():\n    ", "return 1\n")
    assert split_at(text, 3, None) == (text, "")  # the empty line after the last newline
    assert split_at("a\r\nb", 1, None) == ("a", "\r\nb")
    with pytest.raises(ValueError, match="line 4 is past the end of f.py, which has 3 lines"):
        split_at(text, 4, None, "f.py")
    with pytest.raises(ValueError, match=r"column 14 is past the end of line 2 of f.py \(12 characters: columns 1 to 13\)"):
        split_at(text, 2, 14, "f.py")


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "src" / "m.py"
    path.parent.mkdir()
    path.write_text("import os\n\n\ndef f(x):\n    return x\n")
    return path


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_complete_ingest_reset_health(stack, tokenizer, source, capsys, transport):
    where = ["--url", stack.url] if transport == "http" else ["--grpc", stack.grpc_target]
    session = str(source.resolve())
    for streamed in ([], ["--stream"]):
        assert ponder_cli.main(["complete", f"{source}:4:10", "--max-tokens", "6", *streamed, *where]) == 0
        out, err = capsys.readouterr()
        assert out == reply(tokenizer, 6) and "[6 tokens, finish_reason=length" in err
        job = stack.engine.jobs[-1]
        prefix, suffix = tokenizer.encode("import os\n\n\ndef f(x):"), tokenizer.encode("\n    return x\n")
        assert job.tokens == [tokenizer.eot_id, tokenizer.fim_prefix_id, *prefix, tokenizer.fim_suffix_id, *suffix,
                              tokenizer.fim_middle_id]
        assert (job.session_id, job.document_id, job.max_new_tokens) == (session, session, 6)
    assert ponder_cli.main(["ingest", str(source), *where]) == 0
    assert stack.engine.jobs[-1].tokens == [tokenizer.eot_id, *tokenizer.encode(source.read_text())]
    assert capsys.readouterr().out.startswith(f"ingested {source} into session {session}: ")
    assert stack.engine.committed_tokens("", session) is not None
    assert ponder_cli.main(["sessions", "reset", session, *where]) == 0
    assert stack.engine.committed_tokens("", session) is None and capsys.readouterr().out == f"reset session {session}\n"
    assert ponder_cli.main(["health", *where]) == 0
    assert capsys.readouterr().out.startswith("ok (")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_cli_update_rate(budgeted, source, transport):
    where = ["--url", budgeted.url] if transport == "http" else ["--grpc", budgeted.grpc_target]
    budgeted.reset()
    assert ponder_cli.main(["complete", f"{source}:4", "--max-tokens", "2", "--update-rate", "0.25", *where]) == 0
    assert ponder_cli.main(["ingest", str(source), "--update-rate", "0.75", *where]) == 0
    assert ponder_cli.main(["complete", f"{source}:4", "--max-tokens", "2", *where]) == 0
    assert [job.update_rate for job in budgeted.engine.jobs] == [0.25, 0.75, None]


def test_cli_errors_are_one_line(stack, source, capsys):
    def fails(*argv, status=2) -> str:
        with pytest.raises(SystemExit) as caught:
            ponder_cli.main(list(argv))
        assert caught.value.code == status
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return out + err

    assert "ponder complete: error: line 9 is past the end of" in fails("complete", f"{source}:9", "--url", stack.url)
    assert "no such file" in fails("complete", f"{source}.missing:1", "--url", stack.url)
    message = fails("complete", f"{source}:1", "--url", stack.url, "--max-tokens", "65")
    assert message.strip() == "ponder complete: error: max_tokens: must be between 0 and 64, got 65"
    stack.engine.ready = False
    assert fails("health", "--url", stack.url, status=1) == f"loading ({stack.url})\n"


def _ponder(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ponder", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def test_cli_process_wrong_key_and_no_server(keyed, source):
    wrong = _ponder("complete", f"{source}:1", "--url", keyed.url, env={"PONDER_API_KEY": "wrong"})
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.startswith("ponder complete: error: missing or wrong API key") and "Traceback" not in wrong.stderr
    right = _ponder("complete", f"{source}:1", "--grpc", keyed.grpc_target, "--max-tokens", "2", "--api-key", KEY)
    assert right.returncode == 0 and right.stdout == "hello wor", right.stderr
    port = free_port()
    down = _ponder("health", "--url", f"http://127.0.0.1:{port}", "--retries", "0")
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert down.stderr.startswith(f"ponder health: error: cannot reach ponder at http://127.0.0.1:{port}: "
                                  "is `ponder serve` running?")


# --- The real model.

PROMPT = "import os\n\n\ndef read_lines(path):\n    "
SUFFIX = "\n    return lines\n"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_client_equals_offline_generation(live_server, offline, transport):
    where = {"url": live_server.url} if transport == "http" else {"grpc": live_server.grpc_target}
    with Client(**where) as ponder:
        done = ponder.complete(PROMPT, max_tokens=24, session=f"client-{transport}", timeout=120)
        assert done.text == offline(PROMPT, 24)
        assert done.session_id == f"client-{transport}" and done.usage.generated_tokens <= 24
        assert done.chunks_updated + done.chunks_skipped == len(done.chunk_lambda)
        *deltas, streamed = ponder.stream(PROMPT, SUFFIX, max_tokens=16, timeout=120)
        assert "".join(d.text for d in deltas) == streamed.text == offline(PROMPT, 16, suffix=SUFFIX)
        if transport == "grpc":
            assert len(streamed.token_ids) == streamed.usage.generated_tokens
        assert ponder.health().ready


def test_async_client_equals_offline_generation(live_server, offline):
    async def run():
        async with AsyncClient(grpc=live_server.grpc_target) as over_grpc, AsyncClient(live_server.url) as over_http:
            return await asyncio.gather(*(c.complete(PROMPT, max_tokens=12, timeout=120) for c in (over_grpc, over_http)))

    assert [done.text for done in asyncio.run(run())] == [offline(PROMPT, 12)] * 2


def test_cli_against_the_server(live_server, offline, tmp_path):
    path = tmp_path / "lines.py"
    path.write_text(PROMPT + SUFFIX)
    done = _ponder("complete", f"{path}:4", "--url", live_server.url, "--max-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert done.stdout == offline("import os\n\n\ndef read_lines(path):", 16, suffix="\n    " + SUFFIX)
    streamed = _ponder("complete", f"{path}:5:5", "--grpc", live_server.grpc_target, "--max-tokens", "16", "--stream")
    assert streamed.returncode == 0 and streamed.stdout == offline(PROMPT, 16, suffix=SUFFIX), streamed.stderr
    health = _ponder("health", "--url", live_server.url)
    assert (health.returncode, health.stdout) == (0, f"ok ({live_server.url})\n")


def test_requests_name_their_session_for_a_router(tokenizer):
    """Every session request carries X-Session-Id (percent-encoded), the key deploy/nginx.conf hashes on."""
    engine, seen = RecordingEngine(tokenizer.encode(REPLY)), []
    app = build_app(CompletionService(engine, tokenizer), engine, ServerMetrics.create())

    async def recorder(scope, receive, send):
        if scope["type"] == "http":
            seen.append((scope["path"], dict(scope["headers"]).get(b"x-session-id")))
        await app(scope, receive, send)

    server = Server(recorder)
    try:
        with Client(server.url) as ponder:
            ponder.complete("x = ", session="/src/a b.py", max_tokens=2)
            list(ponder.stream("x = ", session="/src/a b.py", max_tokens=2))
            ponder.ingest("x = 1\n", session="s1")
            ponder.reset("/src/a b.py")
            ponder.complete("x = ", max_tokens=2)
    finally:
        server.stop()
        engine.stop(drain_s=1)
    assert [header for _, header in seen] == [b"/src/a%20b.py", b"/src/a%20b.py", b"s1", b"/src/a%20b.py", None]
