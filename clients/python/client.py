"""``Client`` and ``AsyncClient``: ponder's completions, sessions and health over HTTP or gRPC.

One request model (``Request``), one set of results and errors
(``ponder.client.results``), four transports (HTTP / gRPC, threaded /
asyncio) that only move it over the wire. What a call does around the
transport is written once in ``_Base``: the API key (argument, else
``$PONDER_API_KEY``), the deadline (``timeout``: one deadline for the call
and all its retries), and the retry policy (tenacity: exponential backoff
with jitter on ``ServerUnavailable`` and ``ServerBusy`` only, that is HTTP
503 / 429 or a refused connection and gRPC UNAVAILABLE /
RESOURCE_EXHAUSTED). A stream is retried only until its first item: once
text has reached the caller, a failure is raised, never replayed.

Example::

    with Client("http://127.0.0.1:8080") as ponder:      # or Client(grpc="127.0.0.1:50051")
        done = ponder.complete("def read_lines(path):\\n    ", session="a.py", max_tokens=32)
        print(done.text, done.finish_reason, done.usage.cached_tokens)
        for item in ponder.stream("import os\\n", session="b.py"):
            print(item.text, end="")                      # Deltas, then the Completion
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import tenacity

from ponder.client._request import Deadline, Request
from ponder.client.results import (
    Completion,
    Delta,
    Health,
    Ingestion,
    ServerUnavailable,
)

DEFAULT_URL = "http://127.0.0.1:8080"


def api_key_from_env() -> str | None:
    """``$PONDER_API_KEY`` (the server reads a comma-separated list there: the client sends the first)."""
    keys = [k.strip() for k in os.environ.get("PONDER_API_KEY", "").split(",") if k.strip()]
    return keys[0] if keys else None


class _Base:
    """What the sync and async clients share: configuration, requests, the retry policy."""

    def __init__(
        self,
        url: str | None = None,
        *,
        grpc: str | None = None,
        api_key: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
    ):
        if url is not None and grpc is not None:
            raise ValueError("pass url= (HTTP) or grpc= (a gRPC target such as 127.0.0.1:50051), not both")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = None if grpc is not None else (url or DEFAULT_URL)
        self.grpc_target = grpc
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s

    @property
    def address(self) -> str:
        return self.url or self.grpc_target

    def _policy(self, deadline: Deadline) -> dict:
        """tenacity's arguments: back off exponentially on an unavailable or busy server, within the deadline."""
        stop = tenacity.stop_after_attempt(self.retries + 1)
        if deadline.timeout is not None:
            stop = stop | tenacity.stop_before_delay(deadline.timeout)
        return dict(
            retry=tenacity.retry_if_exception_type(ServerUnavailable),
            stop=stop,
            wait=tenacity.wait_exponential_jitter(initial=self.backoff_s, max=self.max_backoff_s, jitter=self.backoff_s),
            reraise=True,
        )

    @staticmethod
    def _request(prefix, suffix, session, document, max_tokens, temperature, stop, seed, update_rate) -> Request:
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        return Request(prefix, suffix, session, document, max_tokens, temperature, stops, seed, update_rate)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'url' if self.url else 'grpc'}={self.address!r})"


