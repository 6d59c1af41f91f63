"""A model runner that runs no model, whose outputs can be worked out by hand (JetStream's habit).

It has the methods of ``server.runner.ModelRunner`` over plain Python values,
so the real ``Engine`` (its scheduler, session store and loop) runs in fast
tests without compiling anything:

* ``extend`` answers ``reply[0]``, and each decode step the token after the
  one fed, in ``reply`` cycled: every job's tokens are ``reply`` cycled from
  its start, whatever the prompt.
* Chunks are ``CHUNK`` tokens; each closes with λ = ``LAMBDA`` (the fast
  weights move) and costs ``FLOPS`` update FLOPs. Under a budgeted schedule
  (``budgeted``), chunk k of a document updates only where its state's
  target t makes floor((k + 1) t) pass an integer (``budget_updates``), else
  closes with λ = 0 at no cost: exactly t of the chunks, give or take one.
* A document state (``FakeDoc``) is the number of tokens it has read and its
  target, a cache the number of window positions written; every call checks
  that the state it is handed is the one for where it starts, so an engine
  that hands back the wrong snapshot fails the request. The window never moves.
* ``state_bytes`` counts 8 bytes per state or cache.
* ``delay_s``: each ``extend`` and decode step takes this long (a slow model);
  ``prompt_delay_s``: each prefill call and ``extend`` takes this long more
  (a slow prompt phase).
* ``pause()``: every call waits until ``resume()``, so the engine loop stalls
  and its queue fills for real.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import threading
import time

import numpy as np

from ponder.server.engine import BUDGETED, Engine, EngineConfig
from ponder.server.metrics import ServerMetrics
from ponder.server.types import DoneEvent, Job, QueueFull

CHUNK = 4
LAMBDA = 0.5
FLOPS = 1000.0
PREFILL_CHUNKS = (4, 2, 1)


def budget_updates(chunk_index: int, target: float) -> bool:
    """Whether chunk ``chunk_index`` of a document updates under a budgeted schedule at ``target``."""
    return math.floor((chunk_index + 1) * target) > math.floor(chunk_index * target)


def chunks_closed(prompt_tokens: int, generated: int) -> int:
    """Chunks a fresh session closes for a prompt and ``generated`` tokens: every token is read but the last generated."""
    return (prompt_tokens + max(generated - 1, 0)) // CHUNK


def lambdas_riding(prompt_tokens: int, k: int) -> int:
    """How many λ arrive with the ``k``-th generated token (from 1) of a fresh session.

    The first carries the prompt's chunks; a later one, the chunk the token before it closed.
    """
    return prompt_tokens // CHUNK if k == 1 else int((prompt_tokens + k - 1) % CHUNK == 0)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"fake runner: {message}")


@dataclasses.dataclass(frozen=True)
class FakeDoc:
    """A document state: the tokens it has read, and its budget (``GateHistory.target``)."""

    count: int
    target: float


class FakeRunner:
    """``ModelRunner``'s contract, worked out by hand (see the module docstring)."""

    model = None
    chunk = CHUNK
    chunk_flops = FLOPS
    W = 1 << 30  # window positions: the window never moves, and every job fits in it
    fast_keys = False  # the cache never depends on the document state
    reads_budget = True  # states carry a per-session budget (``budgeted`` says whether the fake reads it)
    lone_steps = 1  # tokens per call for slot 0 alone (a test may set more)

    def __init__(self, reply: list[int], slots: int, eot_id: int = 0, delay_s: float = 0.0, budgeted: bool = False):
        _check(len(set(reply)) == len(reply) and eot_id not in reply, "reply tokens must be distinct, without eot")
        self.reply, self.slots, self.eot_id, self.delay_s = list(reply), slots, eot_id, delay_s
        self.budgeted = budgeted
        self.prompt_delay_s = 0.0
        self.steps_per_call = collections.Counter()  # decode calls by tokens per call
        self.compilations = 0
        self.serving_thread: threading.Thread | None = None
        self._open, self.held = threading.Event(), threading.Event()  # held: a call waits on a pause
        self._open.set()
        self.reset()

    def _call(self, delay: bool = False, prompt: bool = False) -> None:
        if not self._open.is_set():
            self.held.set()
            self._open.wait()
        if delay and self.delay_s:
            time.sleep(self.delay_s)
        if prompt and self.prompt_delay_s:
            time.sleep(self.prompt_delay_s)

    def pause(self) -> None:
        self.held.clear()
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def next_token(self, token: int) -> int:
        return self.reply[(self.reply.index(token) + 1) % len(self.reply)]

    def chunk_lambda(self, chunk_index: int, target: float) -> float:
        """λ of chunk ``chunk_index`` of a document whose state's target is ``target``."""
        return LAMBDA if not self.budgeted or budget_updates(chunk_index, target) else 0.0

    # --- Set-up.

    def start(self) -> None:
        self.reset()

    def warmup(self) -> None:
        """Nothing to compile."""

    def empty_doc(self, rate: float) -> FakeDoc:
        return FakeDoc(0, rate)

    def state_bytes(self, tree) -> int:
        if tree is None:
            return 0
        if isinstance(tree, (list, tuple)):
            return sum(self.state_bytes(t) for t in tree)
        return 8

    # --- Prefill.

    def window_start(self, position: int) -> int:
        return 0

    def prefill_size(self, position: int, end: int) -> int:
        return next(k for k in PREFILL_CHUNKS if k * CHUNK <= end - position) * CHUNK

    def encode_window(self, cache: int | None, tokens: list[int]) -> int:
        return len(tokens) if tokens or cache is None else cache

    def _check_state(self, doc: FakeDoc, cache: int, doc_start: int, window: int) -> None:
        _check(doc.count == doc_start, f"a state that read {doc.count} tokens, handed in at document position {doc_start}")
        _check(cache is not None and cache >= doc_start - window, f"a cache of {cache} positions at {doc_start - window}")

    def prefill(self, doc: FakeDoc, cache: int, tokens: list[int], doc_start: int, window: int):
        self._call(prompt=True)
        self._check_state(doc, cache, doc_start, window)
        _check(tokens and len(tokens) % CHUNK == 0, f"prefill of {len(tokens)} tokens, not whole chunks")
        first = doc_start // CHUNK
        lam = np.array([self.chunk_lambda(k, doc.target) for k in range(first, first + len(tokens) // CHUNK)], np.float32)
        end = doc_start + len(tokens)
        return FakeDoc(end, doc.target), end - window, lam, lam > 0, FLOPS * int((lam > 0).sum())

    def extend(self, job: Job, doc: FakeDoc, cache: int, doc_start: int, window: int, length: int):
        self._call(delay=True, prompt=True)
        self._check_state(doc, cache, doc_start, window)
        _check(1 <= length <= CHUNK and doc_start + length == len(job.tokens), f"extend of {length} tokens at {doc_start}")
        end = doc_start + length
        lam = self.chunk_lambda((end - 1) // CHUNK, doc.target)
        return np.array([self.reply[0]], np.int32), np.array([lam], np.float32), FakeDoc(end, doc.target), end - window

    # --- Decode slots.

    def insert(self, slot: int, job: Job, doc: FakeDoc, cache: int, token, window: int, doc_end: int) -> None:
        self._call()
        _check(not self._active[slot] and doc.count == doc_end, f"insert into slot {slot} (busy: {self._active[slot]})")
        self._token[slot], self._count[slot], self._active[slot] = int(np.asarray(token)[0]), doc.count, True
        self.targets[slot] = doc.target

    def release(self, slot: int) -> None:
        _check(self._active[slot], f"release of idle slot {slot}")
        self._active[slot] = False

    def reset(self) -> None:
        S = self.slots
        self._token, self._count, self._active = [self.eot_id] * S, [0] * S, [False] * S
        self.targets = [0.0] * S  # the target of each slot's state (as last inserted)

    def decode(self, busy, window_end: int, steps: int = 1):
        self._call(delay=True)
        _check(steps == 1 or list(busy) == [0] and steps == self.lone_steps, f"{steps} steps for slots {list(busy)}")
        self.steps_per_call[steps] += 1
        tokens, lams, counts = [], [], []
        for _ in range(steps):
            for slot in busy:
                _check(self._active[slot], f"slot {slot} decodes without a job")
                self._count[slot] += 1
                self._token[slot] = self.next_token(self._token[slot])
            tokens.append(list(self._token))
            lams.append([self.chunk_lambda((count - 1) // CHUNK, target) for count, target in zip(self._count, self.targets)])
            counts.append(list(self._count))
        return np.array(tokens, np.int32), np.array(lams, np.float32), np.array(counts, np.int32)


class RecordingEngine(Engine):
    """The real engine on a ``FakeRunner``; ``jobs`` lists every job it accepted, for tests to inspect."""

    def __init__(self, reply: list[int], *, delay_s: float = 0.0, metrics: ServerMetrics | None = None, **config):
        config = EngineConfig(**{"slots": 4, "queue_size": 8, **config})
        runner = FakeRunner(reply, config.slots, delay_s=delay_s, budgeted=config.schedule.kind in BUDGETED)
        super().__init__(None, config, metrics, runner=runner)
        self.jobs: list[Job] = []
        self.start()

    def submit(self, job: Job) -> None:
        super().submit(job)
        self.jobs.append(job)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Waits until no job is waiting, being prefilled or decoding."""
        end = time.monotonic() + timeout
        while self._waiting or self._prefilling or self._running:
            _check(time.monotonic() < end, "the engine never became idle")
            time.sleep(0.005)

    def fresh(self) -> RecordingEngine:
        """Back to its state at start, for the next test: idle, ready, no delay, no session, no job seen."""
        self.wait_idle()
        old = self.sessions
        with self._lock:
            self.sessions = type(old)(old.chunk, old.eot_id, old.memory_bytes, old.snapshots, old.empty_doc,
                                      old.state_bytes, old.metrics, old.default_rate)
        self.ready, self.runner.delay_s, self.runner.prompt_delay_s = True, 0.0, 0.0
        self.jobs.clear()
        return self


@contextlib.contextmanager
def full_queue(engine: RecordingEngine):
    """Fills the engine's queue for real: the runner pauses, one job holds the loop, ``queue_size`` more wait.

    Inside, every ``submit`` raises ``QueueFull``; on leaving, the filler jobs are cancelled and end.
    """
    runner, fillers = engine.runner, []
    runner.pause()
    try:
        while True:
            job = Job("filler", None, None, [engine.eot_id, 1], 1)
            try:
                Engine.submit(engine, job)  # not recorded: the test's own jobs are
            except QueueFull:
                break
            fillers.append(job)
            if len(fillers) == 1:  # the loop takes the first and waits inside the runner
                _check(runner.held.wait(5), "the engine loop never reached the runner")
        yield
    finally:
        for job in fillers:
            job.cancel()
        runner.resume()
        for job in fillers:
            while not isinstance(job.next_event(timeout=5), DoneEvent):
                pass
