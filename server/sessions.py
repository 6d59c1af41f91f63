"""Sessions: each document's committed state, kept in memory under a cap.

A session is ``(api_key, session_id)`` and holds a document's committed
tokens (always whole chunks), the TTT state after them, the base's KV cache,
and snapshots of the state at earlier chunk boundaries (docs/design.md,
"Sessions"). A job's prompt is compared with the committed tokens: the
session rolls back to the last snapshot at or before the first difference
(nothing, when the prompt extends the history), and the engine computes
the rest. ``plan_prompt`` says which part of a prompt may be committed.

A session also holds a budget (``rate``: the target update rate of
budgeted schedules), which its state carries from the document's start. A
job that changes it rolls the session back to an empty document at the new
rate, so that a reused session still computes what a cold start at that
rate computes. The last rate a session was given outlives its state (a new
document, an eviction), as the model keeps a row's target across documents.

A session's bytes are all it keeps: the arrays of its state, cache and
snapshots, measured with the ``state_bytes`` function the store is given (the
runner's; the store knows nothing of arrays, so it is tested without a
model), and the Python objects around them: its ids, its committed tokens
(a list of ints), its snapshot list, its entry in the store. A remembered
rate counts too. Ids are bounded (``MAX_ID_CHARS``, checked by the service).

Memory is shared fairly between API keys (docs/design.md, "Sessions"): over
the cap, the least recently used sessions of the keys holding more than their
fair share (the cap split evenly among the keys that hold sessions) go first,
so one key cannot push out every other key's sessions. The store is not
thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import numbers
import sys
from collections.abc import Callable
from typing import Any

from ponder.runtime import HeapTrimmer
from ponder.server.metrics import ServerMetrics
from ponder.server.types import Job, RequestError

MAX_ID_CHARS = 400  # a session_id or document_id: a file's path fits; more would be memory a session keeps for nothing


def check_id(field: str, value: str | None) -> None:
    """Refuses a ``session_id`` / ``document_id`` (``field``) longer than ``MAX_ID_CHARS``."""
    if value is not None and len(value) > MAX_ID_CHARS:
        raise RequestError(field, f"at most {MAX_ID_CHARS} characters, got {len(value)}")


@dataclasses.dataclass(eq=False)
class Session:
    """One document's committed state (see the module docstring)."""

    api_key: str
    session_id: str
    document_id: str | None
    tokens: list[int]  # committed tokens (whole chunks)
    doc: Any  # state after ``tokens``
    cache: Any | None  # base keys/values of the window ``window`` (None: not built)
    window: int  # document position of cache slot 0
    snapshots: list[tuple[int, Any]]  # (boundary, state), ascending
    rate: float  # the budget ``doc`` and the snapshots were computed under
    counted: int = 0  # its bytes in ``SessionStore.bytes``, as last measured
    anonymous: bool = False  # made for a job without a session id: only such jobs may join it by prefix

    def commit(self, tokens: list[int], doc, keep: int, anchor: int = 0) -> None:
        """Commits ``tokens`` (the whole history, ending on a chunk boundary) with the state after them.

        A snapshot of the state is taken at the boundary; the ``keep`` latest are kept, and with an
        ``anchor``, also the latest at a multiple of it (a window block's start, where fast weights that
        change the keys can be rolled back to exactly).
        """
        self.tokens = tokens
        self.doc = doc
        self.snapshots.append((len(tokens), doc))
        kept = self.snapshots[-keep:]
        anchored = [s for s in self.snapshots if anchor and s[0] % anchor == 0][-1:]
        self.snapshots[:] = (anchored if anchored and anchored[0][0] < kept[0][0] else []) + kept


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclasses.dataclass(frozen=True)
class PromptPlan:
    """Which part of a job's prompt is committed to its session and which is scratch.

    Attributes:
      tokens: the prompt from its last end-of-document token (a document starts there).
      commit_end: tokens ``[:commit_end]`` (whole chunks) enter the session.
      scratch_end: tokens ``[commit_end:scratch_end]`` (whole chunks) run on a scratch copy; the rest
        (at least the last token) is the open chunk for ``extend``. Equal to ``commit_end`` for an
        ingestion, which ends there.
    """

    tokens: list[int]
    commit_end: int
    scratch_end: int


