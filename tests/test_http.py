"""The HTTP front end on a real uvicorn server, driven by real clients (httpx, the official ``openai`` package).

Behind it: the real ``CompletionService``, tokenizer and engine, on the test
runner (``tests/fake_runner.py``) whose answers can be worked out by hand:
the tokens of "hello world\\n" cycled, λ = 0.5 for every 4 tokens of the
document. So wire formats, errors, streaming, disconnects and auth are
checked exactly, without a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import free_port
from fake_runner import LAMBDA, RecordingEngine, budget_updates, chunks_closed, full_queue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder.model.gating import Schedule
from ponder.model.sampling import Sampling
from ponder.model.tokenizer import Tokenizer
from ponder.server.http.app import build_app
from ponder.server.http.wire import CompletionBody, InfillBody
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionService

TOKENIZER = Path(__file__).resolve().parent.parent / "checkpoints" / "default" / "tokenizer.json"
MAX_BODY = 64 << 10
KEY = "sk-test-key"
JSON_TYPE = {"Content-Type": "application/json"}  # for bodies sent as bytes (a JSON endpoint refuses other types)


class Server:
    """``build_app`` served by uvicorn on a free port, in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < end, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(TOKENIZER)


@pytest.fixture(scope="module")
def stack(tokenizer):
    """(url, engine, metrics) of an open server; each test finds the engine in its default state."""
    metrics = ServerMetrics.create()
    engine = RecordingEngine(tokenizer.encode(REPLY), metrics=metrics)
    server = Server(build_app(CompletionService(engine, tokenizer), engine, metrics, max_body_bytes=MAX_BODY, model_name="tiny"))
    yield server.url, engine, metrics
    server.stop()
    engine.stop(drain_s=1)


@pytest.fixture
def open_server(stack):
    url, engine, metrics = stack
    return url, engine.fresh(), metrics


@pytest.fixture(scope="module")
def keyed_server(tokenizer):
    engine = RecordingEngine(tokenizer.encode(REPLY))
    server = Server(build_app(CompletionService(engine, tokenizer), engine, ServerMetrics.create(), api_keys=("other-key", KEY)))
    yield server.url, engine
    server.stop()
    engine.stop(drain_s=1)


REPLY = "hello world\n"


def reply(tokenizer, n: int) -> str:
    """What the engine on the fake runner says in ``n`` tokens."""
    ids = tokenizer.encode(REPLY)
    return tokenizer.decode([ids[i % len(ids)] for i in range(n)])


