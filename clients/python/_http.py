"""The HTTP transport: ponder's OpenAI-compatible ``/v1/completions``, session reset and health, over httpx.

The wire format (bodies, answers, server-sent events, errors) is read and
written by plain functions that both transports use; ``HttpTransport`` and
``AsyncHttpTransport`` only move bytes. A completion is
``POST /v1/completions`` (``suffix`` makes it fill-in-the-middle;
``max_tokens: 0`` is an ingestion); ponder's own figures come in the
answer's ``ponder`` object. A stream asks for ``stream_options.include_usage``
so its end carries the token counts too. The OpenAI answer has no token
ids, so deltas and results over HTTP carry none.

The timeout is httpx's per-operation timeout set to the time left, and a
stream also checks the deadline between events, so a stream that trickles
in cannot outlive it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import httpx

from ponder.client._request import Deadline, Request
from ponder.client.results import (
    AuthenticationError,
    Completion,
    Delta,
    Health,
    Ingestion,
    InvalidRequest,
    PonderError,
    ServerBusy,
    ServerUnavailable,
    Usage,
)

CONNECT_TIMEOUT_S = 10.0


def completion_body(request: Request, stream: bool = False) -> dict:
    body = {
        "prompt": request.prefix, "max_tokens": request.max_tokens, "temperature": request.temperature,
        "seed": request.seed, "stop": list(request.stop),
    }
    if request.suffix is not None:
        body["suffix"] = request.suffix
    if request.session:
        body["session_id"] = request.session
    if request.document:
        body["document_id"] = request.document
    if request.update_rate is not None:
        body["update_rate"] = request.update_rate
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _ponder_part(answer: dict, url: str) -> dict:
    if not isinstance(answer, dict) or not isinstance(answer.get("ponder"), dict):
        raise PonderError(f"the answer from {url} has no 'ponder' object: is it a ponder server? ({str(answer)[:200]})")
    return answer["ponder"]


def _figures(ponder: dict) -> dict:
    return dict(
        session_id=ponder["session_id"], chunks_updated=ponder["chunks_updated"], chunks_skipped=ponder["chunks_skipped"],
        ttt_flops=ponder["ttt_flops"], chunk_lambda=tuple(ponder["chunk_lambda"]),
    )


def _usage(usage: dict, ponder: dict) -> Usage:
    return Usage(usage["prompt_tokens"], ponder["cached_tokens"], usage["completion_tokens"])


def completion_from_answer(answer: dict, url: str) -> Completion:
    """The ``Completion`` of a non-streamed ``/v1/completions`` answer."""
    ponder = _ponder_part(answer, url)
    return Completion(
        text=answer["choices"][0]["text"], finish_reason=ponder["finish_reason"],
        usage=_usage(answer["usage"], ponder), **_figures(ponder),
    )


def ingestion_from_answer(answer: dict, url: str) -> Ingestion:
    ponder = _ponder_part(answer, url)
    return Ingestion(usage=_usage(answer["usage"], ponder), **_figures(ponder))


def error_from_answer(status: int, body: bytes, url: str) -> PonderError:
    """The exception for an answer other than 200, with the server's message, field and status."""
    error = _error_for(status, body, url)
    error.status = str(status)
    return error


def _error_for(status: int, body: bytes, url: str) -> PonderError:
    try:
        detail = json.loads(body)["error"]
        message, field = str(detail["message"]), detail.get("param")
    except (ValueError, KeyError, TypeError):  # not ponder's error shape (a proxy, another server)
        message, field = f"HTTP {status} from {url}: {body[:200].decode(errors='replace')}", None
    if status == 401 or status == 403:
        return AuthenticationError(f"{message} (pass api_key= / --api-key, or set PONDER_API_KEY)")
    if status == 429:
        return ServerBusy(f"ponder at {url} is busy: {message}")
    if status == 503:
        return ServerUnavailable(f"ponder at {url} is not ready: {message}")
    if 400 <= status < 500:
        return InvalidRequest(message, field)
    return PonderError(f"ponder at {url} failed: {message}")


@contextlib.contextmanager
def transport_errors(url: str, deadline: Deadline):
    """httpx's exceptions as ponder's: a refused connection is ``ServerUnavailable``, a timeout ``DeadlineExceeded``."""
    try:
        yield
    except httpx.TimeoutException as err:
        if isinstance(err, httpx.ConnectTimeout):
            raise ServerUnavailable(f"cannot reach ponder at {url}: connecting timed out") from None
        raise deadline.exceeded() from None
    except httpx.ConnectError as err:
        raise ServerUnavailable(f"cannot reach ponder at {url}: is `ponder serve` running? ({err})") from None
    except httpx.TransportError as err:
        raise PonderError(f"the connection to ponder at {url} failed: {type(err).__name__}: {err}") from None


def _timeout(deadline: Deadline) -> httpx.Timeout:
    left = deadline.remaining()
    return httpx.Timeout(left, connect=min(left, CONNECT_TIMEOUT_S) if left is not None else CONNECT_TIMEOUT_S)


