"""Running a completion for an HTTP client: the first item before the answer, disconnects, server-sent events.

The first item of a completion is awaited before the answer starts, so a
refusal (``RequestError``, ``QueueFull``, ``NotReady``) still gets a real
status code; that wait races the client's disconnect. Streams run beside a
disconnect listener and always close the service's iterator when they end,
which cancels the job: a client that goes away frees its decode slot within
one engine step, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ponder.server.http.config import HttpConfig
from ponder.server.http.errors import Body, ClientGone, read_body
from ponder.server.http.wire import ErrorAnswer, ErrorDetail, to_json
from ponder.server.metrics import RequestRecord, finish_outcome
from ponder.server.service import CompletionRequest, CompletionService, Final, TextDelta
from ponder.server.types import NotReady

log = logging.getLogger("ponder.http")

Item = TextDelta | Final


class CompletionEndpoint:
    """One completion API (``openai.py``, ``llama.py``) on ``service``.

    Its handler takes ``(request, api_key, call)``: the HTTP request, the
    caller's key ("" without auth; it scopes the session) and the request's
    metrics record; it returns the answer or raises (``app.py`` maps what).
    """

    def __init__(self, service: CompletionService, config: HttpConfig):
        self.service, self.config = service, config

    DRAIN_POLL_S = 0.25

    async def read_body(self, request: Request, model: type[Body]) -> Body:
        """The request's body as ``model``, within the server's size and time limits (``errors.read_body``).

        Raises:
          NotReady: the server began to drain while the body was still arriving (503 at once, rather
            than holding the shutdown for the rest of ``--body-timeout-s``).
        """
        reading = asyncio.ensure_future(read_body(request, model, self.config.max_body_bytes, self.config.body_timeout_s))
        try:
            while not (await asyncio.wait({reading}, timeout=self.DRAIN_POLL_S))[0]:
                if self.service.engine.draining:
                    raise NotReady("the server is shutting down and this request's body had not all arrived: send it "
                                   "again (to another replica, or once the server is back)")
            return reading.result()
        finally:
            reading.cancel()

    async def start(self, request: Request, completion: CompletionRequest, call: RequestRecord) -> AsyncIterator[Item]:
        """Starts ``completion`` and waits for its first item, so that a refusal raises before any answer starts.

        Args:
          request: the HTTP request, watched for a disconnect while waiting.
          completion: what to run.
          call: the request's metrics record (first token, outcome).

        Returns:
          The completion's items (text deltas, then one ``Final``), the first included.

        Raises:
          RequestError, QueueFull, NotReady: the service refused the completion.
          ClientGone: the client left first (the job is cancelled).
        """
        items = _recorded(self.service.stream(completion), call)
        first = await _or_disconnect(request, anext(items))
        return _chain(first, items)


async def final(request: Request, items: AsyncIterator[Item]) -> Final:
    """The completion's ``Final`` (its text whole), unless the client leaves first: then ``ClientGone``."""
    return await _or_disconnect(request, _last(items))


def event_stream(
    items: AsyncIterator[Item], call: RequestRecord, render: Callable[[Item], list[bytes]]
) -> StreamingResponse:
    """The completion as server-sent events.

    Args:
      items: the completion's items, from ``start``; closed when the stream ends, however it ends.
      call: the request's metrics record.
      render: one item to its events (``sse_event`` each); the API's framing.

    Returns:
      The streaming answer. An engine failure mid-stream, after the status line
      is gone, is reported in-band as an ``ErrorAnswer`` event.
    """
    return EventStream(_events(items, call, render))


def sse_event(data: BaseModel | dict) -> bytes:
    return b"data: " + to_json(data) + b"\n\n"


async def _recorded(stream: AsyncIterator[Item], call: RequestRecord) -> AsyncIterator[Item]:
    """The service's stream, with metrics."""
    try:
        async for item in stream:
            if isinstance(item, TextDelta) and (item.text or item.token_ids):
                call.token()
            if isinstance(item, Final):
                call.done(finish_outcome(item.finish_reason), completed=True)
            yield item
    finally:
        await stream.aclose()


async def _events(items: AsyncIterator[Item], call: RequestRecord, render) -> AsyncIterator[bytes]:
    try:
        async for item in items:
            for event in render(item):
                yield event
    except NotReady as err:  # the server shut down mid-stream: the status line is gone, say it in the stream
        call.done("rejected")
        yield sse_event(ErrorAnswer(error=ErrorDetail(message=str(err), type="unavailable_error", code=503)))
    except Exception as err:  # likewise
        log.exception("stream failed")
        call.done("error")
        detail = ErrorDetail(message=f"internal error ({type(err).__name__}: {err})", type="server_error", code=500)
        yield sse_event(ErrorAnswer(error=detail))
    finally:
        await items.aclose()
        call.done("cancelled")  # no-op unless the client left before the end


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _or_disconnect(request: Request, work: Awaitable):
    """``await work``, unless the client disconnects first: then ``work`` is cancelled and ``ClientGone`` raised."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _last(items: AsyncIterator):
    item = None
    async for item in items:
        pass
    return item


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


class EventStream(StreamingResponse):
    """Server-sent events that always close their source: the job is cancelled as soon as the client goes away.

    Starlette stops sending on a disconnect but leaves the iterator suspended;
    here a disconnect listener runs beside the sender whatever the ASGI
    version, and the iterator is closed at the end in every case.
    """

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tasks:

                async def sender():
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(sender)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
