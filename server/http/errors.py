"""Answers other than 200, and the request checks that produce most of them.

A server never answers 5xx to a client's mistake: the body must say it is
JSON (415: a web page can send other types to a local server without the
browser asking first), arrive in time (408) and within its cap (413), decode
(400 for bad UTF-8 or JSON) and validate (400 naming each offending field)
before anything runs. The rest of the mapping (the
service's refusals to 400 / 429 / 503, a vanished client to 499, anything
unexpected to a logged 500) is the router's, in ``app.py``.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ponder.server.http.wire import ErrorAnswer, ErrorDetail, RequestBody, json_response

Body = TypeVar("Body", bound=RequestBody)  # an endpoint's request model


class ApiError(Exception):
    """An answer other than 200: the status, a message that says what to do, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> Response:
        # A 408's body never arrived whole: the connection cannot carry another request.
        headers = {401: {"WWW-Authenticate": "Bearer"}, 408: {"Connection": "close"}}.get(self.status)
        detail = ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.status)
        return json_response(ErrorAnswer(error=detail), self.status, headers)


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def read_body(request: Request, model: type[Body], limit: int, timeout_s: float) -> Body:
    """The request's JSON body, validated as ``model``.

    Args:
      request: the request; its body is read here.
      model: the endpoint's request model.
      limit: most bytes the body may hold (the server's ``--max-body-bytes``).
      timeout_s: how long the whole body may take to arrive (the server's ``--body-timeout-s``).

    Returns:
      The validated body.

    Raises:
      ApiError: 415 unless ``Content-Type`` is JSON; 408 for a body still incomplete after
        ``timeout_s``; 413 past ``limit`` (declared or actually sent); 400 for a bad
        ``Content-Length``, bad UTF-8, bad JSON or a body ``model`` rejects.
    """
    _check_json_type(request.headers.get("content-type"))
    try:
        raw = await asyncio.wait_for(_read_bytes(request, limit), timeout_s)
    except TimeoutError:
        raise ApiError(408, f"request body: not all of it arrived within {timeout_s:g} s (the server's "
                            "--body-timeout-s); send the whole body at once", kind="timeout_error") from None
    return _parse(raw, model)


def _check_json_type(content_type: str | None) -> None:
    """415 unless ``content_type`` is ``application/json`` (or a ``+json`` type), with any parameters."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        got = f"got {content_type!r}" if content_type else "got none"
        raise ApiError(415, f"Content-Type: the body must be JSON, sent with the header 'Content-Type: application/json' "
                            f"({got})")


async def _read_bytes(request: Request, limit: int) -> bytes:
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


def _parse(raw: bytes, model: type[Body]) -> Body:
    """Decodes and validates a JSON body; every failure is a 400 that says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8: byte {raw[err.start]:#04x} at offset {err.start}") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as err:
        raise _describe(err) from None


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

