"""The gRPC transport: ``ponder.v1.Completion`` and the standard health service, over grpcio.

Messages are built and read by plain functions that the threaded
(``GrpcTransport``) and ``grpc.aio`` (``AsyncGrpcTransport``) transports
share. ``Complete`` is server-streaming for both ``complete`` and ``stream``:
text deltas carry token ids and λ, the last message the usage and finish
reason. The API key goes in ``authorization: Bearer KEY`` metadata; the
timeout is the call's gRPC deadline; status codes become the client's
exceptions with the server's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ponder.client._request import Deadline, Request
from ponder.client.results import (
    AuthenticationError,
    Completion,
    Delta,
    Health,
    Ingestion,
    InvalidRequest,
    PonderError,
    ServerBusy,
    ServerUnavailable,
    Usage,
)
from ponder.v1 import completion_pb2 as pb
from ponder.v1 import completion_pb2_grpc as pb_grpc

FINISH = {pb.STOP: "stop", pb.LENGTH: "length", pb.CANCELLED: "cancelled", pb.DEADLINE: "deadline"}


def complete_message(request: Request) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        prompt=request.prefix, suffix=request.suffix, max_tokens=request.max_tokens, temperature=request.temperature,
        seed=request.seed, stop=list(request.stop), session_id=request.session or "", document_id=request.document or "",
        update_rate=request.update_rate,
    )


def ingest_message(request: Request) -> pb.IngestRequest:
    return pb.IngestRequest(text=request.prefix, session_id=request.session or "", document_id=request.document or "",
                            update_rate=request.update_rate)


def _figures(usage: pb.Usage) -> dict:
    return dict(
        usage=Usage(usage.prompt_tokens, usage.cached_tokens, usage.generated_tokens),
        chunks_updated=usage.chunks_updated, chunks_skipped=usage.chunks_skipped, ttt_flops=usage.ttt_flops,
    )


def ingestion_from_message(answer: pb.IngestResponse) -> Ingestion:
    return Ingestion(session_id=answer.session_id, chunk_lambda=tuple(answer.chunk_lambda), **_figures(answer.usage))


class MessageFolder:
    """Folds ``CompleteResponse`` messages into ``Delta``s and, on the one carrying usage, the ``Completion``."""

    def __init__(self, target: str):
        self.target = target
        self.text, self.token_ids, self.chunk_lambda, self.done = [], [], [], False

    def feed(self, message: pb.CompleteResponse) -> Delta | Completion:
        self.text.append(message.text)
        self.token_ids += message.token_ids
        self.chunk_lambda += message.chunk_lambda
        if not message.HasField("usage"):
            return Delta(message.text, tuple(message.token_ids), tuple(message.chunk_lambda), len(message.token_ids))
        self.done = True
        return Completion(
            text="".join(self.text), finish_reason=FINISH.get(message.finish_reason, "stop"), session_id=message.session_id,
            chunk_lambda=tuple(self.chunk_lambda), token_ids=tuple(self.token_ids), **_figures(message.usage),
        )

    def check_ended(self) -> None:
        if not self.done:
            raise PonderError(f"the stream from {self.target} ended without its final message")


def error_from_status(err: grpc.RpcError, target: str, deadline: Deadline) -> PonderError:
    """The exception for a failed call: the server's message and code, the field for INVALID_ARGUMENT."""
    error = _error_for(err.code(), err.details() or "", target, deadline)
    error.status = err.code().name
    return error