class EventFolder:
    """Folds ``/v1/completions`` server-sent event lines into ``Delta``s and one final ``Completion``."""

    def __init__(self, url: str, deadline: Deadline):
        self.url, self.deadline = url, deadline
        self.text, self.ponder, self.usage, self.done = [], None, None, False

    def feed(self, line: str) -> list[Delta | Completion]:
        self.deadline.remaining()  # a stream that trickles in still ends at the deadline
        if not line.startswith("data: "):
            return []
        data = line[len("data: "):]
        if data == "[DONE]":
            return [self._end()]
        event = json.loads(data)
        if "error" in event:  # a failure after the answer started
            raise error_from_answer(event["error"].get("code", 500), data.encode(), self.url)
        if not event["choices"]:
            self.usage = event["usage"]
            return []
        choice = event["choices"][0]
        if choice["finish_reason"] is not None:
            self.ponder = _ponder_part(event, self.url)
            return []
        self.text.append(choice["text"])
        ponder = event.get("ponder", {})
        return [Delta(choice["text"], (), tuple(ponder.get("chunk_lambda", ())), ponder.get("tokens", 0))]

    def _end(self) -> Completion:
        if self.ponder is None or self.usage is None:
            raise PonderError(f"the stream from {self.url} ended without its final event and usage")
        self.done = True
        ponder = self.ponder
        return Completion(
            text="".join(self.text), finish_reason=ponder["finish_reason"], usage=_usage(self.usage, ponder), **_figures(ponder)
        )

    def check_ended(self) -> None:
        if not self.done:
            raise PonderError(f"the stream from {self.url} ended before `data: [DONE]`: the server went away")


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _route(session: str | None) -> dict:
    """The X-Session-Id header, which a router in front of several replicas hashes on (deploy/nginx.conf)."""
    return {"X-Session-Id": quote(session, safe="/")} if session else {}


def _reset_path(session: str) -> str:
    return f"/v1/sessions/{quote(session, safe='')}/reset"


def _health(response: httpx.Response, url: str) -> Health:
    if response.status_code in (200, 503):
        try:
            return Health(response.json()["status"])
        except (ValueError, KeyError):
            pass
    raise error_from_answer(response.status_code, response.content, url)


def _ok(response: httpx.Response, url: str) -> dict:
    if response.status_code != 200:
        raise error_from_answer(response.status_code, response.content, url)
    return response.json()


class HttpTransport:
    def __init__(self, url: str, api_key: str | None):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=_headers(api_key))

    def _post(self, path: str, body: dict | None, deadline: Deadline, headers: dict | None = None) -> dict:
        with transport_errors(self.url, deadline):
            return _ok(self.http.post(path, json=body, headers=headers, timeout=_timeout(deadline)), self.url)

    def complete(self, request: Request, deadline: Deadline) -> Completion:
        return completion_from_answer(self._post("/v1/completions", completion_body(request), deadline, _route(request.session)), self.url)

    def stream(self, request: Request, deadline: Deadline) -> Iterator[Delta | Completion]:
        folder = EventFolder(self.url, deadline)
        body = completion_body(request, stream=True)
        with transport_errors(self.url, deadline):
            with self.http.stream("POST", "/v1/completions", json=body, headers=_route(request.session), timeout=_timeout(deadline)) as response:
                if response.status_code != 200:
                    raise error_from_answer(response.status_code, response.read(), self.url)
                for line in response.iter_lines():
                    yield from folder.feed(line)
        folder.check_ended()

    def ingest(self, request: Request, deadline: Deadline) -> Ingestion:
        return ingestion_from_answer(self._post("/v1/completions", completion_body(request), deadline, _route(request.session)), self.url)

    def reset(self, session: str, deadline: Deadline) -> bool:
        return self._post(_reset_path(session), None, deadline, _route(session))["existed"]

    def health(self, deadline: Deadline) -> Health:
        with transport_errors(self.url, deadline):
            return _health(self.http.get("/health", timeout=_timeout(deadline)), self.url)

    def close(self) -> None:
        self.http.close()


class AsyncHttpTransport:
    def __init__(self, url: str, api_key: str | None):
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key))

    async def _post(self, path: str, body: dict | None, deadline: Deadline, headers: dict | None = None) -> dict:
        with transport_errors(self.url, deadline):
            return _ok(await self.http.post(path, json=body, headers=headers, timeout=_timeout(deadline)), self.url)

    async def complete(self, request: Request, deadline: Deadline) -> Completion:
        return completion_from_answer(await self._post("/v1/completions", completion_body(request), deadline, _route(request.session)), self.url)

    async def stream(self, request: Request, deadline: Deadline) -> AsyncIterator[Delta | Completion]:
        folder = EventFolder(self.url, deadline)
        body = completion_body(request, stream=True)
        with transport_errors(self.url, deadline):
            async with self.http.stream("POST", "/v1/completions", json=body, headers=_route(request.session), timeout=_timeout(deadline)) as response:
                if response.status_code != 200:
                    raise error_from_answer(response.status_code, await response.aread(), self.url)
                async for line in response.aiter_lines():
                    for item in folder.feed(line):
                        yield item
        folder.check_ended()

    async def ingest(self, request: Request, deadline: Deadline) -> Ingestion:
        return ingestion_from_answer(await self._post("/v1/completions", completion_body(request), deadline, _route(request.session)), self.url)

    async def reset(self, session: str, deadline: Deadline) -> bool:
        return (await self._post(_reset_path(session), None, deadline, _route(session)))["existed"]

    async def health(self, deadline: Deadline) -> Health:
        with transport_errors(self.url, deadline):
            return _health(await self.http.get("/health", timeout=_timeout(deadline)), self.url)

    async def close(self) -> None:
        await self.http.aclose()
