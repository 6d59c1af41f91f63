"""The engine's scheduling policy, as pure functions of what is waiting and running.

Each iteration of the engine loop starts one waiting job (``pick_next``:
the one with the least prompt to compute), runs one more prefill call of the
oldest long prompt in progress, and takes one decode step (``dispatch``).
A prompt with more than ``SLICE_TOKENS`` to compute is parked between its
calls, holding its slot, so a cold document delays others' keystrokes and
tokens by one call, not by its whole prefill (docs/design.md, "Server").

Nothing here touches a model or a lock: the engine passes in what it sees.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Callable

from ponder.server.types import Job

PATIENCE_S = 0.5  # a job waiting this long is admitted next, however much prompt it brings
SLICE_TOKENS = 256  # a prompt with more to compute is prefilled this much per engine iteration


def free_slots(slots: int, running: collections.abc.Collection[int], reserved: collections.abc.Collection[int]) -> list[int]:
    """The decode slots neither running a job nor reserved by a prompt being prefilled, lowest first.

    Jobs take the lowest free slot, so a lone stream sits in slot 0.
    """
    return [i for i in range(slots) if i not in running and i not in reserved]


def clashes(job: Job, other: Job) -> bool:
    """Whether ``job`` may need the session ``other`` is using (an anonymous job may match any session of its key)."""
    ids = (job.session_id, other.session_id)
    return job.api_key == other.api_key and (None in ids or ids[0] == ids[1])


def pick_next(waiting: collections.abc.Sequence[Job], parked: collections.abc.Sequence[Job],
              committed: Callable[[Job], int], now: float) -> Job | None:
    """The waiting job to start next, or None when every waiting job must wait.

    A keystroke in a warm session costs one ``extend``; a cold document
    costs a prefill of all of it. Taking the cheap ones first keeps warm
    TTFT low while cold prompts arrive; a job waiting ``PATIENCE_S`` goes
    first regardless, so none starves. The estimate is the prompt minus
    what the session has committed (an edit looks cheaper than it is).
    While a long prompt is being prefilled, other long ones wait (they go
    one at a time), and so does a job whose session may be the one being
    prefilled.

    Args:
      waiting: the queue, oldest first.
      parked: the jobs whose prompts are being prefilled a slice at a time.
      committed: tokens of a job's prompt its session already holds (``SessionStore.committed``).
      now: ``time.monotonic()``.
    """

    def work(job: Job) -> int:
        return len(job.tokens) - committed(job)

    ready = [job for job in waiting
             if not (parked and (work(job) > SLICE_TOKENS or any(clashes(job, other) for other in parked)))]
    if not ready:
        return None
    oldest = ready[0]
    if now - oldest.arrival < PATIENCE_S:
        oldest = min(ready, key=work)  # the first of equals: arrival order otherwise
    return oldest


def dispatch(running: int, prefilling: int, waiting: int, admitted: bool, slots: int) -> bool:
    """Whether this iteration takes a decode step.

    Skipped when nothing decodes, and while a job was just admitted and more
    are waiting for free slots: they join before the step, so a burst of
    requests starts decoding together.

    Args:
      running: jobs decoding; prefilling: prompts parked between slices (each holds a slot);
      waiting: jobs queued; admitted: whether this iteration started a job; slots: decode slots.
    """
    return running > 0 and not (admitted and waiting > 0 and running + prefilling < slots)
