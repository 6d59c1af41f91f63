"""What a request may do to sessions, on every front end: ids are bounded, and a request without a
session id only ever lands in an anonymous session.

HTTP (both APIs, the reset route, ``/ui``) runs in-process through httpx's
ASGI transport and gRPC on a real ``grpc.server``, both over the engine on
the fake runner (``tests/fake_runner.py``).
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from conftest import free_port
from fake_runner import RecordingEngine

from ponder.server.grpc_server import build_grpc_server
from ponder.server.http.app import build_app
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionService
from ponder.server.sessions import MAX_ID_CHARS
from ponder.v1 import completion_pb2 as pb
from ponder.v1 import completion_pb2_grpc as pb_grpc

KEY = "key-a"
LONG = "x" * (MAX_ID_CHARS + 1)
LONGEST = "y" * MAX_ID_CHARS


@pytest.fixture(scope="module")
def engine(bundled_tokenizer):
    engine = RecordingEngine(bundled_tokenizer.encode("hello world\n"))
    yield engine
    engine.stop(drain_s=1)


def http(engine, tokenizer, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """Sends ``(method, path, keyword arguments)`` in order to the app (keyed with ``KEY``), in-process."""
    app = build_app(CompletionService(engine, tokenizer), engine, ServerMetrics.create(), api_keys=(KEY,))

    async def main():
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://ponder", headers=headers, timeout=10) as client:
            return [await client.request(method, path, **kw) for method, path, kw in requests]

    return asyncio.run(main())


def assert_names_the_limit(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and str(MAX_ID_CHARS) in error["message"], error


def test_ids_longer_than_the_limit_are_refused_over_http(engine, bundled_tokenizer):
    """Issue 21: 100 sessions with 4 MB ids raised RSS by 389 MiB."""
    engine.fresh()
    answers = http(engine, bundled_tokenizer, [
        ("POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "session_id": LONG}}),
        ("POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "document_id": LONG}}),
        ("POST", "/infill", {"json": {"input_prefix": "x", "n_predict": 1, "session_id": LONG}}),
        ("POST", "/infill", {"json": {"input_prefix": "x", "n_predict": 1, "document_id": LONG}}),
        ("POST", f"/v1/sessions/{LONG}/reset", {}),
        ("GET", "/ui", {"params": {"session_id": LONG}}),
        ("POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "session_id": LONGEST, "document_id": LONGEST}}),
        ("POST", f"/v1/sessions/{LONGEST}/reset", {}),
    ])
    for answer, field in zip(answers[:6], ["session_id", "document_id"] * 2 + ["session_id"] * 2):
        assert_names_the_limit(answer, field)
    assert [a.status_code for a in answers[6:]] == [200, 200] and answers[7].json()["existed"]
    assert len(engine.jobs) == 1  # nothing refused reached the engine


def test_ids_longer_than_the_limit_are_refused_over_grpc(engine, bundled_tokenizer):
    engine.fresh()
    address = f"127.0.0.1:{free_port()}"
    server = build_grpc_server(CompletionService(engine, bundled_tokenizer), engine, ServerMetrics.create(), (), address,
                               max_workers=2)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CompletionStub(channel)
            calls = [
                ("session_id", lambda: list(stub.Complete(pb.CompleteRequest(prompt="x", max_tokens=1, session_id=LONG)))),
                ("document_id", lambda: stub.Ingest(pb.IngestRequest(text="x", session_id="s", document_id=LONG))),
                ("session_id", lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=LONG))),
            ]
            for field, call in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field in refused.value.details() and str(MAX_ID_CHARS) in refused.value.details()
            assert stub.Ingest(pb.IngestRequest(text="x", session_id=LONGEST, document_id=LONGEST)).session_id == LONGEST
    finally:
        server.stop(grace=None)


def test_a_request_without_a_session_id_never_lands_in_a_named_session(engine, bundled_tokenizer):
    """Issue 21: a sessionless request carrying part of a document was matched to the key's named session
    ``k1-doc-B``, rolled it back from 704 to 256 cached tokens, and its answer named the session."""
    engine.fresh()
    document = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(40))
    part = document[: len(document) // 2] + "# edited\n"
    named, sessionless, again = http(engine, bundled_tokenizer, [
        ("POST", "/v1/completions", {"json": {"prompt": document, "max_tokens": 1, "session_id": "k1-doc-B"}}),
        ("POST", "/v1/completions", {"json": {"prompt": part, "max_tokens": 1}}),
        ("POST", "/v1/completions", {"json": {"prompt": document, "max_tokens": 1, "session_id": "k1-doc-B"}}),
    ])
    assert sessionless.json()["ponder"]["session_id"].startswith("anonymous-")
    committed = named.json()["usage"]["prompt_tokens"] - 1  # all but the open last token, in whole chunks
    assert again.json()["ponder"]["cached_tokens"] == committed // 4 * 4  # the named session was not rolled back
