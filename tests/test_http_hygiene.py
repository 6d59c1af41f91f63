"""What the HTTP front end refuses before any work, and what it does off the event loop.

A prompt is tokenized on a worker thread, and a plain prompt that cannot fit
the token limit is refused without tokenizing it; a body must say it is JSON,
arrive whole in time and, on a loopback server, be addressed to a loopback
name. The stack is ``test_http.py``'s: the real service and engine on the
hand-computable fake runner, behind a real uvicorn.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fake_runner import RecordingEngine
from test_http import REPLY, TOKENIZER, Server, assert_error

from ponder.model.tokenizer import Tokenizer
from ponder.server.http.app import build_app
from ponder.server.http.hosts import LOOPBACK_HOSTS, allowed_hosts
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionRequest, CompletionService, Limits
from ponder.server.types import RequestError

MAX_PROMPT_TOKENS = 64
BODY_TIMEOUT_S = 0.5


class SlowTokenizer:
    """The real tokenizer, but encoding text takes ``delay_s`` longer (a sleep: it holds no lock)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.delay_s, self.encoded = tokenizer, 0.0, 0

    def _slowly(self, encode, text: str) -> list[int]:
        self.encoded += 1
        time.sleep(self.delay_s)
        return encode(text)

    def encode(self, text: str) -> list[int]:
        return self._slowly(self.tokenizer.encode, text)

    def encode_document(self, text: str) -> list[int]:
        return self._slowly(self.tokenizer.encode_document, text)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def stack():
    """(url, tokenizer, engine) of a loopback server with small limits."""
    real = Tokenizer.load(TOKENIZER)
    tokenizer = SlowTokenizer(real)
    engine = RecordingEngine(real.encode(REPLY))
    service = CompletionService(engine, tokenizer, Limits(max_prompt_tokens=MAX_PROMPT_TOKENS))
    app = build_app(service, engine, ServerMetrics.create(), body_timeout_s=BODY_TIMEOUT_S, allowed_hosts=LOOPBACK_HOSTS)
    server = Server(app)
    yield server.url, tokenizer, engine
    server.stop()
    engine.stop(drain_s=1)


@pytest.fixture
def server(stack):
    url, tokenizer, engine = stack
    tokenizer.delay_s, tokenizer.encoded = 0.0, 0
    engine.fresh()
    return stack


def test_tokenizing_a_prompt_leaves_the_event_loop_free(server):
    url, tokenizer, _ = server
    tokenizer.delay_s = 1.5
    answers = []
    completion = threading.Thread(
        target=lambda: answers.append(httpx.post(url + "/v1/completions", json={"prompt": "x = 1\n", "max_tokens": 2}, timeout=30)))
    completion.start()
    end = time.monotonic() + 10
    while not tokenizer.encoded:
        assert time.monotonic() < end, "the completion never reached the tokenizer"
        time.sleep(0.005)
    start = time.monotonic()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 0.5, "/health waited for the tokenizer"
    completion.join(timeout=30)
    assert answers[0].status_code == 200, answers[0].text


def test_a_prompt_too_long_for_the_limit_is_refused_without_tokenizing(server):
    url, tokenizer, engine = server
    width = tokenizer.max_token_bytes  # a token stands for at most this many characters
    most = (MAX_PROMPT_TOKENS - 1) * width  # with the end-of-document token, the longest prompt that might fit
    error = assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x" * (most + 1)}), 400,
                         "prompt:", f"{most + 1} characters", f"limit of {MAX_PROMPT_TOKENS} tokens")
    assert error["param"] == "prompt" and tokenizer.encoded == 0 and not engine.jobs
    # At the bound it is tokenized, and refused on its count of tokens.
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x" * most}), 400, "prompt:", "tokens exceeds the limit")
    assert tokenizer.encoded == 1


def test_the_bound_refuses_only_prompts_with_too_many_tokens():
    tokenizer = Tokenizer.load(TOKENIZER)
    width = tokenizer.max_token_bytes
    longest = next(tokenizer.decode([i]) for i in range(len(tokenizer)) if len(tokenizer.decode_bytes([i])) == width)
    service = CompletionService(RecordingEngine([1, 2]), tokenizer, Limits(max_prompt_tokens=8))
    try:
        # Seven of the longest token fill the limit exactly (with the end-of-document token): the bound lets them
        # through; one character more and it refuses them unread.
        assert len(service.job(CompletionRequest(prompt=longest * 7)).tokens) == 8
        with pytest.raises(RequestError, match=f"prompt: {7 * width + 1} characters cannot fit the limit of 8 tokens"):
            service.job(CompletionRequest(prompt=longest * 7 + "-"))
        for text in ("é" * 500, "😀" * 300, " " * 2000, "import os\n" * 300, longest * 7 + "-"):
            try:
                service.job(CompletionRequest(prompt=text))
            except RequestError as error:  # by the bound or by the count: either way, truly too many tokens
                assert error.field == "prompt" and len(tokenizer.encode_document(text)) > 8, (text[:20], error)
    finally:
        service.engine.stop(drain_s=0)


