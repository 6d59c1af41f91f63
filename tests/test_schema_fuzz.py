"""The HTTP API against its own OpenAPI document.

schemathesis (``st run``, every check, a fixed seed and example budget)
fuzzes a live server (uvicorn on a free port, with and without API keys) and
must find nothing: no 5xx, no answer off its schema, no status the document
does not list, no schema-valid body refused, no schema-violating body taken.
What a fuzzer reaches rarely is checked one by one: streamed answers event by
event, ``response_fields``, and each bound the document states, at and just
past its edge.

Behind the server, as in ``test_http.py``: the real service, tokenizer and
engine on the fake runner, so a request costs microseconds and the fuzz
stays well within a minute; the λ viewer's model run is a stand-in (its real
page is tested in ``test_viewer.py``). Against ``ponder serve`` itself:
``st run http://127.0.0.1:8080/openapi.json --checks all -n 50 --seed 1``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import schemathesis
from fake_runner import RecordingEngine
from test_http import REPLY, Server

from ponder.model.gating import Schedule
from ponder.server.http.app import build_app
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionService
from ponder.server.viewer import data

KEY = "fuzz-key"
SEED, EXAMPLES = 21, 40  # per operation; ~15 s a run on two cores


def _stand_in_inspection(model, tokenizer, tokens, schedule, source=""):
    return data.Inspection(source, "", schedule.kind, 4, 1.0, 0.5, len(tokens), 0, (), None, None, 0.0, 0.0)


@pytest.fixture(scope="module", params=["keyed", "open"])
def served(request, bundled_tokenizer):
    """``(url, headers)`` of a live server: with an API key and a budgeted schedule (which takes
    ``update_rate``), or with neither (then ``/ui`` is off)."""
    keyed = request.param == "keyed"
    keys = (KEY,) if keyed else ()
    tokenizer = bundled_tokenizer
    schedule = Schedule("learned_budget", rate=0.5) if keyed else Schedule()
    engine = RecordingEngine(tokenizer.encode(REPLY), max_new_tokens=64, schedule=schedule)
    server = Server(build_app(CompletionService(engine, tokenizer), engine, ServerMetrics.create(), api_keys=keys))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "inspect_tokens", _stand_in_inspection)
        yield server.url, ({"Authorization": f"Bearer {KEY}"} if keys else {})
    server.stop()
    engine.stop(drain_s=1)


def test_schemathesis_finds_nothing(served, tmp_path):
    url, headers = served
    command = [str(Path(sys.executable).parent / "st"), "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1", "--no-shrink",
               "--request-timeout", "30", *(f"--header={k}: {v}" for k, v in headers.items())]
    run = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "Tested: 7" in run.stdout and " passed" in run.stdout and "failure" not in run.stdout, report


@pytest.fixture(scope="module")
def document(served) -> schemathesis.BaseSchema:
    url, _ = served
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 9, "stream": True, "echo": True,
                         "stream_options": {"include_usage": True}}),
    ("/infill", {"input_prefix": "x", "n_predict": 9, "stream": True}),
    ("/infill", {"input_prefix": "x", "n_predict": 9, "stream": True, "response_fields": ["content", "timings/prompt_n"]}),
])
def test_streamed_answers_match_the_document(served, document, path, body):
    """Issue 21: the streamed schema put the payload where the SSE event (``data`` holding the payload's
    JSON) belongs, so no stream matched it."""
    _, headers = served
    case = document[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call(headers=headers)
    assert response.status_code == 200 and response.headers["content-type"][0].startswith("text/event-stream")
    case.validate_response(response, headers=headers)
    response = case.call(headers=headers)
    broken = response.content.replace(b'"index":0', b'"index":"0"', 1)  # a payload off its schema ...
    assert broken != response.content
    response.content = broken
    with pytest.raises(BaseExceptionGroup) as caught:  # ... is caught, event by event
        case.validate_response(response, headers=headers)
    assert "SSE event" in str(caught.value), caught.value


def test_infill_response_fields(served, document):
    """Issue 21: ``response_fields: []`` answered ``{}``. An empty list filters nothing, as in llama.cpp; a
    list naming nothing (a warm-up's ``[""]``) still gets ``{}``."""
    _, headers = served
    answers = {}
    for fields in ([], [""], ["content", "ponder/session_id", "no/such"]):
        case = document["/infill"]["POST"].Case(body={"n_predict": 2, "response_fields": fields}, media_type="application/json")
        response = case.call(headers=headers)
        case.validate_response(response, headers=headers)
        answers[json.dumps(fields)] = response.json()
    assert answers["[]"]["stop"] is True and answers["[]"]["content"] and "timings" in answers["[]"]
    assert answers['[""]'] == {}
    assert set(answers['["content", "ponder/session_id", "no/such"]']) == {"content", "ponder/session_id"}


def _edges(schema: dict) -> list[tuple[object, bool]]:
    """``(value, accepted)`` pairs at and just past each bound ``schema`` (one branch of a field) states."""
    number = schema.get("type") in ("number", "integer")
    step = 1 if schema.get("type") == "integer" else 0.5
    edges = []
    if number and "minimum" in schema:
        edges += [(schema["minimum"], True), (schema["minimum"] - step, False)]
    if number and "exclusiveMinimum" in schema:
        edges += [(schema["exclusiveMinimum"] + 1e-3, True), (schema["exclusiveMinimum"], False)]
    if number and "maximum" in schema:
        edges += [(schema["maximum"], True), (schema["maximum"] + step, False)]
    if schema.get("type") == "string" and "maxLength" in schema:
        edges += [("s" * schema["maxLength"], True), ("s" * (schema["maxLength"] + 1), False)]
    if schema.get("type") == "string" and schema.get("minLength") == 1:
        edges += [("", False)]
    if schema.get("type") == "array":
        text = "s" * schema.get("items", {}).get("maxLength", 1)
        if "maxItems" in schema:
            edges += [([text] * schema["maxItems"], True), ([text] * (schema["maxItems"] + 1), False)]
        if schema.get("minItems") == 1:
            edges += [([], False)]
    return edges


@pytest.mark.parametrize("path, body", [("/v1/completions", "CompletionBody"), ("/infill", "InfillBody")])
def test_each_documented_bound_is_the_servers(served, path, body):
    """A bound the document states is the server's: at it the answer is 200, past it a 400 naming the field.
    (The fuzz finds a bound the document leaves out: a schema-valid body refused.)"""
    url, headers = served
    schemas = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]
    short = "max_tokens" if body == "CompletionBody" else "n_predict"
    checked = set()
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for field, schema in schemas[body]["properties"].items():
            for branch in schema.get("anyOf", [schema]):
                for value, accepted in _edges(branch):
                    answer = client.post(path, json={short: 1, field: value})  # the field's value wins over short's
                    label = f"{path} {field}={str(value)[:20]!r}"
                    if accepted:
                        assert answer.status_code == 200, (label, answer.text)
                    else:
                        assert answer.status_code == 400, (label, answer.text)
                        error = answer.json()["error"]
                        assert error["param"] == field or field in error["message"], (label, error)
                    checked.add(field)
    expected = {"temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "stop", "session_id",
                "document_id", *(["update_rate"] if headers else [])}  # the keyed server's schedule takes a budget
    if body == "CompletionBody":
        expected |= {"top_k", "max_tokens", "n", "prompt", "repetition_penalty"}
    else:
        expected |= {"repeat_penalty", "repeat_last_n"}
    assert expected <= checked, expected - checked


def test_a_method_not_allowed_says_which_are(served):
    url, _ = served
    answer = httpx.request("TRACE", f"{url}/health")
    assert answer.status_code == 405 and answer.json()["error"]["code"] == 405
    assert {m.strip() for m in answer.headers["allow"].split(",")} == {"GET", "HEAD"}
