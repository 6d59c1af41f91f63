"""The completion service: one request model for every front end.

HTTP and gRPC parse their wire formats into a ``CompletionRequest`` and
stream what ``CompletionService.stream`` yields back out. The service owns
what the engine must not know about: text. It tokenizes the request (a
document opens with the end-of-document token; a fill-in-the-middle prompt,
snippets of other files included, is laid out by ``server/prompts.py`` so
that what repeats between an editor's requests comes first), checks the
limits, detokenizes the engine's token events (holding back incomplete
UTF-8), applies stop sequences, ``n_indent`` and llama.cpp's generation time
limit, and cancels the job when one of them ends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import re
import time
from collections.abc import AsyncIterator, Iterator

from ponder.model.detokenize import TextStream
from ponder.model.sampling import SamplingError
from ponder.model.tokenizer import Tokenizer
from ponder.server.prompts import fim_tokens
from ponder.server.sessions import check_id
from ponder.server.types import (
    DoneEvent,
    ErrorEvent,
    Job,
    NotReady,
    RequestError,
    Sampling,
    ServingEngine,
    TokenEvent,
    Usage,
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps on one request (each error names the field and the limit)."""

    max_prompt_tokens: int = 16384
    max_stop: int = 8
    max_stop_chars: int = 64


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A completion (or, with ``max_tokens == 0``, an ingestion) in text.

    Attributes:
      prompt: the document up to the cursor (the FIM prefix when ``suffix`` is given).
      suffix: the document after the cursor (None: plain completion).
      extra: ``(name, text)`` snippets of other files, context for this request only.
      max_tokens: most tokens to generate; 0 only updates the session.
      stop: generation ends before the first occurrence of any of these.
      sampling: how tokens are picked (checked here: a control out of range is a ``RequestError`` naming it).
      n_indent: llama.cpp's rule: after the first newline, a line indented by
        fewer than this many spaces/tabs ends the completion (0: off).
      session_id / document_id / update_rate: see ``server.types.Job``.
      time_budget_s: generation stops (finish reason ``length``) this long after the request arrived.
      generation_budget_s: llama.cpp's ``t_max_predict_ms``: generation stops (finish reason ``length``)
        at a newline generated more than this long after the first generated token.
      deadline_s: the request fails (finish reason ``deadline``) after this long.
      api_key: the authenticated caller ("" without auth).
      field_names: the front end's names of fields for error messages where they differ
        (e.g. ``input_prefix``, ``n_predict``, ``repetition_penalty``).
    """

    prompt: str = ""
    suffix: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    max_tokens: int = 16
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    n_indent: int = 0
    session_id: str | None = None
    document_id: str | None = None
    reset: bool = False
    update_rate: float | None = None
    time_budget_s: float | None = None
    generation_budget_s: float | None = None
    deadline_s: float | None = None
    api_key: str = ""
    field_names: tuple[tuple[str, str], ...] = ()

    def name(self, field: str) -> str:
        return dict(self.field_names).get(field, field)


@dataclasses.dataclass
class TextDelta:
    """Newly final text, the token ids it came from, and λ of chunks closed since the last delta."""

    text: str
    token_ids: list[int]
    chunk_lambda: list[float]


@dataclasses.dataclass
class Final:
    """The end of a completion.

    ``finish_reason``: ``stop`` (a stop sequence, named in ``stop_sequence``, or
    the end-of-document token), ``length`` (``max_tokens``, the time budget, or
    the ``n_indent`` rule), ``cancelled`` or ``deadline``.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    session_id: str
    chunk_lambda: list[float]
    stop_sequence: str = ""