def events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE answer, checking the framing on the way."""
    body = response.text
    assert body.endswith("\n\n")
    blocks = body[:-2].split("\n\n")
    assert all(block.startswith("data: ") for block in blocks), body
    return [block[len("data: "):] for block in blocks]


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    for word in words:
        assert word in error["message"], error
    return error


# --- OpenAI /v1/completions.


def test_completion_json_shape(open_server, tokenizer):
    url, engine, _ = open_server
    r = httpx.post(url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 9, "model": "anything"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    got = r.json()
    assert got["id"].startswith("cmpl-") and got["object"] == "text_completion" and got["model"] == "tiny"
    assert isinstance(got["created"], int)
    assert got["choices"] == [{"text": reply(tokenizer, 9), "index": 0, "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(engine.jobs[-1].tokens)
    assert got["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 9, "total_tokens": prompt_tokens + 9}
    ponder = got["ponder"]
    closed = chunks_closed(prompt_tokens, 9)
    assert ponder["chunk_lambda"] == [LAMBDA] * closed and ponder["chunks_updated"] == closed > 0
    assert ponder["finish_reason"] == "length" and ponder["session_id"] == "anonymous-1"
    assert engine.jobs[-1].tokens == [tokenizer.eot_id, *tokenizer.encode("def f():")]


def test_completion_defaults_list_prompt_echo_and_session(open_server, tokenizer):
    url, engine, _ = open_server
    body = {"prompt": ["x = 1\n"], "echo": True, "session_id": "s1", "document_id": "a.py", "temperature": None}
    got = httpx.post(url + "/v1/completions", json=body).json()
    assert got["choices"][0]["text"] == "x = 1\n" + reply(tokenizer, 16)  # max_tokens defaults to 16, like OpenAI's
    job = engine.jobs[-1]
    assert (job.session_id, job.document_id, job.max_new_tokens, job.sampling.temperature) == ("s1", "a.py", 16, 0.0)
    assert got["ponder"]["session_id"] == "s1"


def test_completion_stream_frames_and_include_usage(open_server, tokenizer):
    url, engine, _ = open_server
    body = {"prompt": "a", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == reply(tokenizer, 6)
    *deltas, finish, usage = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
    closed = chunks_closed(len(engine.jobs[-1].tokens), 6)
    assert finish["choices"][0]["finish_reason"] == "length" and finish["ponder"]["chunks_updated"] == closed > 0
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert sum(len(c["ponder"]["chunk_lambda"]) for c in deltas) == closed
    assert sum(c["ponder"]["tokens"] for c in deltas) == 6


def test_official_openai_client(open_server, tokenizer):
    openai = pytest.importorskip("openai")
    url, _, _ = open_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    got = client.completions.create(model="tiny", prompt="def f():", max_tokens=7, temperature=0, user="me", logprobs=None)
    assert got.choices[0].text == reply(tokenizer, 7) and got.usage.completion_tokens == 7
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply(tokenizer, 5)
    assert chunks[-1].usage.completion_tokens == 5
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**9)


def test_stop_sequence(open_server, tokenizer):
    url, _, _ = open_server
    got = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 20, "stop": "world"}).json()
    assert got["choices"][0]["text"] == "hello " and got["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 20, "stop": ["zzz", "wor"], "stream": True})
    chunks = [json.loads(d) for d in events(r)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_suffix_is_fill_in_the_middle(open_server, tokenizer):
    url, engine, _ = open_server
    got = httpx.post(url + "/v1/completions", json={"prompt": "def f(", "suffix": "\n    return x\n", "max_tokens": 3}).json()
    assert got["choices"][0]["text"] == reply(tokenizer, 3)
    job, t = engine.jobs[-1], tokenizer
    prefix, suffix = t.encode("def f("), t.encode("\n    return x\n")
    assert job.tokens == [t.eot_id, t.fim_prefix_id, *prefix, t.fim_suffix_id, *suffix, t.fim_middle_id]
    assert job.commit_limit == 2 + len(prefix)


def test_models(open_server):
    url, _, _ = open_server
    got = httpx.get(url + "/v1/models").json()
    assert got["object"] == "list" and [(m["id"], m["object"]) for m in got["data"]] == [("tiny", "model")]


def test_session_reset(open_server):
    url, engine, _ = open_server
    httpx.post(url + "/v1/completions", json={"prompt": "x = 1\n" * 4, "max_tokens": 1, "session_id": "doc-7"})
    assert engine.committed_tokens("", "doc-7")
    got = httpx.post(url + "/v1/sessions/doc-7/reset").json()
    assert got == {"session_id": "doc-7", "existed": True} and engine.committed_tokens("", "doc-7") is None
    assert httpx.post(url + "/v1/sessions/doc-7/reset").json() == {"session_id": "doc-7", "existed": False}


# --- llama.cpp /infill.


def test_infill_shape_and_field_placement(open_server, tokenizer):
    url, engine, _ = open_server
    body = {
        "input_prefix": "def f(", "prompt": "x", "input_suffix": "):\n", "n_predict": 5,
        "input_extra": [{"filename": "b.py", "text": "import os\n", "time": 12.5}],
        # llama.vim's other fields, accepted and ignored:
        "id_slot": 0, "cache_prompt": True, "samplers": ["top_k", "top_p", "infill"], "t_max_prompt_ms": 500,
        "top_k": 40, "top_p": 0.99, "n_probs": 2, "min_p": 0.05, "repeat_penalty": 1.1, "typical_p": 1.0,
    }
    r = httpx.post(url + "/infill", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["content"] == reply(tokenizer, 5) and got["stop"] is True and got["stop_type"] == "limit"
    assert got["tokens_predicted"] == 5 and got["truncated"] is False and got["stopping_word"] == ""
    job = engine.jobs[-1]
    # A new session: every prompt token computed, none reused; the context ends with the 4 generated tokens fed back.
    assert got["tokens_evaluated"] == len(job.tokens) and got["tokens_cached"] == len(job.tokens) + 5 - 1
    timings = got["timings"]
    assert timings["predicted_n"] == 5 and (timings["cache_n"], timings["prompt_n"]) == (0, len(job.tokens))
    t = tokenizer
    # The snippet, then the prefix with the text at the cursor: the document the session keeps; then the suffix.
    assert job.tokens[: job.commit_limit] == [t.eot_id, t.fim_prefix_id, *t.encode("# b.py\nimport os\n\n"), *t.encode("def f(x")]
    assert job.tokens[job.commit_limit :] == [t.fim_suffix_id, *t.encode("):\n"), t.fim_middle_id]
    assert (job.sampling.top_k, job.sampling.top_p) == (40, 0.99)


def test_infill_ingest_only_and_empty_prefix(open_server):
    url, engine, _ = open_server
    got = httpx.post(url + "/infill", json={"input_prefix": "", "input_suffix": "", "n_predict": 0, "t_max_predict_ms": 1}).json()
    assert got["content"] == "" and got["tokens_predicted"] == 0 and got["stop"] is True
    job = engine.jobs[-1]
    assert job.max_new_tokens == 0 and job.deadline is None  # a time budget is for generation only
    got = httpx.post(url + "/infill", json={"input_prefix": "", "n_predict": -1}).json()
    assert engine.jobs[-1].max_new_tokens == 256 and got["tokens_predicted"] == 256  # -1: the server's limit
    httpx.post(url + "/infill", json={"n_predict": 100000})
    assert engine.jobs[-1].max_new_tokens == 256  # clamped, as llama.cpp does


def test_infill_n_indent(open_server, tokenizer):
    url, engine, _ = open_server
    got = httpx.post(url + "/infill", json={"input_prefix": "    ", "n_predict": 30, "n_indent": 4}).json()
    assert got["content"] == "hello world\n" and got["stop_type"] == "limit"
    assert engine.jobs[-1].cancelled.is_set()  # the cut frees the slot
    r = httpx.post(url + "/infill", json={"input_prefix": "    ", "n_predict": 30, "n_indent": 4, "stream": True})
    *deltas, final = [json.loads(d) for d in events(r)]
    assert "".join(d["content"] for d in deltas) == "hello world\n"
    assert all(d["stop"] is False for d in deltas) and final["stop"] is True and final["content"] == ""
    got = httpx.post(url + "/infill", json={"n_predict": 30, "n_indent": 0}).json()
    assert got["content"] == reply(tokenizer, 30)


def test_indent_cut_rules():
    from ponder.server.service import indent_cut

    def cut(text: str, n: int) -> str | None:
        at = indent_cut(text, n)
        return None if at is None else text[:at]

    assert cut("x\n    y\n  z\n", 4) == "x\n    y\n  "  # llama.cpp keeps the newline and the short indentation
    assert cut("unindented first line\n\n  \n    y\nz", 4) == "unindented first line\n\n  \n    y\n"  # blank lines don't end it
    assert cut("a\n\tb\n\t\tc", 1) is None
    assert cut("x\n  z", 0) is None  # 0: off
    text = "x\n    y\n  z\n"  # the cut never moves as more text arrives
    assert all(indent_cut(text[:k], 4) in (None, 10) for k in range(len(text) + 1))


def test_infill_stop_words_and_response_fields(open_server):
    url, _, _ = open_server
    got = httpx.post(url + "/infill", json={"n_predict": 30, "stop": ["world"]}).json()
    assert (got["content"], got["stop_type"], got["stopping_word"]) == ("hello ", "word", "world")
    fields = ["content", "timings/prompt_n", "timings/predicted_n", "tokens_cached", "truncated", "no/such", "ponder/session_id"]
    got = httpx.post(url + "/infill", json={"n_predict": 3, "response_fields": fields}).json()
    assert set(got) == {"content", "timings/prompt_n", "timings/predicted_n", "tokens_cached", "truncated", "ponder/session_id"}
    assert got["timings/predicted_n"] == 3


def test_infill_time_budget(open_server):
    url, engine, _ = open_server
    engine.runner.delay_s = 0.02
    start = time.monotonic()
    got = httpx.post(url + "/infill", json={"n_predict": 200, "t_max_predict_ms": 150}).json()
    assert time.monotonic() - start < 2
    assert got["stop_type"] == "limit" and 0 < got["tokens_predicted"] < 200


def test_infill_return_tokens(open_server, tokenizer):
    url, _, _ = open_server
    got = httpx.post(url + "/infill", json={"n_predict": 4, "return_tokens": True}).json()
    assert tokenizer.decode(got["tokens"]) == got["content"]


# --- Errors: always a 4xx that names the problem, never a 5xx.


@pytest.mark.parametrize(
    "path, body, words",
    [
        ("/v1/completions", {"prompt": "x", "frobnicate": 1}, ["frobnicate", "unknown field"]),
        ("/infill", {"input_prefix": "x", "n_predicts": 3}, ["n_predicts"]),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True, "x": 1}}, ["stream_options.x"]),
        ("/v1/completions", {"prompt": 5}, ["prompt"]),
        ("/v1/completions", {"prompt": [1, 2, 3]}, ["prompt", "token-id"]),
        ("/v1/completions", {"prompt": ["a", "b"]}, ["prompt", "one prompt"]),
        ("/v1/completions", {"prompt": "x", "n": 2}, ["n:"]),
        ("/v1/completions", {"prompt": "x", "max_tokens": "16"}, ["max_tokens", "integer"]),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}, ["max_tokens", "256"]),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, ["max_tokens"]),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, ["temperature"]),
        ("/v1/completions", {"prompt": "x", "temperature": 1e308 * 10}, ["temperature"]),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, ["top_p"]),
        ("/v1/completions", {"prompt": "x", "stop": 7}, ["stop"]),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, ["stop"]),
        ("/v1/completions", {"prompt": "x", "seed": 2**64}, ["seed"]),
        ("/v1/completions", {"prompt": "x", "top_k": 2**40}, ["top_k"]),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, ["stream"]),
        ("/infill", {"input_extra": [{"filename": "a.py"}]}, ["input_extra.0.text"]),
        ("/infill", {"input_extra": "nope"}, ["input_extra"]),
        ("/infill", {"input_prefix": 3}, ["input_prefix"]),
        ("/infill", {"t_max_predict_ms": 10**400}, ["t_max_predict_ms"]),
        ("/infill", {"input_prefix": "x " * 20000}, ["input_prefix", "16384"]),
        ("/infill", [1, 2], ["JSON object"]),
        ("/v1/completions", {"prompt": "x", "update_rate": "0.5"}, ["update_rate", "valid number"]),
        ("/v1/completions", {"prompt": "x", "update_rate": 1.5}, ["update_rate", "[0, 1]", "1.5"]),
        ("/v1/completions", {"prompt": "x", "update_rate": float("nan")}, ["update_rate", "[0, 1]", "nan"]),
        ("/infill", {"update_rate": -0.25}, ["update_rate", "[0, 1]"]),
        ("/infill", {"update_rate": 0.5}, ["update_rate", "schedule 'learned' reads no budget"]),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, ["presence_penalty", "[-2, 2]", "2.5"]),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, ["frequency_penalty", "[-2, 2]"]),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, ["repetition_penalty", "positive"]),
        ("/v1/completions", {"prompt": "x", "min_p": 1.5}, ["min_p", "[0, 1]"]),
        ("/infill", {"repeat_penalty": -1.1}, ["repeat_penalty", "positive"]),
        ("/infill", {"repeat_last_n": -2}, ["repeat_last_n", ">= -1"]),
        ("/infill", {"min_p": -0.05}, ["min_p", "[0, 1]"]),
        ("/infill", {"presence_penalty": "high"}, ["presence_penalty"]),
        ("/infill", {"samplers": 3}, ["samplers"]),
    ],
)
def test_bad_requests_are_400_naming_the_field(open_server, path, body, words):
    url, engine, _ = open_server
    r = httpx.post(url + path, content=json.dumps(body), headers=JSON_TYPE)
    error = assert_error(r, 400, *words)
    assert error["type"] == "invalid_request_error"
    assert not engine.jobs


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"prompt": "\xff\xfe"}', ["UTF-8", "0xff"]),
        (b'{"prompt": "x",', ["JSON"]),
        (b"", ["JSON"]),
        (b"[" * 5000, ["JSON"]),
        (b'{"prompt": NaN, }', ["JSON"]),
    ],
)
def test_undecodable_bodies_are_400(open_server, content, words):
    url, _, _ = open_server
    for path in ("/v1/completions", "/infill"):
        assert_error(httpx.post(url + path, content=content, headers=JSON_TYPE), 400, *words)


def test_oversized_body_is_413_naming_the_limit(open_server):
    url, _, _ = open_server
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    assert_error(httpx.post(url + "/v1/completions", content=big, headers=JSON_TYPE), 413, str(MAX_BODY))

    def chunked():  # no Content-Length: the bytes actually read are counted
        for _ in range(4):
            yield big[: MAX_BODY // 2]

    assert_error(httpx.post(url + "/infill", content=chunked(), headers=JSON_TYPE), 413, str(MAX_BODY))


def test_queue_full_is_429_and_warming_up_is_503(open_server):
    url, engine, _ = open_server
    with full_queue(engine):
        assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 429, "queue")
        assert_error(httpx.post(url + "/infill", json={"input_prefix": "x", "stream": True}), 429)
    assert not engine.jobs  # refused, never queued
    engine.ready = False
    r = httpx.get(url + "/health")
    assert (r.status_code, r.json()) == (503, {"status": "loading"})
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 503, "warming up")
    engine.ready = True
    r = httpx.get(url + "/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_unknown_route_and_method_are_json_errors(open_server):
    url, _, _ = open_server
    assert_error(httpx.get(url + "/v2/nothing"), 404)
    assert_error(httpx.get(url + "/v1/completions"), 405)


@pytest.fixture(scope="module")
def budget_server(tokenizer):
    """(url, engine) of a server whose schedule reads a budget: learned_budget at rate 0.5."""
    metrics = ServerMetrics.create()
    engine = RecordingEngine(tokenizer.encode(REPLY), metrics=metrics, schedule=Schedule("learned_budget", rate=0.5))
    server = Server(build_app(CompletionService(engine, tokenizer), engine, metrics))
    yield server.url, engine
    server.stop()
    engine.stop(drain_s=1)


def metric_values(url: str) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}``."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines() if line and line[0] != "#"}


def test_update_rate_sets_the_sessions_budget_and_metrics_report_the_realised_rate(budget_server):
    url, engine = budget_server
    engine.fresh()
    prompt = "def f(x):\n    return x\n" * 30
    answers = [
        httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 3, "session_id": "a", "update_rate": 0.25}),
        httpx.post(url + "/infill", json={"input_prefix": prompt, "n_predict": 3, "session_id": "b", "update_rate": 0.75}),
        httpx.post(url + "/v1/completions", json={"prompt": prompt + "y", "max_tokens": 3, "session_id": "a"}),
    ]
    ponder = [r.json()["ponder"] for r in answers]
    assert [job.update_rate for job in engine.jobs] == [0.25, 0.75, None]
    assert engine.sessions.get("", "a").doc.target == 0.25 and engine.sessions.get("", "b").doc.target == 0.75
    assert ponder[2]["cached_tokens"] > 0  # no rate: the session keeps its last one and its state
    for p, rate in zip(ponder[:2], (0.25, 0.75)):  # a fresh document's chunks under the fake runner's budget rule
        closed = p["chunks_updated"] + p["chunks_skipped"]
        assert closed > 30 and p["chunks_updated"] == sum(budget_updates(k, rate) for k in range(closed)) == math.floor(closed * rate)
    values = metric_values(url)
    updated, skipped = (values[f'ponder_chunks_total{{action="{a}",schedule="learned_budget"}}'] for a in ("updated", "skipped"))
    assert (updated, skipped) == (sum(p["chunks_updated"] for p in ponder), sum(p["chunks_skipped"] for p in ponder))
    assert values['ponder_target_update_rate_count{schedule="learned_budget"}'] == 3
    assert values['ponder_target_update_rate_sum{schedule="learned_budget"}'] == 0.25 + 0.75 + 0.25
    assert values['ponder_target_update_rate_bucket{le="0.25",schedule="learned_budget"}'] == 2


def test_metrics_record_outcomes_and_latency(open_server):
    url, engine, _ = open_server
    httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    httpx.post(url + "/v1/completions", json={"prompt": "x", "bogus": 1})
    with full_queue(engine):
        httpx.post(url + "/infill", json={})
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines() if line and line[0] != "#"}
    assert values['ponder_requests_total{endpoint="completions",outcome="ok"}'] >= 1
    assert values['ponder_requests_total{endpoint="completions",outcome="client_error"}'] >= 1
    assert values['ponder_requests_total{endpoint="infill",outcome="rejected"}'] >= 1
    assert values["ponder_time_to_first_token_seconds_count"] >= 1 and values["ponder_request_latency_seconds_count"] >= 1


# --- Disconnects cancel the job.


def wait_for(predicate, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize(
    "path, endpoint, body",
    [("/v1/completions", "completions", {"prompt": "x", "max_tokens": 200}), ("/infill", "infill", {"n_predict": 200})],
)
def test_client_disconnect_mid_stream_cancels_the_job(open_server, path, endpoint, body):
    url, engine, metrics = open_server
    engine.runner.delay_s = 0.05
    with httpx.stream("POST", url + path, json={**body, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    assert wait_for(lambda: engine.jobs and engine.jobs[-1].cancelled.is_set())
    assert wait_for(lambda: metrics.requests.labels(endpoint, "cancelled")._value.get() >= 1)


def test_event_stream_closes_its_source_when_a_send_fails():
    """A disconnect noticed only when writing (ASGI >= 2.4, where Starlette stops listening) still closes the iterator."""
    import asyncio

    from ponder.server.http.streaming import EventStream

    closed = asyncio.Event()

    async def source():
        try:
            for i in range(100):
                yield b"data: %d\n\n" % i
        finally:
            closed.set()

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.body":
            raise OSError("connection lost")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}
    asyncio.run(EventStream(source())(scope, receive, send))
    assert closed.is_set()


def test_client_disconnect_while_waiting_for_a_json_answer_cancels_the_job(open_server):
    url, engine, _ = open_server
    engine.runner.delay_s = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 200}, timeout=0.3)
    assert wait_for(lambda: engine.jobs and engine.jobs[-1].cancelled.is_set())


def test_a_client_gone_while_sending_its_body_is_a_cancellation(open_server, caplog):
    """An editor that supersedes a request mid-upload: counted as cancelled, no error, no traceback."""
    url, engine, metrics = open_server
    sample = lambda outcome: metrics.registry.get_sample_value(
        "ponder_requests_total", {"endpoint": "completions", "outcome": outcome}) or 0
    before = {o: sample(o) for o in ("cancelled", "error")}
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"x\"")
    assert wait_for(lambda: sample("cancelled") == before["cancelled"] + 1)
    assert sample("error") == before["error"] and "failed" not in caplog.text


def test_a_stream_in_flight_completes_when_the_server_shuts_down(tokenizer):
    """Graceful shutdown is not a disconnect: the stream runs to ``[DONE]``."""
    engine = RecordingEngine(tokenizer.encode(REPLY), delay_s=0.01)
    server = Server(build_app(CompletionService(engine, tokenizer), engine, ServerMetrics.create()))
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 40, "stream": True}) as r:
        lines = r.iter_lines()
        data = [next(lines)]
        server.server.should_exit = True  # what SIGTERM does
        data += [line for line in lines if line]
    server.stop()
    engine.stop(drain_s=1)
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reply(tokenizer, 40)


# --- Auth.


def test_auth(keyed_server, tokenizer):
    url, engine = keyed_server
    body = {"prompt": "x", "max_tokens": 2}
    error = assert_error(httpx.post(url + "/v1/completions", json=body), 401, "Authorization: Bearer")
    assert error["type"] == "authentication_error"
    assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.post(url + "/infill", json={}, headers={"Authorization": KEY}), 401)  # no scheme
    assert_error(httpx.get(url + "/v1/models"), 401)
    assert_error(httpx.post(url + "/v1/sessions/s/reset"), 401)
    assert_error(httpx.get(url + "/ui", params={"session_id": "s"}), 401)
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reply(tokenizer, 2)
    assert engine.jobs[-1].api_key == KEY
    httpx.post(url + "/v1/completions", json={**body, "session_id": "s"}, headers={"Authorization": f"Bearer {KEY}"})
    assert engine.committed_tokens(KEY, "s") is not None
    httpx.post(url + "/v1/sessions/s/reset", headers={"Authorization": f"Bearer {KEY}"})
    assert engine.committed_tokens(KEY, "s") is None
    for public in ("/health", "/metrics", "/openapi.json"):
        assert httpx.get(url + public).status_code == 200


# --- OpenAPI.


def test_openapi_document(open_server):
    url, _, _ = open_server
    doc = httpx.get(url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/v1/completions", "/infill", "/v1/models", "/v1/sessions/{session_id}/reset", "/ui", "/health", "/metrics",
        "/openapi.json",
    }
    schemas = doc["components"]["schemas"]
    completions = doc["paths"]["/v1/completions"]["post"]
    assert completions["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionBody"}
    assert "`logprobs`" in completions["description"] and "`id_slot`" in doc["paths"]["/infill"]["post"]["description"]
    assert schemas["InfillBody"]["properties"]["cache_prompt"]["x-ponder"] == "ignored"
    assert schemas["CompletionBody"]["additionalProperties"] is False
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


# --- Property: no body a client can send makes the server answer 5xx.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def bodies(model) -> st.SearchStrategy:
    """Mostly the endpoint's own fields with plausible or wild values; sometimes unknown keys or no object at all."""
    plausible = st.text(max_size=12) | st.integers(-2, 40) | st.floats(0, 2) | st.booleans()
    plausible |= st.lists(st.text(max_size=4), max_size=2)
    known = st.dictionaries(st.sampled_from(sorted(model.model_fields)), plausible | json_values, max_size=6)
    return st.one_of(known, known, known, st.dictionaries(st.text(max_size=8), json_values, max_size=3), json_values)


