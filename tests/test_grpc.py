"""The gRPC front end on a real ``grpc.server``, driven by the generated client stubs.

Behind it, as in ``test_http.py``: the real ``CompletionService``,
tokenizer and engine, on the hand-computable test runner
(``tests/fake_runner.py``), so the stream's text, token ids, λ, usage, finish
reasons and status codes are checked exactly. The real model behind gRPC is
tested in ``test_server.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import free_port
from fake_runner import LAMBDA, RecordingEngine, chunks_closed, full_queue
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ponder.model.gating import Schedule
from ponder.model.sampling import Sampling
from ponder.model.tokenizer import Tokenizer
from ponder.server.grpc_server import SERVICE_NAME, build_grpc_server
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionService
from ponder.v1 import completion_pb2 as pb
from ponder.v1 import completion_pb2_grpc as pb_grpc

TOKENIZER = Path(__file__).resolve().parent.parent / "checkpoints" / "default" / "tokenizer.json"
KEY = "sk-grpc-key"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(TOKENIZER)


class Stack:
    """A gRPC server over the engine on the fake runner, and a channel to it."""

    def __init__(self, tokenizer, api_keys=(), schedule: Schedule | None = None):
        self.metrics = ServerMetrics.create()
        self.engine = RecordingEngine(tokenizer.encode("hello world\n"), metrics=self.metrics, max_new_tokens=64,
                                      schedule=schedule or Schedule())
        service = CompletionService(self.engine, tokenizer)
        address = f"127.0.0.1:{free_port()}"
        self.server = build_grpc_server(service, self.engine, self.metrics, api_keys, address, max_workers=4)
        self.server.start()
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.CompletionStub(self.channel)

    def count(self, endpoint: str, outcome: str) -> float:
        return self.metrics.registry.get_sample_value("ponder_requests_total", {"endpoint": endpoint, "outcome": outcome}) or 0

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)
        self.engine.stop(drain_s=1)


@pytest.fixture(scope="module")
def stack(tokenizer):
    s = Stack(tokenizer)
    yield s
    s.close()


@pytest.fixture
def grpc_stack(stack):
    stack.engine.fresh()
    return stack


def reply(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode("hello world\n")
    return [ids[i % len(ids)] for i in range(n)]


def test_complete_streams_text_ids_lambda_and_usage(grpc_stack, tokenizer):
    messages = list(grpc_stack.stub.Complete(pb.CompleteRequest(prompt="def f():", max_tokens=9, session_id="s1"), timeout=10))
    *deltas, final = messages
    assert [t for m in deltas for t in m.token_ids] == reply(tokenizer, 9)
    assert "".join(m.text for m in deltas) == tokenizer.decode(reply(tokenizer, 9))
    closed = chunks_closed(len(grpc_stack.engine.jobs[-1].tokens), 9)
    assert [x for m in deltas for x in m.chunk_lambda] == [LAMBDA] * closed and closed > 0
    assert final.finish_reason == pb.LENGTH and final.session_id == "s1" and not final.text
    assert final.usage.generated_tokens == 9 and final.usage.chunks_updated == closed
    assert final.usage.prompt_tokens == len(grpc_stack.engine.jobs[-1].tokens)
    assert grpc_stack.engine.jobs[-1].tokens == [tokenizer.eot_id, *tokenizer.encode("def f():")]
    assert grpc_stack.count("grpc.Complete", "ok") >= 1


def test_fill_in_the_middle_and_stop_sequences(grpc_stack, tokenizer):
    request = pb.CompleteRequest(prompt="a = ", suffix="\nb = 2\n", max_tokens=30, stop=["world"])
    *deltas, final = grpc_stack.stub.Complete(request, timeout=10)
    assert "".join(m.text for m in deltas) == "hello " and final.finish_reason == pb.STOP
    job = grpc_stack.engine.jobs[-1]
    assert job.tokens[:2] == [tokenizer.eot_id, tokenizer.fim_prefix_id] and job.tokens[-1] == tokenizer.fim_middle_id
    assert job.cancelled.is_set()  # the stop sequence freed the slot


def test_ingest_and_reset(grpc_stack):
    got = grpc_stack.stub.Ingest(pb.IngestRequest(text="import os\n", session_id="doc", document_id="a.py"), timeout=10)
    assert got.session_id == "doc" and got.usage.generated_tokens == 0
    assert grpc_stack.engine.jobs[-1].max_new_tokens == 0 and grpc_stack.engine.jobs[-1].document_id == "a.py"
    assert grpc_stack.engine.committed_tokens("", "doc") is not None
    assert grpc_stack.stub.ResetSession(pb.ResetSessionRequest(session_id="doc"), timeout=10).existed
    assert grpc_stack.engine.committed_tokens("", "doc") is None
    assert not grpc_stack.stub.ResetSession(pb.ResetSessionRequest(session_id="doc"), timeout=10).existed


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.CompleteRequest(prompt="x", max_tokens=65), "max_tokens"),
        (pb.CompleteRequest(prompt="x", temperature=-1), "temperature"),
        (pb.CompleteRequest(prompt="x", top_p=1.5), "top_p"),
        (pb.CompleteRequest(prompt="x", top_k=-3), "top_k"),
        (pb.CompleteRequest(prompt="x", stop=[""]), "stop"),
        (pb.CompleteRequest(prompt="x", max_tokens=-1), "max_tokens"),
        (pb.CompleteRequest(prompt="x", update_rate=1.5), "update_rate"),
        (pb.CompleteRequest(prompt="x", update_rate=float("nan")), "update_rate"),
        (pb.CompleteRequest(prompt="x", update_rate=0.5), "update_rate"),  # the schedule ('learned') reads no budget
        (pb.CompleteRequest(prompt="x", repeat_penalty=0), "repeat_penalty"),  # set to 0, not absent
        (pb.CompleteRequest(prompt="x", repeat_last_n=-2), "repeat_last_n"),
        (pb.CompleteRequest(prompt="x", presence_penalty=2.5), "presence_penalty"),
        (pb.CompleteRequest(prompt="x", frequency_penalty=float("nan")), "frequency_penalty"),
        (pb.CompleteRequest(prompt="x", min_p=1.5), "min_p"),
    ],
)
def test_bad_fields_are_invalid_argument_naming_the_field(grpc_stack, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        list(grpc_stack.stub.Complete(request_, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field + ":")
    with pytest.raises(grpc.RpcError) as err:
        grpc_stack.stub.ResetSession(pb.ResetSessionRequest(session_id=""), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in err.value.details()


def test_sampling_controls_reach_the_job(grpc_stack):
    """llama.cpp's penalties (a window of the prompt and the completion) with the temperature first; absent
    ``repeat_penalty`` / ``repeat_last_n`` are llama.cpp's defaults."""
    request = pb.CompleteRequest(prompt="x", max_tokens=2, temperature=0.5, repeat_penalty=1.25, repeat_last_n=-1,
                                 presence_penalty=0.5, frequency_penalty=-0.25, min_p=0.125)
    list(grpc_stack.stub.Complete(request, timeout=10))
    list(grpc_stack.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=2), timeout=10))
    set_, absent = (job.sampling for job in grpc_stack.engine.jobs)
    assert set_ == Sampling(temperature=0.5, min_p=0.125, repeat_penalty=1.25, repeat_last_n=-1, presence_penalty=0.5,
                            frequency_penalty=-0.25)
    assert absent == Sampling()