class CompletionService:
    def __init__(self, engine: ServingEngine, tokenizer: Tokenizer, limits: Limits = Limits()):
        self.engine, self.tokenizer, self.limits = engine, tokenizer, limits

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one request may generate: the engine's (it keeps that much of the window free)."""
        return self.engine.config.max_new_tokens

    # --- Requests to jobs.

    def job(self, request: CompletionRequest) -> Job:
        """Checks ``request`` against the limits and tokenizes it.

        Raises:
          RequestError: naming the offending field and the limit.
        """
        limits, tok = self.limits, self.tokenizer
        if not 0 <= request.max_tokens <= self.max_new_tokens:
            raise RequestError(
                request.name("max_tokens"), f"must be between 0 and {self.max_new_tokens}, got {request.max_tokens}"
            )
        try:
            request.sampling.check()
        except SamplingError as error:
            raise RequestError(request.name(error.field), error.message) from None
        if request.n_indent < 0:
            raise RequestError("n_indent", f"must be >= 0, got {request.n_indent}")
        if len(request.stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in request.stop):
            raise RequestError("stop", f"at most {limits.max_stop} sequences of at most {limits.max_stop_chars} characters")
        if any(not s for s in request.stop):
            raise RequestError("stop", "stop sequences must be non-empty strings")
        check_id("session_id", request.session_id)
        check_id("document_id", request.document_id)
        if request.suffix is None and not request.extra:
            self._refuse_unfittable(request)
            tokens, commit_limit = tok.encode_document(request.prompt), None
        else:
            tokens, commit_limit = fim_tokens(tok, request.prompt, request.suffix or "", request.extra)
        if len(tokens) > limits.max_prompt_tokens:
            raise RequestError(
                request.name("prompt"),
                f"{len(tokens)} tokens exceeds the limit of {limits.max_prompt_tokens} tokens",
                status=400,
            )
        now = time.monotonic()
        deadline = None if request.deadline_s is None else now + request.deadline_s
        if request.time_budget_s is not None:
            budget = now + request.time_budget_s
            deadline = budget if deadline is None else min(deadline, budget)
        job = Job(
            api_key=request.api_key,
            session_id=request.session_id,
            document_id=request.document_id,
            tokens=tokens,
            max_new_tokens=request.max_tokens,
            sampling=request.sampling,
            commit_limit=commit_limit,
            deadline=deadline,
            reset=request.reset,
            update_rate=request.update_rate,
            budget_only=request.time_budget_s is not None
            and (request.deadline_s is None or request.time_budget_s <= request.deadline_s),
        )
        return job

    def _refuse_unfittable(self, request: CompletionRequest) -> None:
        """Refuses, before tokenizing it, a plain prompt too long to fit ``max_prompt_tokens``: a token
        holds at most ``Tokenizer.max_token_bytes`` characters, so more characters than that many times
        the limit (less the end-of-document token) are more tokens than the limit."""
        limit, width = self.limits.max_prompt_tokens, self.tokenizer.max_token_bytes
        if len(request.prompt) > (limit - 1) * width:
            raise RequestError(request.name("prompt"), f"{len(request.prompt)} characters cannot fit the limit of {limit} "
                                                       f"tokens (a token holds at most {width} characters)")

    # --- Token events to text.

    async def stream(self, request: CompletionRequest) -> AsyncIterator[TextDelta | Final]:
        """Text deltas as they become final, then one ``Final``.

        Raises ``RequestError`` (bad request), ``QueueFull`` or ``NotReady``
        before the first item. Closing the iterator early (a client that went
        away) cancels the job.
        """
        job = await asyncio.to_thread(self.job, request)  # tokenizing a long prompt takes a while: not on the event loop
        job.attach(asyncio.get_running_loop())
        self.engine.submit(job)
        folder = _TextFolder(self.tokenizer, request, job)
        try:
            while True:
                for item in folder.feed_all([await job.anext_event(), *job.delivered()]):
                    yield item
                    if isinstance(item, Final):
                        return
        finally:
            job.cancel("client")

    def stream_sync(self, request: CompletionRequest, is_active=lambda: True) -> Iterator[TextDelta | Final]:
        """``stream`` for threaded callers (gRPC): blocks on the engine's events.

        ``is_active`` is polled while waiting; when it turns False (the client
        went away) the job is cancelled.
        """
        job = self.job(request)
        self.engine.submit(job)
        folder = _TextFolder(self.tokenizer, request, job)
        try:
            while True:
                try:
                    event = job.next_event(timeout=0.05)
                except queue.Empty:
                    if not is_active():
                        job.cancel("client")
                    continue
                for item in folder.feed_all([event, *job.delivered()]):
                    yield item
                    if isinstance(item, Final):
                        return
        finally:
            job.cancel("client")

    async def complete(self, request: CompletionRequest) -> Final:
        """The whole completion at once."""
        async for item in self.stream(request):
            if isinstance(item, Final):
                return item
        raise RuntimeError("the engine ended a job without a final event")

    def reset(self, api_key: str, session_id: str) -> bool:
        """Drops a session's state (the next request starts a fresh document). True if it existed."""
        check_id("session_id", session_id)
        return self.engine.reset_session(api_key, session_id)


