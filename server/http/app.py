"""The Starlette app: routes from the endpoint table, auth, failures to answers, and the small endpoints.

Each route authenticates (unless public), runs its handler with a metrics
record, and maps what the handler raises to an answer in the reference
APIs' error shape: ``ApiError`` as it says, the service's ``RequestError``
to a 400 naming the front end's field, a full queue to 429, a server still
warming up or draining to 503, a client that left to 499. Only an
unexpected exception is a 500, and it is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ponder.server.auth import Unauthenticated, authenticate
from ponder.server.engine import BUDGETED
from ponder.server.http.config import HttpConfig
from ponder.server.http.errors import ApiError, ClientGone
from ponder.server.http.hosts import TrustedHosts
from ponder.server.http.llama import LlamaServing
from ponder.server.http.openai import OpenAIServing
from ponder.server.http.openapi import OPERATIONS, Operation, openapi_document
from ponder.server.http.request_schema import ServedLimits
from ponder.server.http.ui import SessionPages
from ponder.server.http.wire import Health, ModelCard, ModelList, SessionReset, json_response
from ponder.server.metrics import RequestRecord, ServerMetrics
from ponder.server.service import CompletionService
from ponder.server.types import NotReady, QueueFull, RequestError

log = logging.getLogger("ponder.http")

Handler = Callable[[Request, str, RequestRecord], Awaitable[Response]]  # (request, api_key, call) -> answer


def build_app(
    service: CompletionService,
    engine,
    metrics: ServerMetrics,
    api_keys: tuple[str, ...] = (),
    max_body_bytes: int = HttpConfig.max_body_bytes,
    model_name: str = HttpConfig.model_name,
    ui: bool = HttpConfig.ui,
    body_timeout_s: float = HttpConfig.body_timeout_s,
    allowed_hosts: tuple[str, ...] = HttpConfig.allowed_hosts,
) -> Starlette:
    """The HTTP front end of ``service``.

    Args:
      service: the completion service every endpoint runs through.
      engine: read for readiness (``ready``, ``draining``: ``/health``) and by ``/ui``
        (a session's committed tokens, the model and its schedule).
      metrics: requests by endpoint and outcome, TTFT and latency are recorded here; ``/metrics`` renders it.
      api_keys: bearer tokens, any of which authenticates (empty: no auth). ``/health``,
        ``/metrics`` and ``/openapi.json`` are always public. The matched key scopes the sessions.
      max_body_bytes: larger request bodies are refused with 413.
      model_name: the name ``/v1/models`` and the answers report.
      ui: serve ``/ui`` on a server without ``api_keys`` (``--ui``); with keys it is always on.
      body_timeout_s: a request body not whole after this long is refused with 408.
      allowed_hosts: the ``Host`` names answered, others refused with 403 (empty: any; ``hosts.allowed_hosts``).

    Returns:
      A Starlette app to serve with uvicorn.
    """
    config = HttpConfig(tuple(api_keys), max_body_bytes, model_name, ui=ui, body_timeout_s=body_timeout_s,
                        allowed_hosts=tuple(allowed_hosts))
    endpoints = _Endpoints(service, engine, metrics, config)
    handlers: dict[str, Handler] = {
        "completions": OpenAIServing(service, config).completions,
        "infill": LlamaServing(service, config).infill,
        "models": endpoints.models,
        "reset_session": endpoints.reset_session,
        "ui": endpoints.ui,
        "health": endpoints.health,
        "prometheus": endpoints.prometheus,
        "openapi": endpoints.openapi,
    }
    routes = [_route(op, handlers[op.handler], metrics, config.api_keys) for op in OPERATIONS]
    middleware = [Middleware(TrustedHosts, hosts=config.allowed_hosts)] if config.allowed_hosts else []
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, middleware=middleware)


def _route(op: Operation, handler: Handler, metrics: ServerMetrics, api_keys: Sequence[str]) -> Route:
    """``op``'s route: auth, then ``handler``, every failure answered as the reference APIs do."""

    async def endpoint(request: Request) -> Response:
        call = RequestRecord(metrics, op.handler)
        try:
            key = "" if op.public else _api_key(request, api_keys)
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
        except (ClientGone, ClientDisconnect):  # before the answer, or while its body was arriving
            call.done("cancelled")
            return Response(status_code=499)  # nobody is listening
        except Exception as err:
            log.exception("%s %s failed", request.method, request.url.path)
            call.done("error")
            return ApiError(500, f"internal error ({type(err).__name__}: {err})", kind="server_error").response()

    # A session id is any text a body may carry: slashes (editors use the file's path), %2F-encoded or not, newlines.
    path = op.path.replace("{session_id}", "{session_id:any}")
    return Route(path, endpoint, methods=[op.method], name=op.handler)


class _AnyText(Convertor[str]):
    """A path segment that matches any text, ``/`` and newlines included (Starlette's ``path`` stops at a newline)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any", _AnyText())


def _api_key(request: Request, api_keys: Sequence[str]) -> str:
    """The caller's key ("" without auth); else 401."""
    try:
        return authenticate(request.headers.get("authorization", ""), api_keys)
    except Unauthenticated:
        message = "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
        raise ApiError(401, message, kind="authentication_error") from None


async def _http_error(request: Request, err: HTTPException) -> Response:
    """Starlette's own 404 / 405, in the same JSON shape as every other error."""
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    response = ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", kind=kind).response()
    response.headers.update(err.headers or {})  # a 405's Allow
    return response


class _Endpoints:
    """The endpoints besides the two completion APIs: model, sessions, λ viewer, health, metrics, this document."""

    def __init__(self, service: CompletionService, engine, metrics: ServerMetrics, config: HttpConfig):
        self.service, self.engine, self.metrics, self.config = service, engine, metrics, config
        self.started = int(time.time())
        limits = ServedLimits(service.max_new_tokens, engine.config.schedule.kind in BUDGETED, service.limits.max_stop,
                              service.limits.max_stop_chars)
        self.document = openapi_document(config.model_name, bool(config.api_keys), limits)
        self.pages = SessionPages(engine, service.tokenizer, bool(config.api_keys) or config.ui, config.ui_max_tokens)

    async def models(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        call.done("ok")
        return json_response(ModelList(data=[ModelCard(id=self.config.model_name, created=self.started)]))

    async def reset_session(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        session_id = request.path_params["session_id"]
        existed = self.service.reset(api_key, session_id)
        call.done("ok")
        return json_response(SessionReset(session_id=session_id, existed=existed))

    async def ui(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        html = await self.pages.page(api_key, request.query_params.get("session_id", ""))
        call.done("ok")
        return Response(html, media_type="text/html")

    async def health(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        if self.engine.draining:
            return json_response(Health(status="draining"), 503)
        if not self.engine.ready:
            return json_response(Health(status="loading"), 503)
        return json_response(Health(status="ok"))

    async def prometheus(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        text, content_type = self.metrics.render()
        return Response(text, headers={"Content-Type": content_type})

    async def openapi(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        return json_response(self.document)

