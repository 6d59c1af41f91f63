"""The HTTP front end: OpenAI's and llama.cpp's completion APIs as a thin adapter onto the completion service.

Every endpoint parses its wire format into the shared ``CompletionRequest``
and renders what ``CompletionService.stream`` yields (text deltas, then one
``Final``) back into that API's shapes: ``POST /v1/completions`` as OpenAI
answers it (JSON, or SSE ``data:`` events ending in ``data: [DONE]``),
``POST /infill`` as llama.cpp's server does (``content`` / ``stop`` /
``stop_type`` / ``timings``, ``response_fields`` filtering). ponder's own
figures (λ per chunk, chunks updated and skipped, TTT FLOPs, the session)
ride along under a ``ponder`` key that clients of those APIs ignore.

Compatibility beats strictness (DESIGN.md §5). The request models declare
every field the reference API defines; the ones ponder has no use for are
accepted, ignored and marked ``x-ponder: ignored`` in the OpenAPI document,
which is generated from the same models. Any other field, or a wrong type,
is a 400 naming the field. What the reference accepts, ponder accepts: an
empty prompt or ``input_prefix``, ``n_predict: 0`` (ingest only), ``-1`` or
an ``n_predict`` above the server's limit (clamped, as llama.cpp does).

A server never answers 5xx to a client's mistake: the body is capped
(413), decoded (400 for bad UTF-8 or JSON) and validated before anything
runs; the service's ``RequestError`` is a 400 naming the front end's field;
a full queue is 429, a server still warming up or draining 503. Only an
unexpected exception is a 500, and it is logged.

Cancellation. The first item of a completion is awaited before the answer
starts (so refusals get real status codes), racing the client's
disconnect. Streams run beside a disconnect listener and always close the
service's iterator when they end, which cancels the job: a client that goes
away frees its decode slot within one engine step, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import importlib.metadata
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal

import anyio
import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ponder.server.metrics import RequestRecord, ServerMetrics, finish_outcome
from ponder.server.service import CompletionRequest, CompletionService, Final, TextDelta
from ponder.server.types import NotReady, QueueFull, RequestError

log = logging.getLogger("ponder.http")

INT64 = 1 << 63
INT32 = 1 << 31


# --- Request models.


def _ignored(api: str) -> Any:
    """A field ``api`` defines that ponder accepts and ignores (flagged in the OpenAPI document)."""
    return Field(None, description=f"{api} field, accepted and ignored.", json_schema_extra={"x-ponder": "ignored"})


class _Body(BaseModel):
    """A request body: unknown fields and wrong types are errors (strict JSON types, no coercion).

    ``null`` stands for a field's default, as both reference APIs read it.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @classmethod
    def ignored_fields(cls) -> list[str]:
        return [name for name, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("x-ponder") == "ignored"]


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="End the stream with a chunk holding `usage` and no choices.")
    include_obfuscation: Any = _ignored("OpenAI")


class CompletionBody(_Body):
    """``POST /v1/completions``: OpenAI's legacy completion request, plus ponder's session fields."""

    prompt: str | list[str] = Field(
        "", description="The document up to the cursor: a string, or a list of exactly one string. Empty is valid."
    )
    suffix: str | None = Field(None, description="The document after the cursor: fill-in-the-middle.")
    max_tokens: int = Field(16, description="Most tokens to generate; 0 only updates the session.")
    temperature: float = Field(0.0, description="Sampling temperature; 0 is greedy (ponder's default, unlike OpenAI's).")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, lt=INT32, description="Sample among the k likeliest tokens (0: all); an extension, as in vLLM.")
    stop: str | list[str] = Field([], description="Generation ends before the first occurrence of any of these.")
    seed: int = Field(0, ge=-INT64, lt=INT64, description="Seed of the sampler; equal seeds give equal samples.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Put the prompt before the completion in the answer.")
    n: int = Field(1, description="Completions per request: ponder returns one, so only 1 is allowed.")
    session_id: str | None = Field(None, description="ponder: the editor document's session (absent: matched by common prefix).")
    document_id: str | None = Field(None, description="ponder: a new document id resets the session.")
    model: Any = _ignored("OpenAI")
    best_of: Any = _ignored("OpenAI")
    logprobs: Any = _ignored("OpenAI")
    presence_penalty: Any = _ignored("OpenAI")
    frequency_penalty: Any = _ignored("OpenAI")
    logit_bias: Any = _ignored("OpenAI")
    user: Any = _ignored("OpenAI")
    min_p: Any = _ignored("vLLM / llama.cpp")
    repetition_penalty: Any = _ignored("vLLM")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value):
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise pydantic_core.PydanticCustomError(
                "token_prompt", "token-id prompts are not supported: send the prompt as text (a string, or a list of one string)"
            )
        return value