class _TextFolder:
    """Folds a job's engine events into text deltas and one ``Final``.

    Holds back an incomplete UTF-8 sequence and any tail that could still grow
    into a stop sequence; where a stop sequence or the ``n_indent`` rule ends
    the completion it cuts the text and cancels the job (the slot is free at
    the engine's next step).
    """

    def __init__(self, tokenizer: Tokenizer, request: CompletionRequest, job: Job):
        self.tokenizer, self.request, self.job = tokenizer, request, job
        self.stream = TextStream(tokenizer, request.stop)
        self.emitted, self.ids, self.lam = 0, [], []
        self.pending_ids, self.pending_lam = [], []
        self.ended: str | None = None  # the finish reason of a cut made here
        self.stop_sequence = ""
        self.first_token_at: float | None = None  # when the engine handed out the first generated token

    def _delta(self, upto: int) -> list[TextDelta]:
        if upto <= self.emitted and not self.pending_ids and not self.pending_lam:
            return []
        delta = TextDelta(self.stream.text[self.emitted:max(upto, self.emitted)], self.pending_ids, self.pending_lam)
        self.emitted, self.pending_ids, self.pending_lam = max(upto, self.emitted), [], []
        return [delta]

    def _cut(self, final: bool) -> int:
        """Applies the stop sequences and ``n_indent`` to the text; returns how much is safe to emit."""
        stream = self.stream
        stop_at, safe = stream.stop_cut()
        indent_at = indent_cut(stream.text, self.request.n_indent)
        if indent_at is not None and (stop_at is None or indent_at < stop_at):
            stream.text, self.ended = stream.text[:indent_at], "length"
        elif stop_at is not None:
            self.stop_sequence = stream.stop_at(stop_at)
            stream.text, self.ended = stream.text[:stop_at], "stop"
        else:
            return len(stream.text) if final else safe
        if not final:
            self.job.cancel("stop")
        return len(stream.text)

    def _out_of_time(self, event: TokenEvent, out: list[TextDelta]) -> bool:
        """llama.cpp's ``t_max_predict_ms`` (its server's ``process_token``): text going out for this token holds a
        newline, and the token came more than the budget after the first generated token."""
        budget = self.request.generation_budget_s
        return (budget is not None and any("\n" in delta.text for delta in out)
                and event.at - self.first_token_at > budget)

    def feed_all(self, events: list) -> Iterator[TextDelta | Final]:
        """``feed`` for several events at once, their deltas joined into one: a stream whose reader
        fell behind the engine catches up in one message instead of one per token. The text before
        an engine error still goes out before the error is raised."""
        pending: TextDelta | None = None
        for event in events:
            try:
                items = self.feed(event)
            except Exception:
                if pending is not None:
                    yield pending
                raise
            for item in items:
                if isinstance(item, TextDelta):
                    pending = item if pending is None else TextDelta(
                        pending.text + item.text, pending.token_ids + item.token_ids, pending.chunk_lambda + item.chunk_lambda)
                    continue
                if pending is not None:
                    yield pending
                    pending = None
                yield item
        if pending is not None:
            yield pending

    def feed(self, event) -> list[TextDelta | Final]:
        if isinstance(event, ErrorEvent):
            raise event.error
        if isinstance(event, TokenEvent):
            self.lam += event.chunk_lambda
            self.pending_lam += event.chunk_lambda
            if self.ended:  # tokens the engine made before it saw the cancel
                return self._delta(self.emitted)
            if self.first_token_at is None and event.token_ids:
                self.first_token_at = event.at
            new = [t for t in event.token_ids if t != self.tokenizer.eot_id]
            self.ids += new
            self.pending_ids += new
            self.stream.add(new)
            out = self._delta(self._cut(final=False))
            if not self.ended and self._out_of_time(event, out):
                self.ended = "length"
                self.job.cancel("stop")
            return out
        assert isinstance(event, DoneEvent), event
        reason = event.finish_reason
        if reason == "cancelled" and self.job.cancel_reason == "shutdown":
            raise NotReady("the server shut down before this request finished (its drain time ran out): send it again")
        if not self.ended:
            self.stream.close()
            self._cut(final=True)
        if self.ended:
            reason = self.ended
        elif reason == "deadline" and self.job.budget_only:
            reason = "length"  # a time budget ends generation the way max_tokens does
        out = self._delta(len(self.stream.text))
        out.append(Final(self.stream.text, self.ids, reason, event.usage, event.session_id, self.lam, self.stop_sequence))
        return out


_SHORT_LINE = re.compile(r"\n([ \t]*)(?=[^ \t\r\n])")


def indent_cut(text: str, n_indent: int) -> int | None:
    """Where llama.cpp's ``n_indent`` rule ends ``text``, or None.

    After the first newline, the first line that has a character other than
    blanks and is indented by fewer than ``n_indent`` spaces/tabs ends it,
    just before that character (its newline and indentation stay). Blank
    lines never end it. The cut only depends on text up to that character, so
    it is the same however the text arrives in pieces.
    """
    if n_indent > 0:
        for line in _SHORT_LINE.finditer(text):
            if len(line.group(1)) < n_indent:
                return line.end()
    return None