class Client(_Base):
    """A blocking ponder client (thread-safe: httpx and grpcio channels are).

    Args:
      url: the HTTP server (default ``http://127.0.0.1:8080``).
      grpc: a gRPC target (``host:port``) to use instead of HTTP.
      api_key: the bearer token (default: ``$PONDER_API_KEY``; none: no auth).
      retries: further attempts after an unavailable or busy server (0: none).
      backoff_s / max_backoff_s: the first and the longest wait between attempts.

    Every method takes ``timeout`` (seconds, None: no deadline) and raises a
    ``PonderError``: ``ServerUnavailable`` (``ServerBusy``),
    ``AuthenticationError``, ``InvalidRequest`` (with ``.field``) or
    ``DeadlineExceeded``.
    """

    def __init__(self, url: str | None = None, **options):
        super().__init__(url, **options)
        if self.url is not None:
            from ponder.client._http import HttpTransport

            self._transport = HttpTransport(self.url, self.api_key)
        else:
            from ponder.client._grpc import GrpcTransport

            self._transport = GrpcTransport(self.grpc_target, self.api_key)

    def _call(self, method, *args, timeout: float | None):
        deadline = Deadline(timeout)
        for attempt in tenacity.Retrying(**self._policy(deadline)):
            with attempt:
                return method(*args, deadline)

    def complete(
        self,
        prefix: str,
        suffix: str | None = None,
        *,
        session: str | None = None,
        document: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: str | tuple[str, ...] = (),
        seed: int = 0,
        update_rate: float | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Completes ``prefix`` (fill-in-the-middle when ``suffix`` is given).

        Args:
          prefix: the document up to the cursor.
          suffix: the document after the cursor (None: plain completion).
          session: the document's session id (None: the server matches the
            key's sessions by shared prefix, or opens one; ``Completion.session_id`` says which).
          document: a new document id resets the session.
          max_tokens: most tokens to generate (the server caps it).
          temperature: 0 is greedy.
          stop: generation ends before the first of these.
          seed: sampling seed.
          update_rate: the session's target update rate from this request on, in [0, 1] (the share
            of chunks whose fast weights update), for a server whose schedule reads a budget
            (``--schedule learned_budget`` and the like); None: the session's last one.
          timeout: seconds for the whole call, retries included.

        Returns:
          The ``Completion``.
        """
        request = self._request(prefix, suffix, session, document, max_tokens, temperature, stop, seed, update_rate)
        return self._call(self._transport.complete, request, timeout=timeout)

    def stream(
        self,
        prefix: str,
        suffix: str | None = None,
        *,
        session: str | None = None,
        document: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: str | tuple[str, ...] = (),
        seed: int = 0,
        update_rate: float | None = None,
        timeout: float | None = None,
    ) -> Iterator[Delta | Completion]:
        """``complete``, streamed: ``Delta``s as text becomes final, then the ``Completion``.

        The request starts when iteration does; leaving the loop early cancels it on the server.
        """
        request = self._request(prefix, suffix, session, document, max_tokens, temperature, stop, seed, update_rate)
        items = self._call(_open, self._transport.stream, request, timeout=timeout)
        try:
            yield from items
        finally:
            items.close()

    def ingest(self, text: str, *, session: str | None = None, document: str | None = None,
               update_rate: float | None = None, timeout: float | None = None) -> Ingestion:
        """Updates a session with ``text`` (the document, or its start) without generating (``update_rate``: as in ``complete``)."""
        request = self._request(text, None, session, document, 0, 0.0, (), 0, update_rate)
        return self._call(self._transport.ingest, request, timeout=timeout)

    def reset(self, session: str, *, timeout: float | None = None) -> bool:
        """Forgets a session (its next request starts a fresh document); True if it existed."""
        if not session:
            raise ValueError("reset needs a session id")
        return self._call(self._transport.reset, session, timeout=timeout)

    def health(self, *, timeout: float | None = 10.0) -> Health:
        """The server's state, asked once (no retries): ``Health.ready`` once it is warm.

        Raises ``ServerUnavailable`` when nothing answers.
        """
        return self._transport.health(Deadline(timeout))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(stream, request: Request, deadline: Deadline) -> Iterator:
    """Starts ``stream`` and waits for its first item (which a refusal raises instead of);
    returns an iterator over all its items. Retrying this, not the stream, means a
    stream is never replayed once text has reached the caller."""
    items = stream(request, deadline)
    first = next(items)

    def chained():
        try:
            yield first
            yield from items
        finally:
            items.close()

    return chained()


class AsyncClient(_Base):
    """``Client`` for asyncio: the same constructor, the same methods as coroutines, ``stream`` an async iterator."""

    def __init__(self, url: str | None = None, **options):
        super().__init__(url, **options)
        if self.url is not None:
            from ponder.client._http import AsyncHttpTransport

            self._transport = AsyncHttpTransport(self.url, self.api_key)
        else:
            from ponder.client._grpc import AsyncGrpcTransport

            self._transport = AsyncGrpcTransport(self.grpc_target, self.api_key)

    async def _call(self, method, *args, timeout: float | None):
        deadline = Deadline(timeout)
        async for attempt in tenacity.AsyncRetrying(**self._policy(deadline)):
            with attempt:
                return await method(*args, deadline)

    async def complete(
        self,
        prefix: str,
        suffix: str | None = None,
        *,
        session: str | None = None,
        document: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: str | tuple[str, ...] = (),
        seed: int = 0,
        update_rate: float | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """See ``Client.complete``."""
        request = self._request(prefix, suffix, session, document, max_tokens, temperature, stop, seed, update_rate)
        return await self._call(self._transport.complete, request, timeout=timeout)

    async def stream(
        self,
        prefix: str,
        suffix: str | None = None,
        *,
        session: str | None = None,
        document: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: str | tuple[str, ...] = (),
        seed: int = 0,
        update_rate: float | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Delta | Completion]:
        """See ``Client.stream``."""
        request = self._request(prefix, suffix, session, document, max_tokens, temperature, stop, seed, update_rate)
        items = await self._call(_aopen, self._transport.stream, request, timeout=timeout)
        try:
            async for item in items:
                yield item
        finally:
            await items.aclose()

    async def ingest(self, text: str, *, session: str | None = None, document: str | None = None,
                     update_rate: float | None = None, timeout: float | None = None) -> Ingestion:
        """See ``Client.ingest``."""
        request = self._request(text, None, session, document, 0, 0.0, (), 0, update_rate)
        return await self._call(self._transport.ingest, request, timeout=timeout)

    async def reset(self, session: str, *, timeout: float | None = None) -> bool:
        """See ``Client.reset``."""
        if not session:
            raise ValueError("reset needs a session id")
        return await self._call(self._transport.reset, session, timeout=timeout)

    async def health(self, *, timeout: float | None = 10.0) -> Health:
        """See ``Client.health``."""
        return await self._transport.health(Deadline(timeout))

    async def aclose(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def _aopen(stream, request: Request, deadline: Deadline) -> AsyncIterator:
    """``_open`` for async streams."""
    items = stream(request, deadline)
    first = await anext(items)

    async def chained():
        try:
            yield first
            async for item in items:
                yield item
        finally:
            await items.aclose()

    return chained()