class InfillExtra(BaseModel):
    """A snippet of another file. Unknown keys (llama.vim sends ``time``) are ignored, as llama.cpp does."""

    model_config = ConfigDict(extra="ignore", strict=True)
    filename: str | None = None
    text: str


class InfillBody(_Body):
    """``POST /infill``: llama.cpp's fill-in-the-middle request, plus ponder's session fields."""

    input_prefix: str = Field("", description="The document before the cursor. Empty is valid.")
    input_suffix: str = Field("", description="The document after the cursor.")
    input_extra: list[InfillExtra] = Field([], description="Snippets of other files: context for this request only.")
    prompt: str = Field("", description="Text at the cursor, after `input_prefix` (as llama.cpp places it).")
    n_predict: int = Field(
        -1, description="Most tokens to generate: -1, or more than the server's limit, means the limit; 0 only updates the session."
    )
    t_max_predict_ms: int = Field(
        -1, lt=INT32, description="Time budget in ms: generation stops (`stop_type: limit`) after it; <= 0 means none."
    )
    n_indent: int = Field(0, description="After the first newline, a line indented by fewer spaces/tabs ends the completion.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    temperature: float = Field(0.0, description="Sampling temperature; <= 0 is greedy (ponder's default, unlike llama.cpp's).")
    top_k: int = Field(0, lt=INT32, description="Sample among the k likeliest tokens (<= 0: all).")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1].")
    seed: int = Field(0, ge=-INT64, lt=INT64, description="Seed of the sampler; equal seeds give equal samples.")
    stop: str | list[str] = Field([], description="Generation ends before the first occurrence of any of these.")
    return_tokens: bool = Field(False, description="Include the generated token ids in `tokens`.")
    response_fields: list[str] | None = Field(
        None, description="Keep only these fields of the final answer; `a/b` names a nested field (key `a/b` in the answer)."
    )
    session_id: str | None = Field(None, description="ponder: the editor document's session (absent: matched by common prefix).")
    document_id: str | None = Field(None, description="ponder: a new document id resets the session.")
    id_slot: Any = _ignored("llama.cpp")
    cache_prompt: Any = _ignored("llama.cpp")
    samplers: Any = _ignored("llama.cpp")
    t_max_prompt_ms: Any = _ignored("llama.cpp")
    n_probs: Any = _ignored("llama.cpp")
    min_p: Any = _ignored("llama.cpp")
    typical_p: Any = _ignored("llama.cpp")
    repeat_penalty: Any = _ignored("llama.cpp")
    repeat_last_n: Any = _ignored("llama.cpp")
    presence_penalty: Any = _ignored("llama.cpp")
    frequency_penalty: Any = _ignored("llama.cpp")
    dry_multiplier: Any = _ignored("llama.cpp")
    dry_base: Any = _ignored("llama.cpp")
    dry_allowed_length: Any = _ignored("llama.cpp")
    dry_penalty_last_n: Any = _ignored("llama.cpp")
    dry_sequence_breakers: Any = _ignored("llama.cpp")
    xtc_probability: Any = _ignored("llama.cpp")
    xtc_threshold: Any = _ignored("llama.cpp")
    top_n_sigma: Any = _ignored("llama.cpp")
    mirostat: Any = _ignored("llama.cpp")
    mirostat_tau: Any = _ignored("llama.cpp")
    mirostat_eta: Any = _ignored("llama.cpp")
    dynatemp_range: Any = _ignored("llama.cpp")
    dynatemp_exponent: Any = _ignored("llama.cpp")
    min_keep: Any = _ignored("llama.cpp")
    n_keep: Any = _ignored("llama.cpp")
    n_discard: Any = _ignored("llama.cpp")
    ignore_eos: Any = _ignored("llama.cpp")
    logit_bias: Any = _ignored("llama.cpp")
    grammar: Any = _ignored("llama.cpp")
    json_schema: Any = _ignored("llama.cpp")
    timings_per_token: Any = _ignored("llama.cpp")
    post_sampling_probs: Any = _ignored("llama.cpp")
    lora: Any = _ignored("llama.cpp")
    model: Any = _ignored("llama.cpp")


