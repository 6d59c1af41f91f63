"""What the engine, the completion service and the front ends exchange.

The engine speaks token ids only; the service (``server/service.py``) turns
text requests into ``Job``s and token events back into text. Events leave
the engine thread through ``Job.put``; a front end reads them with
``Job.next_event`` (blocking, gRPC) or ``await Job.anext_event()`` (asyncio,
HTTP). What front ends may call on the engine is ``ServingEngine``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from typing import TYPE_CHECKING, Protocol

from ponder.model.sampling import Sampling

if TYPE_CHECKING:
    from ponder.model.gating import Schedule
    from ponder.model.ttt_lm import TTTTransformerLM
    from ponder.server.engine import EngineConfig


class RequestError(ValueError):
    """A request the server rejects: ``field`` names what is wrong, ``status`` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit (HTTP 429 / RESOURCE_EXHAUSTED)."""


class NotReady(RuntimeError):
    """The engine has not finished warming up, or is draining (HTTP 503 / UNAVAILABLE)."""


@dataclasses.dataclass
class Usage:
    """What one request cost.

    Attributes:
      prompt_tokens: tokens of the prompt (the document start token included).
      cached_tokens: prompt tokens served from the session's committed state.
      generated_tokens: tokens generated (a final end-of-document excluded).
      chunks_updated / chunks_skipped: chunks the TTT layer closed for this
        request (prefill and generation), by whether the fast weights moved.
      ttt_flops: fast-weight update FLOPs spent for this request.
      computed_tokens: prompt tokens run through the model for this request (the rest were cached;
        fewer than ``prompt_tokens - cached_tokens`` when the request ended during its prefill).
      reencoded_tokens: earlier tokens the base re-read to move its attention window (no TTT).
      context_tokens: tokens in the request's context when it ended: the prompt tokens cached or
        computed, then each generated token fed back (llama.cpp's ``tokens_cached``, its ``n_past``).
        Only the committed part outlives the request (docs/design.md, "Sessions").
      truncated: the base's attention window no longer started at the document's start (earlier
        tokens were seen by the fast weights only).
      prompt_s: from the job's start in a slot to its first token (the prompt phase; time waiting in
        the queue is not counted); a job that ended in it, to that end.
      generation_s: from the first token to the end.
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    chunks_updated: int = 0
    chunks_skipped: int = 0
    ttt_flops: float = 0.0
    computed_tokens: int = 0
    reencoded_tokens: int = 0
    context_tokens: int = 0
    truncated: bool = False
    prompt_s: float = 0.0
    generation_s: float = 0.0


@dataclasses.dataclass
class TokenEvent:
    """New tokens of a job, λ of the chunks that closed since the last event, and when the engine handed them out."""

    token_ids: list[int]
    chunk_lambda: list[float]
    at: float = dataclasses.field(default_factory=time.monotonic, compare=False)


@dataclasses.dataclass
class DoneEvent:
    """The job's last event. finish_reason: length, stop (end of document), cancelled, deadline."""

    finish_reason: str
    usage: Usage
    session_id: str


@dataclasses.dataclass
class ErrorEvent:
    error: BaseException


@dataclasses.dataclass(eq=False)
class Job:
    """One request to the engine.

    Attributes:
      api_key: the caller's key ("" without auth); sessions of one key are
        invisible to another.
      session_id: the session (None: matched by longest common token prefix
        among the key's sessions, or a new one).
      document_id: a change of document id resets the session.
      tokens: the prompt, starting with the end-of-document token; the
        first ``commit_limit`` tokens may enter the session's committed state
        (the rest, e.g. a fill-in-the-middle suffix, is computed on a scratch
        copy only). None: all of them.
      max_new_tokens: 0 ingests only.
      sampling: how tokens are picked (``ponder.model.sampling.Sampling``).
      deadline: ``time.monotonic()`` after which generation stops.
      update_rate: the session's budget from this job on: the target share of chunks whose fast
        weights update, in [0, 1], under a schedule that reads one (``server.engine.BUDGETED``).
        None: the session's last one (a new session: the schedule's ``rate``).
    """

    api_key: str
    session_id: str | None
    document_id: str | None
    tokens: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    commit_limit: int | None = None
    deadline: float | None = None
    reset: bool = False
    update_rate: float | None = None
    budget_only: bool = False  # the deadline is a time budget: reaching it ends generation as ``length``
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancel_reason: str = "client"
    _events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    _loop: asyncio.AbstractEventLoop | None = None
    _async_events: asyncio.Queue | None = None
    _ended: bool = False  # its final event (``DoneEvent`` or ``ErrorEvent``) is out
    _put_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to an asyncio loop (call before submitting)."""
        self._loop, self._async_events = loop, asyncio.Queue()

    def put(self, event) -> None:
        """Engine side: hand an event to the consumer (thread-safe).

        A job has one final event (``DoneEvent`` or ``ErrorEvent``); whatever comes after it is
        dropped, so an engine that stops can end every job without racing its own loop.
        """
        with self._put_lock:
            if self._ended:
                return
            self._ended = isinstance(event, (DoneEvent, ErrorEvent))
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
                except RuntimeError:  # the consumer's loop has closed: nobody is listening
                    pass
            else:
                self._events.put(event)

    def cancel(self, reason: str = "client") -> None:
        """Frees the job's slot at the engine's next step (thread-safe)."""
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def next_event(self, timeout: float | None = None):
        return self._events.get(timeout=timeout)

    async def anext_event(self):
        return await self._async_events.get()

    def delivered(self) -> list:
        """The events already handed over and not yet read, without waiting."""
        events = []
        try:
            while True:
                events.append(self._async_events.get_nowait() if self._loop is not None else self._events.get_nowait())
        except (asyncio.QueueEmpty, queue.Empty):
            return events


class ServingEngine(Protocol):
    """What front ends (the service, HTTP, gRPC) may use of the engine (``server.engine.Engine``).

    Attributes:
      ready: warm-up is over; ``submit`` takes jobs.
      draining: a graceful shutdown has begun; ``submit`` refuses new jobs (health reports it).
      model: the TTT model served (the λ viewer re-runs it on a session's tokens).
      config: the engine's limits and λ schedule.
    """

    ready: bool
    draining: bool
    model: TTTTransformerLM | None
    config: EngineConfig

    def submit(self, job: Job) -> None:
        """Queues ``job`` (its events arrive through ``Job``).

        Raises:
          NotReady: before warm-up ends or while draining.
          QueueFull: the waiting queue is at its limit.
          RequestError: the job cannot fit the limits.
        """

    def reset_session(self, api_key: str, session_id: str) -> bool:
        """Forgets a session. Returns True if it existed."""

    def committed_tokens(self, api_key: str, session_id: str) -> list[int] | None:
        """A copy of the session's committed tokens, or None if there is no such session."""

    def session_schedule(self, api_key: str, session_id: str) -> Schedule | None:
        """The schedule the session's committed state ran under (its budget as ``rate``), or None if there is no such session."""

    def session_count(self) -> int:
        """Sessions held in memory."""