def test_tokenizer_encode_releases_the_gil():
    """A thread encoding a long text leaves the others running (Hugging Face's single ``encode`` holds the GIL)."""
    tokenizer = Tokenizer.load(TOKENIZER)
    text = "def f(x):\n    return x * 2  # é\n" * 20000
    worker = threading.Thread(target=tokenizer.encode, args=(text,))
    start, wakeups = time.monotonic(), 0
    worker.start()
    while worker.is_alive():
        time.sleep(0.005)
        wakeups += 1
    took = time.monotonic() - start
    assert took > 0.05, "too short to tell"
    assert wakeups >= 10 * took, f"{wakeups} wake-ups in {took:.2f} s of encoding"


def test_a_body_that_stops_arriving_is_408(server):
    url, _, engine = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"pr")  # 4 of 100 bytes
        start, answer = time.monotonic(), b""
        while chunk := s.recv(65536):  # the server answers, then closes the connection
            answer += chunk
    assert time.monotonic() - start < BODY_TIMEOUT_S + 2
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"--body-timeout-s" in body and b"0.5 s" in body
    assert not engine.jobs


def test_a_body_still_arriving_when_the_drain_begins_is_503_at_once(server):
    """The soak's shutdown waited for a body that stopped arriving, then answered 500 when uvicorn cancelled it."""
    url, _, engine = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"pr")
        time.sleep(0.05)
        engine.draining = True
        try:
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        finally:
            engine.draining = False
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer  # not the 408 of the body timeout
    assert b"shutting down" in body and not engine.jobs


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_declared_json_is_415(server, content_type):
    """What a web page may send to a local server without the browser asking it first: never read."""
    url, tokenizer, engine = server
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/completions", "/infill"):
        r = httpx.post(url + path, content=b'{"prompt": "x"}', headers=headers)
        assert_error(r, 415, "Content-Type", "application/json", repr(content_type) if content_type else "got none")
    assert not engine.jobs and tokenizer.encoded == 0


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8", "application/merge-patch+json"])
def test_json_content_types_are_accepted(server, content_type):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:8080", "LOCALHOST"])
def test_a_loopback_server_answers_loopback_names(server, host):
    url, _, _ = server
    assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io", "localhost.evil.example", "[::2]"])
def test_a_loopback_server_refuses_other_names(server, host):
    """DNS rebinding: a page's own name, pointed at 127.0.0.1, reaches nothing."""
    url, _, engine = server
    for method, path in (("GET", "/health"), ("POST", "/v1/completions")):
        r = httpx.request(method, url + path, headers={"Host": host}, json={"prompt": "x"})
        error = assert_error(r, 403, f"Host: {host!r}", "localhost, 127.0.0.1, [::1]", "--host")
        assert error["type"] == "permission_error"
    assert not engine.jobs


def test_which_addresses_are_loopback():
    for bind in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert allowed_hosts(bind) == LOOPBACK_HOSTS, bind
    for bind in ("0.0.0.0", "::", "10.0.0.5", "example.internal"):
        assert allowed_hosts(bind) == (), bind


def test_a_server_reachable_from_other_machines_needs_a_key_or_the_unsafe_flag():
    from ponder.server.main import refuse_open_bind

    for bind in ("0.0.0.0", "::", "10.0.0.5"):
        with pytest.raises(SystemExit, match=rf"--host {re.escape(bind)} listens beyond this machine.*--api-key.*"
                                             r"--insecure-no-auth"):
            refuse_open_bind(bind, (), insecure_no_auth=False)
        refuse_open_bind(bind, ("k1",), insecure_no_auth=False)  # a key: served
        refuse_open_bind(bind, (), insecure_no_auth=True)  # the user said so
    refuse_open_bind("127.0.0.1", (), insecure_no_auth=False)  # loopback: the default, no key needed


def test_ponder_serve_refuses_an_open_bind_before_loading_anything():
    env = {k: v for k, v in os.environ.items() if k != "PONDER_API_KEY"}
    run = subprocess.run([sys.executable, "-m", "ponder", "serve", "--host", "0.0.0.0", "--checkpoint", "/nonexistent"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0
    assert "no API key is set" in run.stderr and "--insecure-no-auth" in run.stderr, run.stderr[-2000:]