# --- Response models.


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PonderDelta(_Answer):
    chunk_lambda: list[float] = Field(description="λ of the TTT chunks that closed since the last event.")
    tokens: int = Field(description="Generated tokens behind this event (a reader that fell behind gets several per event).")


class PonderFinal(_Answer):
    session_id: str = Field(description="The session the request ran in (send it back to keep the document's state).")
    finish_reason: Literal["stop", "length", "cancelled", "deadline"] = Field(
        description="ponder's own reason: `cancelled` (superseded, or the server shut down) and `deadline` show as `length`."
    )
    chunk_lambda: list[float] = Field(description="λ of every chunk the TTT layer closed for this request.")
    chunks_updated: int
    chunks_skipped: int
    ttt_flops: float
    cached_tokens: int = Field(description="Prompt tokens served from the session's committed state.")


class CompletionUsage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Answer):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(_Answer):
    """A completion, or (streaming) one event of it: OpenAI's ``text_completion`` object."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    ponder: PonderFinal | PonderDelta | None = None


class InfillTimings(_Answer):
    cache_n: int
    prompt_n: int
    prompt_ms: float = Field(description="Arrival to the first token (queue and prompt processing).")
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float = Field(description="First token to the end.")
    predicted_per_token_ms: float
    predicted_per_second: float


class InfillChunk(_Answer):
    """One streamed event of ``/infill`` before the last."""

    index: int = 0
    content: str
    tokens: list[int]
    stop: Literal[False] = False
    tokens_predicted: int
    ponder: PonderDelta


class Infill(_Answer):
    """llama.cpp's final ``/infill`` answer (with ``stream``, the last event, its ``content`` empty)."""

    index: int = 0
    content: str
    tokens: list[int] = Field(description="Generated token ids when `return_tokens` is set.")
    stop: Literal[True] = True
    model: str
    stop_type: Literal["eos", "word", "limit"]
    stopping_word: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    truncated: bool = Field(False, description="Always false: ponder never drops prompt tokens (long documents slide a window).")
    has_new_line: bool
    timings: InfillTimings
    ponder: PonderFinal


class ModelCard(_Answer):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ponder"


class ModelList(_Answer):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionReset(_Answer):
    session_id: str
    existed: bool


class Health(_Answer):
    status: Literal["ok", "loading", "draining"]


class ErrorDetail(_Answer):
    message: str
    type: str
    param: str | None = None
    code: int = Field(description="The HTTP status.")


class ErrorAnswer(_Answer):
    """OpenAI's error shape (llama.cpp's is the same without ``param``)."""

    error: ErrorDetail


# --- Errors and JSON.


class ApiError(Exception):
    """An answer other than 200: the status, a message that says what to do, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        detail = ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.status)
        return _json(ErrorAnswer(error=detail), self.status, headers)


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def _to_json(data: BaseModel | dict) -> bytes:
    if isinstance(data, BaseModel):
        return data.model_dump_json().encode()
    return pydantic_core.to_json(data, inf_nan_mode="null")


def _json(data: BaseModel | dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_to_json(data), status, headers, media_type="application/json")


def _sse(data: BaseModel | dict) -> bytes:
    return b"data: " + _to_json(data) + b"\n\n"


def _is_union_tag(part) -> bool:
    """pydantic names the union member in an error's location (``str``, ``list[str]``); field names never look like that."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part)