def _error_for(code: grpc.StatusCode, details: str, target: str, deadline: Deadline) -> PonderError:
    if code == grpc.StatusCode.UNAVAILABLE:
        if "connect" in details.lower():  # grpc's "failed to connect to all addresses ...; Connection refused"
            return ServerUnavailable(f"cannot reach ponder at {target}: is `ponder serve` running? ({details})")
        return ServerUnavailable(f"ponder at {target} is not ready: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ServerBusy(f"ponder at {target} is busy: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(f"{details} (pass api_key= / --api-key, or set PONDER_API_KEY)")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, _ = details.partition(": ")  # the server's RequestError reads "field: message"
        return InvalidRequest(details, field if sep and field.isidentifier() else None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline.timeout is not None:
        return deadline.exceeded(details)
    return PonderError(f"ponder at {target} failed: {code.name}: {details}")


def _metadata(api_key: str | None) -> tuple:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _route(session: str | None) -> tuple:
    """The x-session-id metadata, which a router in front of several replicas hashes on (deploy/nginx.conf)."""
    return (("x-session-id", quote(session, safe="/")),) if session else ()


def _health(answer: health_pb2.HealthCheckResponse) -> Health:
    return Health("ok" if answer.status == health_pb2.HealthCheckResponse.SERVING else "loading")


class GrpcTransport:
    def __init__(self, target: str, api_key: str | None):
        self.target, self.metadata = target, _metadata(api_key)
        self.channel = grpc.insecure_channel(target)
        self.stub, self.health_stub = pb_grpc.CompletionStub(self.channel), health_pb2_grpc.HealthStub(self.channel)

    def _unary(self, method, message, deadline: Deadline, route: tuple = ()):
        try:
            return method(message, timeout=deadline.remaining(), metadata=self.metadata + route)
        except grpc.RpcError as err:
            raise error_from_status(err, self.target, deadline) from None

    def stream(self, request: Request, deadline: Deadline) -> Iterator[Delta | Completion]:
        folder = MessageFolder(self.target)
        call = self.stub.Complete(complete_message(request), timeout=deadline.remaining(), metadata=self.metadata + _route(request.session))
        try:
            for message in call:
                yield folder.feed(message)
        except grpc.RpcError as err:
            raise error_from_status(err, self.target, deadline) from None
        finally:
            call.cancel()  # a consumer that stops early frees the server's decode slot
        folder.check_ended()

    def complete(self, request: Request, deadline: Deadline) -> Completion:
        *_, final = self.stream(request, deadline)
        return final

    def ingest(self, request: Request, deadline: Deadline) -> Ingestion:
        return ingestion_from_message(self._unary(self.stub.Ingest, ingest_message(request), deadline, _route(request.session)))

    def reset(self, session: str, deadline: Deadline) -> bool:
        return self._unary(self.stub.ResetSession, pb.ResetSessionRequest(session_id=session), deadline, _route(session)).existed

    def health(self, deadline: Deadline) -> Health:
        return _health(self._unary(self.health_stub.Check, health_pb2.HealthCheckRequest(service=""), deadline))

    def close(self) -> None:
        self.channel.close()


class AsyncGrpcTransport:
    """``grpc.aio``; the channel is opened on first use, inside the caller's event loop."""

    def __init__(self, target: str, api_key: str | None):
        self.target, self.metadata = target, _metadata(api_key)
        self.channel = None

    def _stubs(self):
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.target)
            self.stub, self.health_stub = pb_grpc.CompletionStub(self.channel), health_pb2_grpc.HealthStub(self.channel)
        return self.stub, self.health_stub

    async def _unary(self, method, message, deadline: Deadline, route: tuple = ()):
        try:
            return await method(message, timeout=deadline.remaining(), metadata=self.metadata + route)
        except grpc.RpcError as err:
            raise error_from_status(err, self.target, deadline) from None

    async def stream(self, request: Request, deadline: Deadline) -> AsyncIterator[Delta | Completion]:
        folder = MessageFolder(self.target)
        stub, _ = self._stubs()
        call = stub.Complete(complete_message(request), timeout=deadline.remaining(), metadata=self.metadata + _route(request.session))
        try:
            async for message in call:
                yield folder.feed(message)
        except grpc.RpcError as err:
            raise error_from_status(err, self.target, deadline) from None
        finally:
            call.cancel()
        folder.check_ended()

    async def complete(self, request: Request, deadline: Deadline) -> Completion:
        final = None
        async for final in self.stream(request, deadline):
            pass
        return final

    async def ingest(self, request: Request, deadline: Deadline) -> Ingestion:
        return ingestion_from_message(await self._unary(self._stubs()[0].Ingest, ingest_message(request), deadline, _route(request.session)))

    async def reset(self, session: str, deadline: Deadline) -> bool:
        answer = await self._unary(self._stubs()[0].ResetSession, pb.ResetSessionRequest(session_id=session), deadline, _route(session))
        return answer.existed

    async def health(self, deadline: Deadline) -> Health:
        return _health(await self._unary(self._stubs()[1].Check, health_pb2.HealthCheckRequest(service=""), deadline))

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
