"""The gRPC front end: a thin adapter from ``ponder.v1.Completion`` onto the completion service.

A threaded ``grpc.server``: each call blocks on its job's events
(``CompletionService.stream_sync``) and polls ``context.is_active()``, so a
client that cancels frees its decode slot within one engine step. Errors
map to status codes with a readable message: a bad field is
``INVALID_ARGUMENT`` naming it, a full queue ``RESOURCE_EXHAUSTED``, a server
still warming up or draining ``UNAVAILABLE``, a missing or wrong key
``UNAUTHENTICATED``, a passed deadline ``DEADLINE_EXCEEDED``. The standard
health service reports SERVING once the engine is warm; reflection lists
the services.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ponder.model.sampling import Sampling
from ponder.server.auth import Unauthenticated, authenticate
from ponder.server.metrics import RequestRecord, ServerMetrics, finish_outcome
from ponder.server.service import CompletionRequest, CompletionService, Final
from ponder.server.types import NotReady, QueueFull, RequestError
from ponder.v1 import completion_pb2 as pb
from ponder.v1 import completion_pb2_grpc as pb_grpc

log = logging.getLogger("ponder.grpc")

FINISH = {"stop": pb.STOP, "length": pb.LENGTH, "cancelled": pb.CANCELLED, "deadline": pb.DEADLINE}
_CODES = {RequestError: grpc.StatusCode.INVALID_ARGUMENT, QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
          NotReady: grpc.StatusCode.UNAVAILABLE}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Completion"].full_name


def _usage(usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens, generated_tokens=usage.generated_tokens,
        chunks_updated=usage.chunks_updated, chunks_skipped=usage.chunks_skipped, ttt_flops=usage.ttt_flops,
    )


def _update_rate(request) -> float | None:
    return request.update_rate if request.HasField("update_rate") else None


def _sampling(request: pb.CompleteRequest) -> Sampling:
    """llama.cpp's controls (absent repeat_penalty / repeat_last_n: its defaults), the temperature first."""
    return Sampling(
        temperature=request.temperature,
        top_p=request.top_p if request.top_p > 0 else 1.0,
        top_k=request.top_k,
        min_p=request.min_p,
        repeat_penalty=request.repeat_penalty if request.HasField("repeat_penalty") else 1.0,
        repeat_last_n=request.repeat_last_n if request.HasField("repeat_last_n") else 64,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        seed=request.seed,
    )