def _describe(error: ValidationError) -> ApiError:
    """A 400 naming each offending field (dotted path), from pydantic's errors."""
    problems: dict[str, list[str]] = {}
    for e in error.errors(include_url=False):
        if e["type"] == "json_invalid":
            return ApiError(400, f"request body is not valid JSON: {e['ctx']['error']}")
        path = ".".join(str(part) for part in e["loc"] if not _is_union_tag(part))
        if e["type"] == "extra_forbidden":
            message = "unknown field (GET /openapi.json lists the fields this endpoint accepts)"
        elif not path:
            message = "must be a JSON object"
        else:
            message = e["msg"]
        problems.setdefault(path or "request body", []).append(message)
    text = "; ".join(f"{path}: {' or '.join(dict.fromkeys(msgs))}" for path, msgs in problems.items())
    first = next(iter(problems))
    return ApiError(400, text, None if first == "request body" else first)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or actually sent)."""
    too_big = f"request body exceeds the limit of {limit} bytes (the server's --max-body-bytes)"
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length header is not a byte count: {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes, model: type[_Body]) -> _Body:
    """Decodes and validates a JSON body; every failure is a 400 that says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8: byte {raw[err.start]:#04x} at offset {err.start}") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as err:
        raise _describe(err) from None


# --- Completion plumbing shared by both APIs.

def _stops(stop: str | list[str]) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _ponder_final(final: Final) -> PonderFinal:
    u = final.usage
    return PonderFinal(
        session_id=final.session_id, finish_reason=final.finish_reason, chunk_lambda=final.chunk_lambda,
        chunks_updated=u.chunks_updated, chunks_skipped=u.chunks_skipped, ttt_flops=u.ttt_flops, cached_tokens=u.cached_tokens,
    )


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _or_disconnect(request: Request, work: Awaitable):
    """``await work``, unless the client disconnects first: then ``work`` is cancelled and ``_ClientGone`` raised."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
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


class _EventStream(StreamingResponse):
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


# --- The endpoints.


@dataclasses.dataclass(frozen=True)
class _Operation:
    """One endpoint: its route, its handler's name, and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: str
    summary: str
    body: type[_Body] | None = None
    answer: type[BaseModel] | None = None
    events: tuple[type[BaseModel], ...] = ()  # SSE event schemas, with ``stream: true``
    media_type: str = "application/json"  # of an answer without a model
    public: bool = False
    description: str = ""
    query: tuple[str, ...] = ()  # required query parameters


OPERATIONS = (
    _Operation(
        "POST", "/v1/completions", "completions", "OpenAI-compatible completion (fill-in-the-middle with `suffix`)",
        CompletionBody, Completion, (Completion,),
        description="With `stream: true`: `data: {text_completion}` events, then `data: [DONE]`.",
    ),
    _Operation(
        "POST", "/infill", "infill", "llama.cpp-compatible fill-in-the-middle", InfillBody, Infill, (InfillChunk, Infill),
        description="With `stream: true`: `data:` events with `stop: false`, then the final answer (`content` empty, `stop: true`).",
    ),
    _Operation("GET", "/v1/models", "models", "The served model, in OpenAI's list format", answer=ModelList),
    _Operation(
        "POST", "/v1/sessions/{session_id}/reset", "reset_session", "Forget a session: its next request starts a fresh document",
        answer=SessionReset,
    ),
    _Operation(
        "GET", "/ui", "ui", "The λ viewer: a session's committed document, each chunk shaded by its λ",
        media_type="text/html", query=("session_id",),
        description="An HTML page (`ponder.server.viewer`), recomputed on every request by a fresh run of the model over the "
        "session's committed tokens (whole chunks), once with its schedule and once with SKIP. A diagnostic: slow, "
        "and its first use of each length compiles.",
    ),
    _Operation("GET", "/health", "health", "200 once the engine is warm, 503 before and while draining", answer=Health, public=True),
    _Operation("GET", "/metrics", "prometheus", "Prometheus metrics (prefix `ponder_`)", media_type="text/plain", public=True),
    _Operation("GET", "/openapi.json", "openapi", "This document", public=True),
)


class _Frontend:
    def __init__(self, service: CompletionService, engine, metrics: ServerMetrics, api_keys, max_body_bytes, model_name: str):
        self.service, self.engine, self.metrics = service, engine, metrics
        self.api_keys, self.max_body_bytes, self.model_name = tuple(api_keys), max_body_bytes, model_name
        self.started = int(time.time())
        self.document = openapi_document(model_name)

    # --- Cross-cutting: auth, body, errors, metrics.

    def _api_key(self, request: Request) -> str:
        """The caller's key ("" without auth), compared in constant time with every key; else 401."""
        if not self.api_keys:
            return ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        matched = ""
        for key in self.api_keys:  # every key is compared: the time taken says nothing about which matched
            if hmac.compare_digest(token.encode(), key.encode()):
                matched = key
        if not matched:
            message = "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
            raise ApiError(401, message, kind="authentication_error")
        return matched

    def route(self, op: _Operation) -> Route:
        handler = getattr(self, op.handler)

        async def endpoint(request: Request) -> Response:
            call = RequestRecord(self.metrics, op.handler)
            try:
                key = "" if op.public else self._api_key(request)
                return await handler(request, key, call)
            except ApiError as err:
                call.done("client_error")
                return err.response()
            except RequestError as err:
                call.done("client_error")
                return ApiError(err.status, f"{err.field}: {err.message}", err.field).response()
            except QueueFull as err:
                call.done("rejected")
                return ApiError(429, f"{err}; retry shortly", kind="rate_limit_error").response()
            except NotReady as err:
                call.done("rejected")
                return ApiError(503, str(err), kind="unavailable_error").response()
            except (_ClientGone, ClientDisconnect):  # before the answer, or while its body was arriving
                call.done("cancelled")
                return Response(status_code=499)  # nobody is listening
            except Exception as err:
                log.exception("%s %s failed", request.method, request.url.path)
                call.done("error")
                return ApiError(500, f"internal error ({type(err).__name__}: {err})", kind="server_error").response()

        # A session id may hold slashes (editors use the file's path): it matches them, %2F-encoded or not.
        path = op.path.replace("{session_id}", "{session_id:path}")
        return Route(path, endpoint, methods=[op.method], name=op.handler)

    async def _body(self, request: Request, model: type[_Body]):
        return _parse(await _read_body(request, self.max_body_bytes), model)

    # --- Running a completion.

    async def _items(self, request: CompletionRequest, call: RequestRecord) -> AsyncIterator[TextDelta | Final]:
        """The service's stream, with metrics."""
        stream = self.service.stream(request)
        try:
            async for item in stream:
                if isinstance(item, TextDelta) and (item.text or item.token_ids):
                    call.token()
                if isinstance(item, Final):
                    call.done(finish_outcome(item.finish_reason), completed=True)
                yield item
        finally:
            await stream.aclose()

    async def _start(self, request: Request, completion: CompletionRequest, call: RequestRecord) -> AsyncIterator:
        """The completion's items, its first already there: a refusal (``RequestError``, ``QueueFull``,
        ``NotReady``) raises here, before any answer starts."""
        items = self._items(completion, call)
        first = await _or_disconnect(request, anext(items))
        return _chain(first, items)

    async def _events(self, items: AsyncIterator, call: RequestRecord, render) -> AsyncIterator[bytes]:
        """SSE framing around ``render`` (item -> events); an engine failure mid-stream is reported in-band."""
        try:
            async for item in items:
                for event in render(item):
                    yield event
        except Exception as err:  # the status line is gone: say it in the stream
            log.exception("stream failed")
            call.done("error")
            detail = ErrorDetail(message=f"internal error ({type(err).__name__}: {err})", type="server_error", code=500)
            yield _sse(ErrorAnswer(error=detail))
        finally:
            await items.aclose()
            call.done("cancelled")  # no-op unless the client left before the end

    # --- OpenAI.

    async def completions(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        body: CompletionBody = await self._body(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                message = f"prompt: send one prompt (a string or a list of one string), got a list of {len(prompt)}"
                raise ApiError(400, message, "prompt")
            prompt = prompt[0]
        if body.n != 1:
            raise ApiError(400, f"n: ponder returns one completion per request; send n=1 or leave it out (got {body.n})", "n")
        completion = CompletionRequest(
            prompt=prompt,
            suffix=body.suffix,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=_stops(body.stop),
            session_id=body.session_id or None,
            document_id=body.document_id or None,
            api_key=api_key,
        )
        items = await self._start(request, completion, call)
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name)
        echo = prompt if body.echo else ""
        if not body.stream:
            final: Final = await _or_disconnect(request, _last(items))
            choice = CompletionChoice(text=echo + final.text, finish_reason=_openai_finish(final))
            return _json(Completion(**head, choices=[choice], usage=_openai_usage(final), ponder=_ponder_final(final)))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        unsent_echo = [echo] if echo else []

        def render(item):
            events = [_sse(Completion(**head, choices=[CompletionChoice(text=unsent_echo.pop())]))] if unsent_echo else []
            if isinstance(item, TextDelta):
                choice, lam = CompletionChoice(text=item.text), PonderDelta(chunk_lambda=item.chunk_lambda, tokens=len(item.token_ids))
                return events + [_sse(Completion(**head, choices=[choice], ponder=lam))]
            finish = CompletionChoice(text="", finish_reason=_openai_finish(item))
            events.append(_sse(Completion(**head, choices=[finish], ponder=_ponder_final(item))))
            if include_usage:
                events.append(_sse(Completion(**head, choices=[], usage=_openai_usage(item))))
            return events + [b"data: [DONE]\n\n"]

        return _EventStream(self._events(items, call, render))

    # --- llama.cpp.

    async def infill(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        body: InfillBody = await self._body(request, InfillBody)
        limit = self.service.limits.max_new_tokens
        n_predict = limit if body.n_predict < 0 or body.n_predict > limit else body.n_predict  # llama.cpp clamps to the server's
        budget = body.t_max_predict_ms
        completion = CompletionRequest(
            prompt=body.input_prefix + body.prompt,
            suffix=body.input_suffix,
            extra=tuple((chunk.filename or "", chunk.text) for chunk in body.input_extra),
            max_tokens=n_predict,
            temperature=0.0 if body.temperature < 0 else body.temperature,  # llama.cpp: negative is greedy
            top_p=body.top_p,
            top_k=max(body.top_k, 0),  # llama.cpp: <= 0 keeps every token
            seed=body.seed,
            stop=_stops(body.stop),
            n_indent=max(body.n_indent, 0),
            session_id=body.session_id or None,
            document_id=body.document_id or None,
            # A budget for generation: an ingestion (n_predict 0) has none, as in llama.cpp.
            time_budget_s=budget / 1000 if budget > 0 and n_predict > 0 else None,
            api_key=api_key,
            field_names=(("prompt", "input_prefix"), ("suffix", "input_suffix"), ("max_tokens", "n_predict")),
        )
        items = await self._start(request, completion, call)
        if not body.stream:
            final: Final = await _or_disconnect(request, _last(items))
            return _json(self._infill_answer(body, completion, final, call, final.text))
        predicted = 0

        def render(item):
            nonlocal predicted
            if isinstance(item, Final):
                return [_sse(self._infill_answer(body, completion, item, call, ""))]
            predicted += len(item.token_ids)
            tokens = item.token_ids if body.return_tokens else []
            lam = PonderDelta(chunk_lambda=item.chunk_lambda, tokens=len(item.token_ids))
            return [_sse(InfillChunk(content=item.text, tokens=tokens, tokens_predicted=predicted, ponder=lam))]

        return _EventStream(self._events(items, call, render))

    def _infill_answer(self, body: InfillBody, completion: CompletionRequest, final: Final, call: RequestRecord, content: str) -> dict:
        """llama.cpp's final answer, filtered by ``response_fields``."""
        u = final.usage
        word = final.stop_sequence
        stop_type = ("word" if word else "eos") if final.finish_reason == "stop" else "limit"
        end = call.end or time.monotonic()
        first = call.first_token or end
        prompt_n, prompt_ms = u.prompt_tokens - u.cached_tokens, (first - call.start) * 1000
        predicted_n, predicted_ms = u.generated_tokens, (end - first) * 1000
        timings = InfillTimings(
            cache_n=u.cached_tokens,
            prompt_n=prompt_n, prompt_ms=prompt_ms,
            prompt_per_token_ms=_ratio(prompt_ms, prompt_n), prompt_per_second=_ratio(1000 * prompt_n, prompt_ms),
            predicted_n=predicted_n, predicted_ms=predicted_ms,
            predicted_per_token_ms=_ratio(predicted_ms, predicted_n),
            predicted_per_second=_ratio(1000 * predicted_n, predicted_ms),
        )
        answer = Infill(
            content=content, tokens=final.token_ids if body.return_tokens else [], model=self.model_name,
            stop_type=stop_type, stopping_word=word, tokens_predicted=u.generated_tokens, tokens_evaluated=u.prompt_tokens,
            tokens_cached=u.cached_tokens, has_new_line="\n" in final.text, timings=timings, ponder=_ponder_final(final),
        ).model_dump(mode="json")
        return answer if body.response_fields is None else _pick_fields(answer, body.response_fields)

    # --- The rest.

    async def models(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        call.done("ok")
        return _json(ModelList(data=[ModelCard(id=self.model_name, created=self.started)]))

    async def reset_session(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        session_id = request.path_params["session_id"]
        existed = self.service.reset(api_key, session_id)
        call.done("ok")
        return _json(SessionReset(session_id=session_id, existed=existed))

    async def ui(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        session_id = request.query_params.get("session_id", "")
        if not session_id:
            raise ApiError(400, "session_id: required query parameter naming the session to show (GET /ui?session_id=ID)",
                           "session_id")
        tokens = self.engine.committed_tokens(api_key, session_id)
        if tokens is None:
            raise ApiError(404, f"session_id: no session {session_id!r} for this API key (a completion with that "
                           "session_id creates it)", "session_id", kind="not_found_error")
        from ponder.server.viewer.data import inspect_tokens
        from ponder.server.viewer.page import render_html

        def page() -> str:  # a fresh run over the tokens, off the event loop (the engine thread is untouched)
            inspection = inspect_tokens(self.engine.model, self.service.tokenizer, tokens, self.engine.config.schedule,
                                        source=f"session {session_id}")
            return render_html(inspection, note="Recomputed for this page from the session's committed tokens.")

        html = await anyio.to_thread.run_sync(page)
        call.done("ok")
        return Response(html, media_type="text/html")

    async def health(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        if getattr(self.engine, "draining", False):
            return _json(Health(status="draining"), 503)
        return _json(Health(status="ok"), 200) if self.engine.ready else _json(Health(status="loading"), 503)

    async def prometheus(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        text, content_type = self.metrics.render()
        return Response(text, headers={"Content-Type": content_type})

    async def openapi(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        return _json(self.document)


def _openai_finish(final: Final) -> str:
    """OpenAI knows ``stop`` and ``length``: a cancelled or timed-out completion is cut short, like ``length``."""
    return "stop" if final.finish_reason == "stop" else "length"


def _openai_usage(final: Final) -> CompletionUsage:
    u = final.usage
    total = u.prompt_tokens + u.generated_tokens
    return CompletionUsage(prompt_tokens=u.prompt_tokens, completion_tokens=u.generated_tokens, total_tokens=total)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _pick_fields(answer: dict, paths: list[str]) -> dict:
    """llama.cpp's ``response_fields``: only the listed fields, a nested one named by its ``a/b`` path
    (and keyed by that path in the result); paths that name nothing are left out."""
    picked = {}
    for path in paths:
        value, found = answer, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            picked[path] = value
    return picked


# --- OpenAPI.


def openapi_document(model_name: str = "ponder") -> dict:
    """The OpenAPI 3.1 document of these endpoints, its schemas generated from the pydantic models."""
    models = {m for op in OPERATIONS for m in (op.body, op.answer, *op.events) if m is not None} | {ErrorAnswer}
    modes = [(m, "validation" if issubclass(m, _Body) else "serialization") for m in sorted(models, key=lambda m: m.__name__)]
    refs, schemas = models_json_schema(modes, ref_template="#/components/schemas/{model}")
    ref = lambda model: refs[(model, "validation" if issubclass(model, _Body) else "serialization")]
    error = {"description": "An error naming the field or limit", "content": {"application/json": {"schema": ref(ErrorAnswer)}}}
    paths: dict = {}
    for op in OPERATIONS:
        untyped = {"type": "string"} if op.media_type.startswith("text/") else {"type": "object"}
        content = {op.media_type: {"schema": ref(op.answer) if op.answer else untyped}}
        if op.events:
            content["text/event-stream"] = {"schema": {"anyOf": [ref(m) for m in op.events]}}
        operation: dict = {
            "operationId": op.handler, "summary": op.summary, "description": _description(op),
            "responses": {"200": {"description": "OK", "content": content}},
        }
        if op.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(op.body)}}}
            for status in ("400", "413", "429", "503"):
                operation["responses"][status] = error
        if "{session_id}" in op.path:
            operation["parameters"] = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if op.query:
            operation["parameters"] = [{"name": n, "in": "query", "required": True, "schema": {"type": "string"}} for n in op.query]
            operation["responses"].update({"400": error, "404": error})
        if op.public:
            operation["security"] = []
        else:
            operation["responses"]["401"] = error
        if op.path == "/health":
            operation["responses"]["503"] = {"description": "Warming up or draining", "content": content}
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    try:
        version = importlib.metadata.version("ponder")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"ponder ({model_name})",
            "version": version,
            "description": "Code completion by a model that keeps learning while it reads; OpenAI- and llama.cpp-compatible.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Only when the server has API keys."}},
        },
        "security": [{"bearer": []}],
    }


def _description(op: _Operation) -> str:
    text = op.description
    if op.body is not None and op.body.ignored_fields():
        names = ", ".join(f"`{name}`" for name in op.body.ignored_fields())
        text += f"\n\nAccepted and ignored for compatibility: {names}."
    return text.strip()


# --- The app.


def build_app(
    service: CompletionService,
    engine,
    metrics: ServerMetrics,
    api_keys: tuple[str, ...] = (),
    max_body_bytes: int = 1 << 20,
    model_name: str = "ponder",
) -> Starlette:
    """The HTTP front end of ``service``.

    Args:
      service: the completion service every endpoint runs through.
      engine: read for readiness only (``ready``, ``draining``): ``/health``.
      metrics: requests by endpoint and outcome, TTFT and latency are recorded here; ``/metrics`` renders it.
      api_keys: bearer tokens, any of which authenticates (empty: no auth). ``/health``,
        ``/metrics`` and ``/openapi.json`` are always public. The matched key scopes the sessions.
      max_body_bytes: larger request bodies are refused with 413.
      model_name: the name ``/v1/models`` and the answers report.

    Returns:
      A Starlette app to serve with uvicorn.
    """
    frontend = _Frontend(service, engine, metrics, api_keys, max_body_bytes, model_name)

    async def http_error(request: Request, err: HTTPException) -> Response:  # 404 / 405 in the same JSON shape
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", kind="not_found_error"
                        if err.status_code == 404 else "invalid_request_error").response()

    return Starlette(routes=[frontend.route(op) for op in OPERATIONS], exception_handlers={HTTPException: http_error})
