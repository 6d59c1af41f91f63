"""``GET /ui`` as a server guards it: whose sessions it shows, when it is on, and what one page may cost.

The app runs in-process (httpx's ASGI transport) over the engine on the fake
runner; the page's model run is replaced by one that records the tokens it
is given and can be held, so that the limits are checked without a model.
The real page of a real server is tested in ``test_viewer.py``.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from fake_runner import RecordingEngine

from ponder.server.http.app import build_app
from ponder.server.http.config import HttpConfig
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionService
from ponder.server.viewer import data

KEYS = ("key-a", "key-b")


@pytest.fixture(scope="module")
def engine(bundled_tokenizer):
    engine = RecordingEngine(bundled_tokenizer.encode("hello world\n"))
    yield engine
    engine.stop(drain_s=1)


class HeldInspection:
    """Stands in for the page's model run: records the tokens of each call, and waits while held."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.started, self.go = threading.Event(), threading.Event()
        self.go.set()

    def __call__(self, model, tokenizer, tokens, schedule, source=""):
        self.calls.append(list(tokens))
        self.started.set()
        assert self.go.wait(10), "the test never let the page go on"
        return data.Inspection(source, "", schedule.kind, 4, 1.0, 0.5, len(tokens), 0, (), None, None, 0.0, 0.0)


@pytest.fixture
def inspection(monkeypatch) -> HeldInspection:
    held = HeldInspection()
    monkeypatch.setattr(data, "inspect_tokens", held)
    return held


def run(engine, tokenizer, scenario, api_keys=(), ui=False):
    """Runs ``scenario(client)`` against the app, in-process."""
    engine.fresh()
    app = build_app(CompletionService(engine, tokenizer), engine, ServerMetrics.create(), api_keys=api_keys, ui=ui)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ponder", timeout=10) as client:
            return await scenario(client)

    return asyncio.run(main())


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def make_session(client, session_id: str, key: str | None = None, prompt: str = "def f(x):\n    return x\n" * 4):
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "session_id": session_id},
                          headers=bearer(key) if key else {})
    assert r.status_code == 200, r.text


def test_without_keys_the_viewer_is_off_unless_asked_for(engine, bundled_tokenizer, inspection):
    """Issue 21: with no key, GET /ui?session_id=anonymous-N showed any local client's document."""

    async def scenario(client):
        await make_session(client, "s")
        return await client.get("/ui", params={"session_id": "s"})

    off = run(engine, bundled_tokenizer, scenario)
    assert off.status_code == 403 and "--ui" in off.json()["error"]["message"] and not inspection.calls
    on = run(engine, bundled_tokenizer, scenario, ui=True)
    assert on.status_code == 200 and on.headers["content-type"].startswith("text/html") and len(inspection.calls) == 1


def test_a_session_page_needs_the_key_that_made_it(engine, bundled_tokenizer, inspection):
    async def scenario(client):
        await make_session(client, "mine", key="key-a")
        other = await client.get("/ui", params={"session_id": "mine"}, headers=bearer("key-b"))
        none = await client.get("/ui", params={"session_id": "mine"})
        own = await client.get("/ui", params={"session_id": "mine"}, headers=bearer("key-a"))
        return other, none, own

    other, none, own = run(engine, bundled_tokenizer, scenario, api_keys=KEYS)
    assert other.status_code == 404 and other.json()["error"]["param"] == "session_id"
    assert none.status_code == 401
    assert own.status_code == 200 and len(inspection.calls) == 1


def test_one_page_at_a_time_and_a_bounded_document(engine, bundled_tokenizer, inspection):
    """Issue 21: three pages at once on a 12k-token session took ~49 s each and slowed completions 30x. A page
    while another is rendered is a 429, and a page runs the model over the first ``ui_max_tokens`` at most."""
    long_prompt = "value = compute(value, 1)\n" * 700  # ~4900 tokens

    async def scenario(client):
        await make_session(client, "long", key="key-a", prompt=long_prompt)
        inspection.go.clear()
        first = asyncio.ensure_future(client.get("/ui", params={"session_id": "long"}, headers=bearer("key-a")))
        while not inspection.started.is_set():
            await asyncio.sleep(0.01)
        try:
            second = await asyncio.wait_for(client.get("/ui", params={"session_id": "long"}, headers=bearer("key-b")), 5)
            other_key = await asyncio.wait_for(client.get("/ui", params={"session_id": "long"}, headers=bearer("key-a")), 5)
        finally:
            inspection.go.set()
        first = await first
        third = await client.get("/ui", params={"session_id": "long"}, headers=bearer("key-a"))  # free again
        return first, second, other_key, third

    first, second, again, third = run(engine, bundled_tokenizer, scenario, api_keys=KEYS)
    assert second.status_code == 404  # another key: not a question of load
    assert again.status_code == 429 and again.json()["error"]["type"] == "rate_limit_error"
    assert "one page at a time" in again.json()["error"]["message"]
    assert first.status_code == 200 and third.status_code == 200 and len(inspection.calls) == 2
    committed = engine.committed_tokens("key-a", "long")
    cap = HttpConfig.ui_max_tokens
    assert len(committed) > cap and inspection.calls[0] == committed[:cap]
    assert f"the first {cap} of its {len(committed)}" in first.text
