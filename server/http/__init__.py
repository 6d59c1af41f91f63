"""The HTTP front end: OpenAI's and llama.cpp's completion APIs as a thin adapter onto the completion service.

Every endpoint parses its wire format into the shared ``CompletionRequest``
and renders what ``CompletionService.stream`` yields (text deltas, then one
``Final``) back into that API's shapes: ``POST /v1/completions`` as OpenAI
answers it, ``POST /infill`` as llama.cpp's server does. ponder's own
figures ride along under a ``ponder`` key that clients of those APIs ignore.

The modules, one concern each:

- ``wire``: the pydantic models of every body, and their JSON encoding;
- ``errors``: ``ApiError`` and the request-body checks (size, UTF-8, JSON, fields);
- ``streaming``: running a completion for a client: disconnects, server-sent events;
- ``openai`` / ``llama``: each API's handler;
- ``openapi``: the endpoint table and the OpenAPI document generated from it;
- ``app``: ``build_app``: routes, auth, failures to answers, the small endpoints;
- ``config``: ``HttpConfig``, the settings ``ponder serve`` passes in.

Only ``config`` is imported with the package; the rest loads on first use
of what it exports. The app pulls in the completion service and with it JAX,
which ``ponder``'s argument parser (it reads ``HttpConfig`` for the defaults
of ``serve``) should not wait for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ponder.server.http.config import HttpConfig

if TYPE_CHECKING:
    from ponder.server.http.app import build_app
    from ponder.server.http.openapi import openapi_document
    from ponder.server.http.streaming import EventStream
    from ponder.server.http.wire import CompletionBody, InfillBody

__all__ = ["CompletionBody", "EventStream", "HttpConfig", "InfillBody", "build_app", "openapi_document"]

_HOMES = {  # export -> module of this package that defines it
    "build_app": "app",
    "openapi_document": "openapi",
    "CompletionBody": "wire",
    "InfillBody": "wire",
    "EventStream": "streaming",
}
_RENAMED = {"_EventStream": "EventStream"}  # the names tests/test_http.py still imports


def __getattr__(name: str):
    export = _RENAMED.get(name, name)
    if export not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[export]}"), export)