def plan_prompt(job: Job, chunk: int, eot_id: int) -> PromptPlan:
    """Splits ``job``'s prompt into committed whole chunks, scratch chunks and the open chunk.

    A completion keeps at least its last token for ``extend`` (which samples
    the first new token); a ``commit_limit`` (a fill-in-the-middle suffix
    after it) stops the committed part earlier.
    """
    tokens = job.tokens
    eot_at = max(i for i, t in enumerate(tokens) if t == eot_id) if eot_id in tokens else 0
    tokens = tokens[eot_at:] if eot_at else tokens
    L = len(tokens)
    limit = L if job.commit_limit is None else max(0, min(L, job.commit_limit - eot_at))
    last = L if job.max_new_tokens == 0 else L - 1
    commit_end = min(last, limit) // chunk * chunk
    scratch_end = commit_end if job.max_new_tokens == 0 else (L - 1) // chunk * chunk
    return PromptPlan(tokens, commit_end, scratch_end)


# The schedules that read a budget (``GateHistory.target``, model/gating.py): a session's
# ``update_rate`` sets it; under the others a rate would change nothing, so it is refused.
BUDGETED = ("random", "random_learned", "threshold", "learned_budget", "policy")


def check_update_rate(rate, schedule: str, fixed_kind: str | None = None) -> None:
    """Refuses an ``update_rate`` that is not a number in [0, 1], or that the server's ``schedule`` would not read
    (``fixed_kind``: the checkpoint's fast weights, In-Place or LoRA, read no budget under any schedule)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:
        raise RequestError("update_rate", f"must be a number in [0, 1] (the share of chunks whose fast weights "
                                          f"update), got {rate!r}")
    if fixed_kind is not None:
        raise RequestError("update_rate", f"this checkpoint's {fixed_kind} fast weights follow the fixed "
                                          f"schedule {schedule!r} and read no per-session budget: leave update_rate out")
    if schedule not in BUDGETED:
        raise RequestError("update_rate", f"the server's schedule {schedule!r} reads no budget: leave update_rate out, "
                                          f"or serve a budgeted schedule (ponder serve --schedule {' / '.join(BUDGETED)})")


RATES_KEPT = 1 << 14  # sessions per API key whose last given rate is remembered (the least recently given go first)
INT_BYTES = 32  # a token id as a Python int, as allocated (ids below 257 are shared objects; counted all the same)
ENTRY_BYTES = 128  # a session's key (a tuple) and its entry in the store's ordered dict
SNAPSHOT_BYTES = sys.getsizeof((0, None)) + INT_BYTES  # a snapshot's (boundary, state) tuple and its boundary
RATE_BYTES = 128  # a remembered rate's float and its entry (its session id is counted apart)


def python_bytes(session: Session) -> int:
    """Bytes of the Python objects ``session`` keeps besides its arrays: itself, its ids, its committed
    tokens, its snapshot list and its entry in the store. (The API key is the server's own string.)"""
    ids = sum(sys.getsizeof(i) for i in (session.session_id, session.document_id) if i is not None)
    tokens = sys.getsizeof(session.tokens) + INT_BYTES * len(session.tokens)
    snapshots = sys.getsizeof(session.snapshots) + SNAPSHOT_BYTES * len(session.snapshots)
    return sys.getsizeof(session) + sys.getsizeof(session.__dict__) + ENTRY_BYTES + ids + tokens + snapshots


class SessionStore:
    """Sessions by ``(api_key, session_id)``, least recently used first, with their bytes counted.

    Args:
      chunk: tokens per chunk: an anonymous job joins an anonymous session sharing at least one chunk with it.
      eot_id: the end-of-document token: inside a prompt, it starts a new document.
      memory_bytes: cap on the bytes sessions hold (``evict`` drops the least recently used, of the keys
        over their fair share first).
      snapshots: chunk-boundary snapshots kept per session.
      empty_doc: the state of an empty document with a given budget (a session's start, a rollback
        past every snapshot, a new rate).
      state_bytes: the bytes of a state, a cache, or a list of them.
      metrics: session counters and gauges.
      default_rate: the budget of a session never given one (the schedule's ``rate``).
      trim_heap: called after an eviction dropped sessions (default ``ponder.runtime.HeapTrimmer``: their
        arrays' memory goes back to the kernel).
      block: nonzero when the KV cache depends on the fast weights (In-Place, LoRA): a window re-encoded
        by the base then matches a cold start only at a multiple of ``block`` (a window block's start), so
        a rollback that would re-encode one elsewhere goes back to such a snapshot (each session keeps
        its latest one) or to the empty document.
      window_start: the document position of the window that encodes a position (with ``block``).
    """

    def __init__(self, chunk: int, eot_id: int, memory_bytes: float, snapshots: int, empty_doc: Callable[[float], Any],
                 state_bytes: Callable[[Any], int], metrics: ServerMetrics, default_rate: float,
                 trim_heap: Callable[[], Any] | None = None, block: int = 0,
                 window_start: Callable[[int], int] | None = None):
        self.block, self.window_start = block, window_start
        self.trim_heap = trim_heap if trim_heap is not None else HeapTrimmer()
        self.chunk, self.eot_id, self.memory_bytes, self.snapshots = chunk, eot_id, memory_bytes, snapshots
        self.empty_doc, self.state_bytes, self.metrics, self.default_rate = empty_doc, state_bytes, metrics, default_rate
        self._sessions: collections.OrderedDict[tuple[str, str], Session] = collections.OrderedDict()
        # api_key -> session_id -> the last rate given, least recently given first (at most RATES_KEPT per key)
        self._rates: dict[str, collections.OrderedDict[str, float]] = {}
        self.bytes = 0  # the sessions' bytes as last measured (``count``), remembered rates included
        self.key_bytes: collections.Counter[str] = collections.Counter()  # ``bytes`` by API key
        self._anonymous = itertools.count(1)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        """The sessions, least recently used first."""
        return iter(list(self._sessions.values()))

    def get(self, api_key: str, session_id: str) -> Session | None:
        return self._sessions.get((api_key, session_id))

    def rate(self, api_key: str, session_id: str) -> float:
        """The session's budget: the last rate it was given (``default_rate`` if none), held or not."""
        session = self.get(api_key, session_id)
        return session.rate if session is not None else self._rates.get(api_key, {}).get(session_id, self.default_rate)

    def committed(self, job: Job) -> int:
        """Tokens of ``job``'s prompt its session may already hold: what a job need not compute (an estimate).

        0 for a session that is new, or that the job resets, moves to another document or gives another rate.
        """
        session = self.get(job.api_key, job.session_id) if job.session_id is not None else None
        fresh = session is None or job.reset or job.document_id not in (None, session.document_id)
        return 0 if fresh or job.update_rate not in (None, session.rate) else len(session.tokens)

    def session_for(self, job: Job) -> Session:
        """The job's session, created or reset as the job asks, and now the most recently used.

        Without a session id (llama.cpp's habit), the key's anonymous session
        (one made for such a job) sharing the longest prefix with the prompt (a
        chunk at least), or a new ``anonymous-N``. A named session is never
        joined so: a job without its id must neither change it nor learn it. A reset, a new document id, or an end-of-document
        token inside the prompt starts the session afresh; a job's
        ``update_rate`` other than the rate of the session's state restarts
        it at that rate, which the session keeps from then on.
        """
        session_id = job.session_id
        if session_id is None:
            best, best_len = None, self.chunk - 1
            for (key, _), s in self._sessions.items():
                if key == job.api_key and s.anonymous:
                    n = common_prefix(s.tokens, job.tokens)
                    if n > best_len:
                        best, best_len = s, n
            session_id = best.session_id if best is not None else f"anonymous-{next(self._anonymous)}"
        key = (job.api_key, session_id)
        rate = job.update_rate if job.update_rate is not None else self.rate(*key)
        if job.update_rate is not None or session_id in self._rates.get(job.api_key, {}):
            self._remember_rate(job.api_key, session_id, rate)
        session = self.get(*key)
        reason = None
        if session is not None and job.reset:
            reason = "explicit"
        elif session is not None and job.document_id is not None and session.document_id not in (None, job.document_id):
            reason = "document"
        elif session is not None and self.eot_id in job.tokens[1:]:
            reason = "end_of_document"
        if reason is not None:
            self.metrics.sessions_reset.labels(reason).inc()
            self._drop(session)
            session = None
        self.metrics.session_lookups.labels("miss" if session is None else "hit").inc()
        if session is None:
            session = Session(job.api_key, session_id, job.document_id, [], self.empty_doc(rate), None, 0, [], rate,
                              anonymous=job.session_id is None)
            self._sessions[key] = session
        elif session.rate != rate:
            # The state carries the budget from the document's start: no committed chunk is what a
            # cold start at the new rate computes.
            self.metrics.sessions_reset.labels("rate").inc()
            session.rate = rate
            self._restart(session)
        if job.document_id is not None:
            session.document_id = job.document_id
        self._sessions.move_to_end(key)
        return session

    def _remember_rate(self, api_key: str, session_id: str, rate: float) -> None:
        """Remembers ``rate`` as the session's last (the most recently given last; the key's oldest past RATES_KEPT go)."""
        rates = self._rates.setdefault(api_key, collections.OrderedDict())
        if session_id not in rates:
            self._add_bytes(api_key, sys.getsizeof(session_id) + RATE_BYTES)
        rates[session_id] = rate
        rates.move_to_end(session_id)
        if len(rates) > RATES_KEPT:
            self._forget_rate(api_key, next(iter(rates)))

    def _forget_rate(self, api_key: str, session_id: str) -> None:
        rates = self._rates.get(api_key, {})
        if rates.pop(session_id, None) is not None:
            self._add_bytes(api_key, -(sys.getsizeof(session_id) + RATE_BYTES))
            if not rates:
                del self._rates[api_key]

    def _add_bytes(self, api_key: str, size: int) -> None:
        self.bytes += size
        self.key_bytes[api_key] += size
        if not self.key_bytes[api_key]:
            del self.key_bytes[api_key]  # a key holding nothing takes no share

    def fair_share(self) -> float:
        """The bytes each API key holding sessions may keep before its sessions are evicted first."""
        return self.memory_bytes / max(len(self.key_bytes), 1)

    def reset(self, api_key: str, session_id: str) -> bool:
        """Forgets a session (an explicit reset), its rate included. True if it existed."""
        self._forget_rate(api_key, session_id)
        session = self.get(api_key, session_id)
        if session is not None:
            self._drop(session)
            self.metrics.sessions_reset.labels("explicit").inc()
            self._update_gauges()
        return session is not None

    def _drop(self, session: Session) -> None:
        if self._sessions.pop((session.api_key, session.session_id), None) is not None:
            self._add_bytes(session.api_key, -session.counted)

    def measure(self, session: Session) -> int:
        """Bytes ``session`` holds: the arrays of its cache, snapshots and state, and its Python objects
        (``python_bytes``)."""
        arrays = self.state_bytes((session.cache, [s for _, s in session.snapshots], session.doc))
        return arrays + python_bytes(session)

    def count(self, session: Session) -> None:
        """Brings ``bytes`` up to date with ``session``, which a prefill has just changed.

        Only a prefill changes a session, and each is counted when its prefill
        ends: summing every session's arrays on every request instead took
        ~10 ms with a hundred sessions kept.
        """
        if self.get(session.api_key, session.session_id) is session:  # not dropped meanwhile
            size = self.measure(session)
            self._add_bytes(session.api_key, size - session.counted)
            session.counted = size

    def evict(self, keep: Session, busy: list[Session]) -> None:
        """Drops sessions until the cap holds, never ``keep`` or one in ``busy``: the least recently used
        of the keys holding more than their ``fair_share`` first, then the least recently used of any key."""
        dropped = 0
        for fair in (True, False):
            for key in list(self._sessions):
                if self.bytes <= self.memory_bytes:
                    break
                session = self._sessions.get(key)
                if session is None or session is keep or session in busy:  # sessions compare by identity
                    continue
                if fair and self.key_bytes[session.api_key] <= self.fair_share():
                    continue
                self._drop(session)
                self.metrics.sessions_evicted.inc()
                dropped += 1
        self._update_gauges()
        if dropped:
            del session  # the last dropped session's arrays go before the trim
            self.trim_heap()

    def _update_gauges(self) -> None:
        self.metrics.sessions_active.set(len(self._sessions))
        self.metrics.session_bytes.set(self.bytes)

    def rollback(self, session: Session, tokens: list[int]) -> int:
        """Rolls ``session`` back to its last snapshot at or before where ``tokens`` leaves its history
        (with ``block``, to one where its cache holds the window or a window block starts).

        Returns:
          How many committed tokens remain (the prompt's tokens already computed).
        """
        start = self._rollback(session, tokens)
        while self.block and start % self.block and (session.cache is None
                                                     or self.window_start(start) != session.window):
            start = self._rollback(session, tokens[: start // self.block * self.block])
        return start

    def _rollback(self, session: Session, tokens: list[int]) -> int:
        shared = common_prefix(session.tokens, tokens)
        if shared >= len(session.tokens):
            return len(session.tokens)
        keep = [(b, s) for b, s in session.snapshots if b <= shared]
        if keep:
            session.snapshots = keep
            session.tokens, session.doc = session.tokens[: keep[-1][0]], keep[-1][1]
        else:
            self._restart(session)
        return len(session.tokens)

    def _restart(self, session: Session) -> None:
        """Back to an empty document at the session's rate (the base's cache stays: prefills overwrite it)."""
        session.tokens, session.doc, session.snapshots = [], self.empty_doc(session.rate), []
