"""What the client returns and raises, the same over HTTP and gRPC.

Results are frozen dataclasses built from either wire format; errors are a
small hierarchy under ``PonderError`` whose messages say what went wrong and
what to do. ``ServerUnavailable`` (and its ``ServerBusy``) are the only ones
the client retries.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "deadline"]


@dataclasses.dataclass(frozen=True)
class Usage:
    """Tokens of one request.

    Attributes:
      prompt_tokens: tokens of the prompt as the model sees it (document start
        and fill-in-the-middle markers included).
      cached_tokens: prompt tokens served from the session's state (not recomputed).
      generated_tokens: tokens generated.
    """

    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished completion (``Client.complete``, and the last item of ``Client.stream``).

    Attributes:
      text: the completion, cut before a stop sequence.
      finish_reason: ``stop`` (end of document or a stop sequence), ``length``
        (``max_tokens``), ``cancelled`` (superseded by a newer request of the
        session) or ``deadline``.
      session_id: the session the request ran in (the server assigns one when
        none was given): send it back to keep the document's state.
      usage: prompt, cached and generated tokens.
      chunks_updated / chunks_skipped: chunks whose fast-weight update ran / the gate skipped.
      ttt_flops: fast-weight update FLOPs spent on this request.
      chunk_lambda: λ of every chunk the TTT layer closed for this request (0: skipped).
      token_ids: the generated tokens (gRPC only; empty over HTTP, whose
        OpenAI answer has no token ids).
    """

    text: str
    finish_reason: FinishReason
    session_id: str
    usage: Usage
    chunks_updated: int
    chunks_skipped: int
    ttt_flops: float
    chunk_lambda: tuple[float, ...]
    token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text of a streamed completion.

    Attributes:
      text: text since the previous delta (may be empty when only λ arrived).
      token_ids: the tokens behind it (gRPC only; empty over HTTP).
      chunk_lambda: λ of the chunks closed since the previous delta.
      tokens: how many generated tokens are behind it (both transports).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    chunk_lambda: tuple[float, ...] = ()
    tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Ingestion:
    """What ``Client.ingest`` did to the session (the fields mean what ``Completion``'s do)."""

    session_id: str
    usage: Usage
    chunks_updated: int
    chunks_skipped: int
    ttt_flops: float
    chunk_lambda: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Health:
    """``ok`` once the server is warm; ``loading`` while it compiles; ``draining`` while it stops
    (over gRPC, whose health service says only SERVING / NOT_SERVING, both of the latter read ``loading``)."""

    status: Literal["ok", "loading", "draining"]

    @property
    def ready(self) -> bool:
        return self.status == "ok"


# --- Errors.


class PonderError(Exception):
    """Anything that went wrong talking to ponder; ``str(error)`` says what and what to do.

    Attributes:
      status: the server's answer: the HTTP status ("503") or the gRPC code
        ("UNAVAILABLE"); None when no answer came (connection refused, reset).
    """

    status: str | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ServerUnavailable(PonderError):
    """The server cannot take the request now: not running, warming up or draining
    (HTTP 503 / connection refused, gRPC UNAVAILABLE). Retried."""


class ServerBusy(ServerUnavailable):
    """Every decode slot and the waiting queue are full (HTTP 429, gRPC RESOURCE_EXHAUSTED). Retried."""


class AuthenticationError(PonderError):
    """The API key is missing or wrong (HTTP 401, gRPC UNAUTHENTICATED)."""


class InvalidRequest(PonderError):
    """The server refused the request (HTTP 4xx, gRPC INVALID_ARGUMENT).

    Attributes:
      field: the request field at fault, as the server names it (None when it names none).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DeadlineExceeded(PonderError):
    """The call's ``timeout`` passed before the answer was complete."""
