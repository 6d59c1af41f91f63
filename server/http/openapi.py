"""The endpoint table, and the OpenAPI 3.1 document generated from it and the wire models.

``OPERATIONS`` is the one list of endpoints: the router (``app.py``) makes
its routes from it and ``openapi_document`` describes it, so the document
cannot drift from what is served. Request schemas are the models'
validation schemas (with the ignored fields marked ``x-ponder: ignored``),
answer schemas their serialization schemas.

A streamed answer (``text/event-stream``) is documented one event at a time,
as OpenAPI 3.1 tools read it: an event is ``{data, event, id, retry}``, its
``data`` the JSON of one payload model (``contentMediaType`` /
``contentSchema``), or a closing sentinel such as OpenAI's ``[DONE]``. An
answer that ``response_fields`` may filter (``/infill``) is either the whole
model or any of its fields, a nested one under its ``a/b`` path.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ponder.server.http.request_schema import ServedLimits, constrain
from ponder.server.http.wire import (
    Completion,
    CompletionBody,
    ErrorAnswer,
    Health,
    Infill,
    InfillBody,
    InfillChunk,
    ModelList,
    RequestBody,
    SessionReset,
)
from ponder.server.sessions import MAX_ID_CHARS


@dataclasses.dataclass(frozen=True)
class Operation:
    """One endpoint: its route, its handler's name, and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: str
    summary: str
    body: type[RequestBody] | None = None
    answer: type[BaseModel] | None = None
    events: tuple[type[BaseModel], ...] = ()  # the payloads of its SSE events, with ``stream: true``
    done: str | None = None  # the data of the event that closes a stream (OpenAI's ``[DONE]``)
    filtered: bool = False  # ``response_fields`` may keep only some of the answer's fields
    media_type: str = "application/json"  # of an answer without a model
    public: bool = False
    description: str = ""
    query: tuple[str, ...] = ()  # required query parameters
    errors: tuple[str, ...] = ()  # error statuses besides those every operation of its kind has


OPERATIONS = (
    Operation(
        "POST", "/v1/completions", "completions", "OpenAI-compatible completion (fill-in-the-middle with `suffix`)",
        CompletionBody, Completion, (Completion,), done="[DONE]",
        description="With `stream: true`: `data: {text_completion}` events, then `data: [DONE]`.",
    ),
    Operation(
        "POST", "/infill", "infill", "llama.cpp-compatible fill-in-the-middle", InfillBody, Infill, (InfillChunk, Infill),
        filtered=True,
        description="With `stream: true`: `data:` events with `stop: false`, then the final answer (`content` empty, `stop: true`). "
        "With a non-empty `response_fields`, the final answer holds only the fields named.",
    ),
    Operation("GET", "/v1/models", "models", "The served model, in OpenAI's list format", answer=ModelList),
    Operation(
        "POST", "/v1/sessions/{session_id}/reset", "reset_session", "Forget a session: its next request starts a fresh document",
        answer=SessionReset, errors=("400",),
    ),
    Operation(
        "GET", "/ui", "ui", "The λ viewer: a session's committed document, each chunk shaded by its λ",
        media_type="text/html", query=("session_id",), errors=("403", "429"),
        description="An HTML page (`ponder.server.viewer`), recomputed on every request by a fresh run of the model over the "
        "caller's session's committed tokens (whole chunks, the first 2048 at most), once with its schedule and once "
        "with SKIP. A diagnostic: seconds, one page at a time (429 meanwhile), and its first use of each length "
        "compiles. Off (403) on a server without API keys unless started with `--ui`.",
    ),
    Operation("GET", "/health", "health", "200 once the engine is warm, 503 before and while draining", answer=Health, public=True),
    Operation("GET", "/metrics", "prometheus", "Prometheus metrics (prefix `ponder_`)", media_type="text/plain", public=True),
    Operation("GET", "/openapi.json", "openapi", "This document", public=True),
)


