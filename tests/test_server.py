"""A real ``ponder serve`` process on the bundled checkpoint, driven by real clients.

Every completion is compared token for token with the model's own offline
generation on the same prompt: HTTP (the official ``openai`` package and
llama.cpp's ``/infill``), gRPC streaming, fill-in-the-middle, stop
sequences, sessions. Then the operational contract: metrics pass
``promtool``, no compilation after warm-up, SIGTERM drains.
"""

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import require_tool

from ponder.model import ttt_lm

PROMPT = "import os\n\n\ndef read_lines(path):\n    "
SUFFIX = "\n    return lines\n"


@pytest.fixture(scope="module")
def openai_client(live_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_completion_equals_offline_generation(live_server, openai_client, offline):
    want = offline(PROMPT, 24)
    got = openai_client.completions.create(model="default", prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.completion_tokens <= 24 and got.usage.prompt_tokens > 0
    chunks = list(
        openai_client.completions.create(
            model="default", prompt=PROMPT, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_fill_in_the_middle_and_stop_sequences(live_server, openai_client, offline):
    want = offline(PROMPT, 20, suffix=SUFFIX)
    got = openai_client.completions.create(model="default", prompt=PROMPT, suffix=SUFFIX, max_tokens=20, temperature=0)
    assert got.choices[0].text == want
    infill = httpx.post(
        live_server.url + "/infill", json={"input_prefix": PROMPT, "input_suffix": SUFFIX, "n_predict": 20}, timeout=60
    ).json()
    assert infill["content"] == want
    full = offline(PROMPT, 32)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    cut = openai_client.completions.create(model="default", prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_session_reuse_gives_the_cold_start_tokens(live_server, offline):
    """Extending, editing and growing one session past the context window answers exactly what a
    fresh session answers; while the prompt fits the base's window that is also the offline generate."""
    text = Path(ttt_lm.__file__).read_text()[:6000]

    def complete(n: int, session: str) -> str:
        body = {"prompt": text[:n], "max_tokens": 8, "temperature": 0, "session_id": session, "document_id": "ttt_lm.py"}
        return httpx.post(live_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    for n in (900, 1400, 1380, 2000, 2900, 6000):  # extend, edit (shrink), extend, past the window (~1,900 tokens)
        reused = complete(n, "reuse")
        assert reused == complete(n, f"cold-{n}"), n
        if n <= 2000:  # under 768 tokens the window has not moved: the base sees the whole prompt
            assert reused == offline(text[:n], 8), n



def test_grpc_streaming_equals_offline_generation(live_server, offline):
    grpc = pytest.importorskip("grpc")
    from ponder.v1 import completion_pb2, completion_pb2_grpc

    with grpc.insecure_channel(live_server.grpc_target) as channel:
        stub = completion_pb2_grpc.CompletionStub(channel)
        replies = list(stub.Complete(completion_pb2.CompleteRequest(prompt=PROMPT, max_tokens=24), timeout=60))
    assert "".join(r.text for r in replies) == offline(PROMPT, 24)
    assert replies[-1].usage.generated_tokens > 0


def test_repetition_penalties_end_the_greedy_loop(live_server, offline):
    """The bundled model's greedy text repeats one line; vLLM's repetition_penalty (OpenAI API) and llama.cpp's
    repeat_penalty (``/infill``) leave no line repeated."""
    prompt = "class Stack:\n    def __init__(self):\n"

    def lines(text: str) -> list[str]:
        return [line.strip() for line in text.split("\n") if line.strip()]

    def complete(**fields) -> str:
        body = {"prompt": prompt, "max_tokens": 48, **fields}
        return httpx.post(live_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    looping = lines(complete())
    assert lines(offline(prompt, 48)) == looping and len(set(looping)) <= len(looping) // 2
    infill = httpx.post(live_server.url + "/infill", json={"input_prefix": prompt, "n_predict": 48, "repeat_penalty": 1.2},
                        timeout=60).json()["content"]
    for text in (complete(repetition_penalty=1.2), infill):
        assert len(lines(text)) >= 4 and len(set(lines(text))) == len(lines(text)), text


def test_metrics_pass_promtool_and_nothing_compiles_after_warm_up(live_server):
    def compilations() -> float:
        text = httpx.get(live_server.url + "/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("ponder_compilations_total")))

    before = compilations()
    for n in (1, 7, 70, 300, 700):
        body = {"prompt": "x = 1\n" * n, "max_tokens": 3, "temperature": 0.7, "seed": n,  # sampling values are traced
                "repetition_penalty": 1 + n / 1000, "presence_penalty": n / 1000, "min_p": n / 1000}
        assert httpx.post(live_server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert compilations() == before
    metrics = httpx.get(live_server.url + "/metrics").text
    for name in ("ponder_time_to_first_token_seconds", "ponder_chunk_lambda", "ponder_chunks_total", "ponder_requests_total"):
        assert name in metrics
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_sigterm_drains_running_requests(compile_cache):
    """A stream in flight when SIGTERM arrives completes; then the process exits cleanly, whatever
    signals arrive after the stream's end."""
    from conftest import LIVE_SLOTS, LiveServer

    server = LiveServer("--slots", LIVE_SLOTS, "--compile-cache", compile_cache).wait_ready()
    result, streaming = {}, threading.Event()

    def stream():
        body = {"prompt": PROMPT, "max_tokens": 256, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
            lines = []
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    streaming.set()
            result["lines"] = lines

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(timeout=60)
    server.process.send_signal(signal.SIGTERM)
    reader.join(timeout=60)
    assert result["lines"][-1] == "data: [DONE]"
    assert len(result["lines"]) > 10  # the stream ran on after the signal
    # SIGTERM again until the process exits (a supervisor may send more than one): with nothing
    # left to drain, the exit stays clean however late one arrives.
    deadline = time.monotonic() + 30
    while server.process.poll() is None and time.monotonic() < deadline:
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    assert server.stop() == 0, server.output()


def test_grpc_calls_that_outlive_the_drain_end_unavailable_and_the_process_exits(compile_cache):
    """Issue 21's case: nine long gRPC calls on three slots, SIGTERM, a drain of 1 s.
    Each call ends (done, or UNAVAILABLE saying why) and the process is gone within the drain and 5 s."""
    pytest.importorskip("grpc")
    from conftest import LIVE_SLOTS, LiveServer

    drain_s, calls = 1, 9
    server = LiveServer("--slots", LIVE_SLOTS, "--compile-cache", compile_cache, "--queue-size", "16",
                        "--drain-s", str(drain_s))
    try:
        server.wait_ready()
        _outlive_the_drain(server, drain_s, calls)
    finally:
        if server.process.poll() is None:
            server.process.kill()


def _outlive_the_drain(server, drain_s: float, calls: int) -> None:
    import grpc
    from conftest import LIVE_SLOTS

    from ponder.v1 import completion_pb2, completion_pb2_grpc

    ends, streaming = [], threading.Semaphore(0)

    def call(i: int) -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = completion_pb2_grpc.CompletionStub(channel)
            try:
                for j, reply in enumerate(stub.Complete(completion_pb2.CompleteRequest(prompt=f"# {i}\n" + PROMPT, max_tokens=256),
                                                        timeout=120)):
                    if j == 0:
                        streaming.release()
                ends.append(("done", reply.finish_reason))
            except grpc.RpcError as error:
                ends.append((error.code(), error.details()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    for _ in range(int(LIVE_SLOTS)):  # every slot generating, the rest queued
        assert streaming.acquire(timeout=120)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=drain_s + 5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {drain_s + 5} s after SIGTERM:\n{server.output()[-3000:]}") from None
    took = time.monotonic() - signalled
    for t in threads:
        t.join(timeout=10)
    assert server.process.returncode == 0, server.output()[-3000:]
    assert len(ends) == calls, ends
    cut = [end for end in ends if end[0] != "done"]
    assert cut, f"every call finished within the drain ({took:.1f} s): nothing outlived it"
    for code, details in cut:
        # Ended by the drain's end, or (not yet queued at the signal) refused by a draining server.
        assert code == grpc.StatusCode.UNAVAILABLE and ("shut down" in details or "shutting down" in details), details