def test_update_rate_sets_the_sessions_budget(tokenizer):
    s = Stack(tokenizer, schedule=Schedule("learned_budget", rate=0.5))
    try:
        messages = list(s.stub.Complete(pb.CompleteRequest(prompt="def f():", max_tokens=3, session_id="c", update_rate=0.25),
                                        timeout=10))
        assert messages[-1].finish_reason == pb.LENGTH
        s.stub.Ingest(pb.IngestRequest(text="import os\n" * 10, session_id="i", update_rate=0.75), timeout=10)
        s.stub.Ingest(pb.IngestRequest(text="import os\n" * 10, session_id="i"), timeout=10)
        assert [job.update_rate for job in s.engine.jobs] == [0.25, 0.75, None]  # absent: the session's last one
        assert s.engine.sessions.get("", "c").doc.target == 0.25 and s.engine.sessions.get("", "i").doc.target == 0.75
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Ingest(pb.IngestRequest(text="x", session_id="i", update_rate=-1), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "update_rate: must be a number in [0, 1] (the share of chunks whose fast weights update), got -1.0"
        assert s.engine.sessions.get("", "i").doc.target == 0.75  # nothing lost
        assert s.count("grpc.Ingest", "client_error") == 1
    finally:
        s.close()


def test_full_queue_and_warm_up_are_retryable_statuses(grpc_stack):
    with full_queue(grpc_stack.engine), pytest.raises(grpc.RpcError) as err:
        list(grpc_stack.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in err.value.details()
    grpc_stack.engine.ready = False
    with pytest.raises(grpc.RpcError) as err:
        grpc_stack.stub.Ingest(pb.IngestRequest(text="x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in err.value.details()
    assert grpc_stack.count("grpc.Complete", "rejected") >= 1 and grpc_stack.count("grpc.Ingest", "rejected") >= 1


def test_client_cancel_cancels_the_job(grpc_stack):
    grpc_stack.engine.runner.delay_s = 0.01
    before = grpc_stack.count("grpc.Complete", "cancelled")
    call = grpc_stack.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=64), timeout=10)
    next(call)
    call.cancel()
    job = grpc_stack.engine.jobs[-1]
    end = time.monotonic() + 5
    while not job.cancelled.is_set() or grpc_stack.count("grpc.Complete", "cancelled") == before:
        assert time.monotonic() < end, "the cancelled call's job kept running"
        time.sleep(0.01)


def test_deadline_is_deadline_exceeded(grpc_stack):
    grpc_stack.engine.runner.delay_s = 0.05
    with pytest.raises(grpc.RpcError) as err:
        list(grpc_stack.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=64), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_time_budget_ends_with_length(grpc_stack):
    grpc_stack.engine.runner.delay_s = 0.02
    *deltas, final = grpc_stack.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=64, time_budget_ms=200), timeout=10)
    assert final.finish_reason == pb.LENGTH and 0 < final.usage.generated_tokens < 64