def openapi_document(model_name: str, auth: bool, limits: ServedLimits) -> dict:
    """The OpenAPI 3.1 document of these endpoints, its schemas generated from the pydantic models.

    Args:
      model_name: the served model's name, in the title.
      auth: whether the server has API keys: only then do its operations need a bearer key (and answer 401).
      limits: the server's settings that bound a request (``request_schema``).
    """
    models = {m for op in OPERATIONS for m in (op.body, op.answer, *op.events) if m is not None} | {ErrorAnswer}
    modes = [(m, _mode(m)) for m in sorted(models, key=lambda m: m.__name__)]
    refs, schemas = models_json_schema(modes, ref_template="#/components/schemas/{model}")
    components = schemas.get("$defs", {})
    constrain(components, [m.__name__ for m in RequestBody.__subclasses__() if m.__name__ in components], limits)
    ref = lambda model: refs[(model, _mode(model))]
    error = {"description": "An error naming the field or limit", "content": {"application/json": {"schema": ref(ErrorAnswer)}}}
    id_schema = {"type": "string", "maxLength": MAX_ID_CHARS}
    paths: dict = {}
    for op in OPERATIONS:
        untyped = {"type": "string"} if op.media_type.startswith("text/") else {"type": "object"}
        answer = ref(op.answer) if op.answer else untyped
        if op.filtered:
            fields = f"{op.answer.__name__}Fields"
            components[fields] = _field_paths(components, op.answer.__name__)
            answer = {"anyOf": [answer, {"$ref": f"#/components/schemas/{fields}"}]}
        content = {op.media_type: {"schema": answer}}
        if op.events:
            payloads = [ref(m) for m in op.events] + ([answer["anyOf"][1]] if op.filtered else []) + [ref(ErrorAnswer)]
            content["text/event-stream"] = {"schema": _event(payloads, op.done)}
        operation: dict = {
            "operationId": op.handler, "summary": op.summary, "description": _description(op),
            "responses": {"200": {"description": "OK", "content": content}},
        }
        if op.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(op.body)}}}
            for status in ("400", "408", "413", "415", "429", "503"):
                operation["responses"][status] = error
        if "{session_id}" in op.path:
            operation["parameters"] = [{"name": "session_id", "in": "path", "required": True, "schema": id_schema}]
        if op.query:
            operation["parameters"] = [{"name": n, "in": "query", "required": True, "schema": id_schema} for n in op.query]
            operation["responses"].update({"400": error, "404": error})
        for status in op.errors:
            operation["responses"][status] = error
        if op.public or not auth:
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
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": f"ponder ({model_name})",
            "version": version,
            "description": "Code completion by a model that keeps learning while it reads; OpenAI- and llama.cpp-compatible.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _event(payloads: list[dict], done: str | None) -> dict:
    """One server-sent event whose ``data`` is the JSON of one of ``payloads`` (or the sentinel ``done``)."""
    data: dict = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": payloads}}
    if done is not None:
        data = {"anyOf": [{"const": done}, data]}
    return {"type": "object", "properties": {"data": data}, "required": ["data"]}


def _field_paths(components: dict, name: str) -> dict:
    """The schema of component ``name`` filtered by llama.cpp's ``response_fields``: an object with any of
    its fields, each nested field also under its ``a/b`` path, and nothing else."""

    def paths(schema: dict, prefix: str):
        for key, field in schema.get("properties", {}).items():
            yield prefix + key, field
            if "$ref" in field:
                yield from paths(components[field["$ref"].rsplit("/", 1)[-1]], f"{prefix}{key}/")

    return {
        "type": "object", "additionalProperties": False, "properties": dict(paths(components[name], "")),
        "description": f"{name} with `response_fields`: only the fields named, a nested one keyed by its `a/b` path.",
    }


def _mode(model: type[BaseModel]) -> str:
    """Which of a model's schemas the document shows: what a request may send, what an answer holds."""
    return "validation" if issubclass(model, RequestBody) else "serialization"


def _description(op: Operation) -> str:
    text = op.description
    if op.body is not None and op.body.ignored_fields():
        names = ", ".join(f"`{name}`" for name in op.body.ignored_fields())
        text += f"\n\nAccepted and ignored for compatibility: {names}."
    return text.strip()