class CompletionServicer(pb_grpc.CompletionServicer):
    def __init__(self, service: CompletionService, metrics: ServerMetrics, api_keys: tuple[str, ...]):
        self.service, self.metrics, self.api_keys = service, metrics, api_keys

    def _api_key(self, context) -> str:
        """The caller's key ("" without auth); else ``Unauthenticated`` (``_errors`` answers UNAUTHENTICATED)."""
        return authenticate(dict(context.invocation_metadata()).get("authorization", ""), self.api_keys)

    def _request(self, context, **fields) -> CompletionRequest:
        remaining = context.time_remaining()
        return CompletionRequest(
            api_key=self._api_key(context),
            deadline_s=None if remaining is None or remaining > 1e6 else remaining,
            **fields,
        )

    @contextlib.contextmanager
    def _errors(self, context, record: RequestRecord):
        """Maps the service's refusals and any unexpected failure to a status with a readable message."""
        try:
            yield
        except Unauthenticated:
            record.done("client_error")  # as HTTP counts its 401s
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key: send metadata 'authorization: Bearer KEY'")
        except (RequestError, QueueFull, NotReady) as error:
            record.done("client_error" if isinstance(error, RequestError) else "rejected")
            context.abort(_CODES[type(error)], str(error))
        except Exception as error:
            if context.code() is not None:  # an abort of our own, already answered
                raise
            log.exception("%s failed", record.endpoint)
            record.done("error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}: {error})")
        finally:
            if record.outcome is None:  # the client went away mid-stream (GeneratorExit)
                record.done("cancelled")

    def Complete(self, request, context):
        record = RequestRecord(self.metrics, "grpc.Complete")
        with self._errors(context, record):
            stream = self.service.stream_sync(
                self._request(
                    context,
                    prompt=request.prompt,
                    suffix=request.suffix if request.HasField("suffix") else None,
                    extra=tuple((e.name, e.text) for e in request.extra),
                    max_tokens=request.max_tokens,
                    sampling=_sampling(request),
                    stop=tuple(request.stop),
                    session_id=request.session_id or None,
                    document_id=request.document_id or None,
                    reset=request.reset,
                    update_rate=_update_rate(request),
                    time_budget_s=request.time_budget_ms / 1000 if request.time_budget_ms > 0 else None,
                ),
                is_active=context.is_active,
            )
            for item in stream:
                if isinstance(item, Final):
                    record.done(finish_outcome(item.finish_reason), completed=True)
                    if item.finish_reason == "deadline":
                        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed during generation")
                    yield pb.CompleteResponse(
                        usage=_usage(item.usage), finish_reason=FINISH[item.finish_reason], session_id=item.session_id
                    )
                    return
                if item.text or item.token_ids:
                    record.token()
                yield pb.CompleteResponse(text=item.text, token_ids=item.token_ids, chunk_lambda=item.chunk_lambda)

    def Ingest(self, request, context):
        record = RequestRecord(self.metrics, "grpc.Ingest")
        with self._errors(context, record):
            fields = dict(prompt=request.text, max_tokens=0, session_id=request.session_id or None,
                          document_id=request.document_id or None, reset=request.reset, update_rate=_update_rate(request))
            final = next(item for item in self.service.stream_sync(self._request(context, **fields), context.is_active)
                         if isinstance(item, Final))
            record.done(finish_outcome(final.finish_reason), completed=True)
            return pb.IngestResponse(usage=_usage(final.usage), session_id=final.session_id, chunk_lambda=final.chunk_lambda)

    def ResetSession(self, request, context):
        record = RequestRecord(self.metrics, "grpc.ResetSession")
        with self._errors(context, record):
            if not request.session_id:
                raise RequestError("session_id", "must be non-empty")
            existed = self.service.reset(self._api_key(context), request.session_id)
            record.done("ok")
            return pb.ResetSessionResponse(existed=existed)


class _Malformed:
    """A request that did not parse, handed to the method in its place."""

    def __init__(self, error: Exception):
        self.error = error


class MalformedRequests(grpc.ServerInterceptor):
    """A request that is not a valid message (truncated, a string field that is not UTF-8) is
    INVALID_ARGUMENT saying what is wrong, and a client error in the metrics; grpc on its own
    answers INTERNAL and logs a traceback. Every method of every service gets the check."""

    _HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        service, _, method = details.method.lstrip("/").rpartition("/")
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as error:  # protobuf's DecodeError, or whatever a custom parser raises
                return _Malformed(error)

        def refuse(request, context):
            if isinstance(request, _Malformed):
                if service == SERVICE_NAME:
                    RequestRecord(self.metrics, f"grpc.{method}").done("client_error")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
            return request

        if handler.request_streaming:
            def checked(requests, context):
                return behaviour((refuse(request, context) for request in requests), context)
        else:
            def checked(request, context):
                return behaviour(refuse(request, context), context)

        return self._HANDLERS[handler.request_streaming, handler.response_streaming](
            checked, request_deserializer=deserialize, response_serializer=handler.response_serializer)


def build_grpc_server(
    service: CompletionService, engine, metrics: ServerMetrics, api_keys: tuple[str, ...], address: str, max_workers: int = 16
) -> grpc.Server:
    """The gRPC server on ``address`` (not started): Completion, health and reflection."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ponder-grpc"),
                         interceptors=[MalformedRequests(metrics)])
    pb_grpc.add_CompletionServicer_to_server(CompletionServicer(service, metrics, api_keys), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def watch_readiness():  # SERVING once warm; NOT_SERVING again while draining; ends with the server
        serving = None
        while True:
            now = engine.ready and not engine.draining
            if now != serving:
                status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", SERVICE_NAME):
                    health_servicer.set(name, status)
                serving = now
            if not server.wait_for_termination(timeout=0.1):  # False: stopped, not timed out
                return

    threading.Thread(target=watch_readiness, name="ponder-grpc-health", daemon=True).start()
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} for gRPC")
    return server
