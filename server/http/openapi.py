"""The endpoint table, and the OpenAPI 3.1 document generated from it and the wire models.

``OPERATIONS`` is the one list of endpoints: the router (``app.py``) makes
its routes from it and ``openapi_document`` describes it, so the document
cannot drift from what is served. Request schemas are the models'
validation schemas (with the ignored fields marked ``x-ponder: ignored``),
answer schemas their serialization schemas.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

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


@dataclasses.dataclass(frozen=True)
class Operation:
    """One endpoint: its route, its handler's name, and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: str
    summary: str
    body: type[RequestBody] | None = None
    answer: type[BaseModel] | None = None
    events: tuple[type[BaseModel], ...] = ()  # SSE event schemas, with ``stream: true``
    media_type: str = "application/json"  # of an answer without a model
    public: bool = False
    description: str = ""
    query: tuple[str, ...] = ()  # required query parameters


OPERATIONS = (
    Operation(
        "POST", "/v1/completions", "completions", "OpenAI-compatible completion (fill-in-the-middle with `suffix`)",
        CompletionBody, Completion, (Completion,),
        description="With `stream: true`: `data: {text_completion}` events, then `data: [DONE]`.",
    ),
    Operation(
        "POST", "/infill", "infill", "llama.cpp-compatible fill-in-the-middle", InfillBody, Infill, (InfillChunk, Infill),
        description="With `stream: true`: `data:` events with `stop: false`, then the final answer (`content` empty, `stop: true`).",
    ),
    Operation("GET", "/v1/models", "models", "The served model, in OpenAI's list format", answer=ModelList),
    Operation(
        "POST", "/v1/sessions/{session_id}/reset", "reset_session", "Forget a session: its next request starts a fresh document",
        answer=SessionReset,
    ),
    Operation(
        "GET", "/ui", "ui", "The λ viewer: a session's committed document, each chunk shaded by its λ",
        media_type="text/html", query=("session_id",),
        description="An HTML page (`ponder.server.viewer`), recomputed on every request by a fresh run of the model over the "
        "session's committed tokens (whole chunks), once with its schedule and once with SKIP. A diagnostic: slow, "
        "and its first use of each length compiles.",
    ),
    Operation("GET", "/health", "health", "200 once the engine is warm, 503 before and while draining", answer=Health, public=True),
    Operation("GET", "/metrics", "prometheus", "Prometheus metrics (prefix `ponder_`)", media_type="text/plain", public=True),
    Operation("GET", "/openapi.json", "openapi", "This document", public=True),
)


def openapi_document(model_name: str = "ponder") -> dict:
    """The OpenAPI 3.1 document of these endpoints, its schemas generated from the pydantic models."""
    models = {m for op in OPERATIONS for m in (op.body, op.answer, *op.events) if m is not None} | {ErrorAnswer}
    modes = [(m, _mode(m)) for m in sorted(models, key=lambda m: m.__name__)]
    refs, schemas = models_json_schema(modes, ref_template="#/components/schemas/{model}")
    ref = lambda model: refs[(model, _mode(model))]
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


def _mode(model: type[BaseModel]) -> str:
    """Which of a model's schemas the document shows: what a request may send, what an answer holds."""
    return "validation" if issubclass(model, RequestBody) else "serialization"


def _description(op: Operation) -> str:
    text = op.description
    if op.body is not None and op.body.ignored_fields():
        names = ", ".join(f"`{name}`" for name in op.body.ignored_fields())
        text += f"\n\nAccepted and ignored for compatibility: {names}."
    return text.strip()