def test_auth(tokenizer):
    s = Stack(tokenizer, api_keys=("other", KEY))
    try:
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
            with pytest.raises(grpc.RpcError) as err:
                list(s.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=2), metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            s.stub.ResetSession(pb.ResetSessionRequest(session_id="d"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Client errors, as HTTP counts its 401s; the client did not go away.
        assert s.count("grpc.Complete", "client_error") == 3 and s.count("grpc.ResetSession", "client_error") == 1
        assert s.count("grpc.Complete", "cancelled") == 0 and s.count("grpc.ResetSession", "cancelled") == 0
        ok = list(s.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=2), metadata=(("authorization", f"Bearer {KEY}"),)))
        assert ok[-1].usage.generated_tokens == 2 and s.engine.jobs[-1].api_key == KEY
        s.stub.Ingest(pb.IngestRequest(text="x = 1\n", session_id="d"), metadata=(("authorization", f"Bearer {KEY}"),))
        assert s.engine.committed_tokens(KEY, "d") is not None
        s.stub.ResetSession(pb.ResetSessionRequest(session_id="d"), metadata=(("authorization", f"Bearer {KEY}"),))
        assert s.engine.committed_tokens(KEY, "d") is None
        health = health_pb2_grpc.HealthStub(s.channel)  # health needs no key
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
        assert status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        s.close()


@pytest.mark.parametrize("method, data", [
    ("Complete", b"\x0a\x02\xff\xfe"),  # prompt: two bytes that are not UTF-8
    ("Complete", b"\x0a\x10abc"),  # prompt: 16 bytes announced, 3 sent
    ("Ingest", b"\x0a\x01\x80"),
    ("ResetSession", b"\x0a"),
])
def test_a_malformed_request_is_invalid_argument_without_a_traceback(grpc_stack, caplog, method, data):
    before = grpc_stack.count(f"grpc.{method}", "client_error")
    kind = grpc_stack.channel.unary_stream if method == "Complete" else grpc_stack.channel.unary_unary
    call = kind(f"/{SERVICE_NAME}/{method}")  # no serializer: the bytes go out as they are
    with pytest.raises(grpc.RpcError) as err:
        answer = call(data, timeout=10)
        list(answer) if method == "Complete" else answer
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details().startswith("malformed request: Error parsing message"), err.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert grpc_stack.count(f"grpc.{method}", "client_error") == before + 1
    assert not grpc_stack.engine.jobs


def test_a_call_running_when_the_engine_stops_ends_unavailable(tokenizer):
    """Each call gets a final status when the drain gives up on it: none waits forever (``test_engine_loop.py``
    checks that jobs in every state get their final event)."""
    s = Stack(tokenizer)
    try:
        s.engine.runner.delay_s = 0.05  # 64 tokens take 3 s
        calls = [s.stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=64), timeout=30) for _ in range(4)]
        end = time.monotonic() + 10
        while len(s.engine.jobs) < len(calls):
            assert time.monotonic() < end, "the calls never reached the engine"
            time.sleep(0.01)
        s.engine.stop(drain_s=0.1)
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shut down" in err.value.details()
    finally:
        s.close()


def test_a_stopped_server_leaves_no_thread_behind(tokenizer):
    def watchers():
        return {t for t in threading.enumerate() if t.name == "ponder-grpc-health"}

    before = watchers()
    s = Stack(tokenizer)
    assert len(watchers() - before) == 1
    s.close()
    end = time.monotonic() + 5
    while watchers() - before:
        assert time.monotonic() < end, "the health watcher outlived its server"
        time.sleep(0.05)


def test_health_follows_readiness_and_reflection_lists_the_services(grpc_stack):
    health = health_pb2_grpc.HealthStub(grpc_stack.channel)

    def status():
        return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status

    def wait_for(want):
        end = time.monotonic() + 5
        while status() != want:
            assert time.monotonic() < end, f"health never became {want}"
            time.sleep(0.05)

    wait_for(health_pb2.HealthCheckResponse.SERVING)
    grpc_stack.engine.ready = False
    wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
    grpc_stack.engine.ready = True
    wait_for(health_pb2.HealthCheckResponse.SERVING)
    answers = reflection_pb2_grpc.ServerReflectionStub(grpc_stack.channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in next(answers).list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