@pytest.mark.parametrize("path, model", [("/v1/completions", CompletionBody), ("/infill", InfillBody)])
def test_random_bodies_never_get_a_5xx(open_server, path, model):
    url, _, _ = open_server

    with httpx.Client(base_url=url, timeout=10) as client:

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(bodies(model))
        def check(body):
            r = client.post(path, content=json.dumps(body), headers=JSON_TYPE)
            assert r.status_code < 500, (body, r.text)
            assert r.status_code in (200, 400), (body, r.text)

        check()


# --- Sampling controls (docs/design.md, "Sampling").


def test_sampling_controls_reach_the_job_with_each_apis_definition(open_server):
    url, engine, _ = open_server
    controls = {"temperature": 0.5, "min_p": 0.125, "presence_penalty": 0.5, "frequency_penalty": -0.25}
    for body in ({}, {**controls, "repetition_penalty": 1.25}):
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, **body}).status_code == 200
    defaults, openai = (job.sampling for job in engine.jobs[-2:])
    # OpenAI: presence and frequency count this completion's tokens; vLLM's repetition penalty the whole context.
    assert defaults == Sampling(repeat_last_n=-1, penalty_scope="generated")
    assert openai == Sampling(temperature=0.5, min_p=0.125, repeat_penalty=1.25, repeat_last_n=-1, presence_penalty=0.5,
                              frequency_penalty=-0.25, penalty_scope="generated")
    llama = {**controls, "repeat_penalty": 1.25, "repeat_last_n": 16, "top_k": 7, "top_p": 0.75}
    for body in ({}, llama, {**llama, "samplers": ["top_k", "infill"]}, {**llama, "samplers": "epx"}):
        assert httpx.post(url + "/infill", json={"n_predict": 1, **body}).status_code == 200
    defaults, chain, listed, letters = (job.sampling for job in engine.jobs[-4:])
    # llama.cpp: the last repeat_last_n tokens for every penalty, temperature after the filters.
    assert defaults == Sampling(temperature_last=True)
    assert chain == Sampling(temperature=0.5, top_k=7, top_p=0.75, min_p=0.125, repeat_penalty=1.25, repeat_last_n=16,
                             presence_penalty=0.5, frequency_penalty=-0.25, temperature_last=True)
    # A sampler left out of `samplers` is off, as in llama.cpp's chain.
    assert listed == dataclasses.replace(chain, top_p=1.0, min_p=0.0, repeat_last_n=0)
    assert letters == dataclasses.replace(chain, top_k=0, min_p=0.0)

