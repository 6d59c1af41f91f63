"""What every transport is handed: the request in ponder's terms, and its deadline."""

from __future__ import annotations

import dataclasses
import time

from ponder.client.results import DeadlineExceeded


@dataclasses.dataclass(frozen=True)
class Request:
    """A completion (``max_tokens`` 0: an ingestion) before it is put on a wire."""

    prefix: str
    suffix: str | None = None
    session: str | None = None
    document: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    update_rate: float | None = None  # the session's target update rate from this request on; None: its last one


class Deadline:
    """A call's ``timeout``, fixed when the call starts and shared by its retries.

    ``timeout`` None: no deadline (``remaining()`` is None).
    """

    def __init__(self, timeout: float | None):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
        self.timeout = timeout
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left; raises ``DeadlineExceeded`` once none are."""
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.exceeded()
        return left

    def exceeded(self, what: str = "") -> DeadlineExceeded:
        detail = f" ({what})" if what else ""
        return DeadlineExceeded(
            f"the {self.timeout:g} s timeout passed before ponder finished answering{detail}: "
            "raise the timeout, or ask for fewer tokens"
        )
