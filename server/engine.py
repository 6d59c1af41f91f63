"""The inference engine: the loop that admits jobs, prefills their prompts and decodes.

JetStream's shape: ``prefill`` a request's prompt into a session, ``insert``
the result into a free decode slot, ``generate`` one token for every slot per
step. One thread owns the model and every session; front ends only
``submit`` jobs (``server.types.Job``) and read their events. The engine
speaks token ids only.

It is split along its concerns, each its own module:

* ``server/runner.py`` runs the model (every compiled call, the decode
  slots' state); the engine never touches an array. ``tests/fake_runner.py``
  runs none, so this loop is tested without compiling anything.
* ``server/sessions.py`` keeps each document's committed state (docs/design.md,
  "Sessions"): committed tokens in whole chunks, snapshots to roll back to,
  LRU eviction under a memory cap.
* ``server/scheduler.py`` decides which waiting job starts next and when a
  decode step runs (docs/design.md, "Server").

A job's prompt is compared with its session's committed tokens: the session
rolls back to the last snapshot at or before the first difference (nothing,
when the prompt extends the history), then

* whole chunks of the prompt up to its last chunk boundary (and up to the
  job's ``commit_limit``) run in dual form and are committed, a snapshot
  after each call;
* the rest (a fill-in-the-middle suffix, the open chunk, always at least
  the last token) runs on a scratch copy, in the committed end's window if
  it fits (``_scratch_window``): ``extend`` for the open chunk samples the first new token;
* the scratch state is inserted into a decode slot. Generated tokens never
  reach the session.

The same rules applied to an empty session give a cold start, so reuse is
exact by construction (and tested).

A prompt with more than ``SLICE_TOKENS`` to compute is parked between its
prefill calls, holding its slot; the session is whole between calls, and a
parked job that is superseded or cancelled keeps the chunks it committed.
Decode steps are pipelined: a step is started before the previous one's
tokens are handed out, so XLA and the Python that delivers tokens run at once.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import itertools
import logging
import threading
import time

import numpy as np

from ponder.model.gating import Schedule
from ponder.model.gpt2 import GPT
from ponder.model.ttt_lm import TTTTransformerLM
from ponder.server import scheduler
from ponder.server.metrics import ServerMetrics
from ponder.server.runner import BLOCK, ModelRunner
from ponder.server.sessions import BUDGETED, Session, SessionStore, check_update_rate, common_prefix, plan_prompt
from ponder.server.types import (
    DoneEvent,
    ErrorEvent,
    Job,
    NotReady,
    QueueFull,
    RequestError,
    TokenEvent,
    Usage,
)

log = logging.getLogger("ponder.engine")

STOP_JOIN_S = 2.0  # how long ``Engine.stop`` waits for the loop to end its jobs before ending them itself


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs.

    Attributes:
      slots: decode slots (requests generating at once).
      max_new_tokens: most tokens a job may generate; the window keeps this
        many positions free.
      queue_size: jobs waiting for a slot before ``submit`` refuses.
      session_memory_mb: cap on the memory sessions hold (LRU eviction).
      snapshots: chunk-boundary snapshots kept per session.
      schedule: where λ comes from (the learned gate by default); its ``rate`` is the budget of a
        session that was never given an ``update_rate``.
    """

    slots: int = 8
    max_new_tokens: int = 256
    queue_size: int = 64
    session_memory_mb: float = 1024.0
    snapshots: int = 16
    schedule: Schedule = Schedule()

    def __post_init__(self):
        if self.schedule.steps != 1:
            raise ValueError(f"the server decodes with one gradient step per mini-batch (UPDATE_1); "
                             f"schedule steps is {self.schedule.steps}")


@dataclasses.dataclass(eq=False)
class _Prefilling:
    """A job whose prompt is being computed a slice per engine iteration; it holds ``slot``."""

    job: Job
    slot: int
    steps: collections.abc.Generator | None = None  # ``Engine._prefill``: yields tokens per call, returns its result
    session: Session | None = None
    usage: Usage | None = None  # what the prefill has done so far (None before it starts)
    started: float = dataclasses.field(default_factory=time.monotonic)  # when it took its slot


@dataclasses.dataclass
class _Running:
    """A job holding a decode slot."""

    job: Job
    session: Session
    usage: Usage
    generated: int  # tokens emitted (a final end-of-document included)
    last_token_time: float
    window_end: int  # window position of the next token fed, plus one
    first_token_time: float


@dataclasses.dataclass
class _Step:
    """A decode step started and not yet handed out: its outputs (arrays being computed) and the jobs it ran."""

    tokens: object  # [steps, S], or [steps, 1] for slot 0 alone
    lam: object  # like tokens
    count: object  # like tokens
    running: dict[int, _Running]  # slot -> job, when the step started


class Engine:
    """Continuous batching over a model runner; what front ends call is ``server.types.ServingEngine``.

    Args:
      model: the checkpoint's model (a base-only GPT is served through a fresh TTT layer).
      config: slots, limits and the λ schedule.
      metrics: where the engine's counters go (a fresh registry by default).
      runner: what runs the model (default: a ``ModelRunner`` that compiles ``model``). A test
        passes a fake that runs none (``tests/fake_runner.py``); ``model`` may then be None.
    """

    def __init__(self, model: GPT | TTTTransformerLM | None, config: EngineConfig = EngineConfig(),
                 metrics: ServerMetrics | None = None, runner: ModelRunner | None = None):
        self.config = config
        self.metrics = metrics if metrics is not None else ServerMetrics.create()
        if runner is None:
            runner = ModelRunner(model, config.slots, config.max_new_tokens, config.schedule, self.metrics)
        self.runner = runner
        self.model = runner.model
        self.C, self.eot_id = runner.chunk, runner.eot_id
        self.ready = False
        self.draining = False
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._prefilling: list[_Prefilling] = []  # parked between slices, oldest first
        self._in_flight: _Step | None = None  # the decode step whose tokens are not out yet
        self.sessions = SessionStore(self.C, self.eot_id, config.session_memory_mb * 2**20, config.snapshots,
                                     runner.empty_doc, runner.state_bytes, self.metrics, config.schedule.rate,
                                     block=BLOCK if runner.fast_keys else 0, window_start=runner.window_start)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._drain_cut = threading.Event()  # ``end_drain``: stop waiting for running jobs
        self.metrics.slots.set(config.slots)
        for action in ("updated", "skipped"):
            self.metrics.chunks.labels(config.schedule.kind, action)

    @property
    def compilations(self) -> int:
        """XLA compilations since the engine was made (flat after warm-up)."""
        return self.runner.compilations

    # --- Public interface (thread-safe).

    def start(self, warmup: bool = True) -> None:
        """Starts the engine thread; with ``warmup``, compiles every shape first, then reports ready."""
        self.runner.start()
        if warmup:
            self.runner.warmup()
        self.ready = True
        self._thread = threading.Thread(target=self._loop, name="ponder-engine", daemon=True)
        self.runner.serving_thread = self._thread
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues ``job``; a newer job of the same session cancels the older one.

        Raises:
          NotReady: before warm-up ends or while draining.
          QueueFull: ``queue_size`` jobs already wait beyond what the free slots will take.
          RequestError: the job cannot fit the limits.
        """
        if not self.ready or self.draining:
            raise NotReady("the server is warming up" if not self.ready else "the server is shutting down")
        if job.max_new_tokens > self.config.max_new_tokens:
            raise RequestError("max_tokens", f"must be at most {self.config.max_new_tokens}, got {job.max_new_tokens}")
        if not job.tokens:
            raise RequestError("prompt", "holds no tokens")
        if job.update_rate is not None:
            check_update_rate(job.update_rate, self.config.schedule.kind,
                              None if self.runner.reads_budget else self.model.config.KIND)
        with self._lock:
            # Jobs the free slots will take are not waiting for one (a burst can arrive while the loop is in a call).
            free = len(scheduler.free_slots(self.config.slots, self._running, {p.slot for p in self._prefilling}))
            if len(self._waiting) - free >= self.config.queue_size:
                raise QueueFull(f"the queue is full ({len(self._waiting) - free} requests waiting for a slot, "
                                f"limit {self.config.queue_size})")
            if job.session_id is not None:
                same = lambda other: other.api_key == job.api_key and other.session_id == job.session_id
                for other in self._jobs():
                    if same(other):
                        other.cancel("superseded")
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._lock.notify()

    def _jobs(self):
        """Every job waiting, being prefilled or decoding (caller holds the lock)."""
        return itertools.chain(self._waiting, (p.job for p in self._prefilling), (r.job for r in self._running.values()))

    def reset_session(self, api_key: str, session_id: str) -> bool:
        """Forgets a session (the next request starts a fresh document). True if it existed."""
        with self._lock:
            return self.sessions.reset(api_key, session_id)

    def stop(self, drain_s: float = 30.0) -> None:
        """Graceful drain: refuse new jobs, let running and waiting ones finish (at most ``drain_s``), stop.

        Every job still here then ends with ``DoneEvent("cancelled")``, its ``cancel_reason``
        "shutdown" (the service answers UNAVAILABLE / 503): the loop ends them before it returns;
        any it has not ended ``STOP_JOIN_S`` later (stuck in a model call) are ended from here.
        """
        self.draining = True
        end = time.monotonic() + drain_s
        while time.monotonic() < end and not self._drain_cut.is_set():
            with self._lock:
                if not self._waiting and not self._prefilling and not self._running:
                    break
            self._drain_cut.wait(0.02)
        with self._lock:
            for job in list(self._jobs()):
                job.cancel("shutdown")
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=STOP_JOIN_S)
        with self._lock:
            left = list(self._jobs())  # none, unless the loop is stuck in a model call or failed
        if left:
            log.warning("the engine loop did not end %d jobs within %.0f s; ending them without it", len(left), STOP_JOIN_S)
        for job in left:
            job.put(DoneEvent("cancelled", Usage(prompt_tokens=len(job.tokens)), job.session_id or ""))

    def end_drain(self) -> None:
        """Cuts a drain short (a second SIGTERM): ``stop`` stops waiting and ends the jobs left."""
        self._drain_cut.set()

    def session_count(self) -> int:
        return len(self.sessions)

    def committed_tokens(self, api_key: str, session_id: str) -> list[int] | None:
        """A copy of the session's committed tokens (whole chunks; see ``Session``), or None if there is no such session."""
        with self._lock:
            session = self.sessions.get(api_key, session_id)
            return None if session is None else list(session.tokens)

    def session_schedule(self, api_key: str, session_id: str) -> Schedule | None:
        """The schedule the session's committed state ran under (its budget as ``rate``), or None if there is no such session."""
        with self._lock:
            session = self.sessions.get(api_key, session_id)
            return None if session is None else dataclasses.replace(self.config.schedule, rate=session.rate)

    # --- Prefill.

    def _prefill(self, task: _Prefilling):
        """Brings the job's session up to its prompt and samples the first token.

        A generator that yields the tokens computed by each prefill call (the
        engine runs a long prompt a slice at a time between decode steps) and
        returns ``(session, usage, lambdas, first)``: λ of the chunks closed,
        and ``first = (token, doc, cache, window, doc_end)`` to insert into a
        slot, or None for an ingest-only job.
        """
        job = task.job
        C = self.C
        with self._lock:
            session = task.session = self.sessions.session_for(job)
        plan = plan_prompt(job, C, self.eot_id)
        tokens = job.tokens = plan.tokens  # an end-of-document token inside the prompt opens a new document there
        L, commit_end, scratch_end = len(tokens), plan.commit_end, plan.scratch_end
        start = self.sessions.rollback(session, tokens[:commit_end])
        usage, lambdas = Usage(prompt_tokens=L, cached_tokens=start, context_tokens=start), []
        task.usage = usage
        self.metrics.prompt_tokens.inc(L)
        if self.config.schedule.kind in BUDGETED:
            self.metrics.target_update_rate.labels(self.config.schedule.kind).observe(session.rate)
        doc = yield from self._run_chunks(session, tokens, start, commit_end, session.doc, usage, lambdas, commit=True)
        if job.max_new_tokens == 0:
            self.metrics.prefill_tokens.inc(commit_end - start)
            usage.truncated = session.window > 0
            return session, usage, lambdas, None
        window = self._scratch_window(commit_end, L + job.max_new_tokens)
        doc = yield from self._run_chunks(session, tokens, commit_end, scratch_end, doc, usage, lambdas, commit=False,
                                          window=window)
        self._ensure_window(session, tokens, scratch_end, usage, window)
        window = session.window
        token, lam, doc, session.cache = self.runner.extend(job, doc, session.cache, scratch_end, window, L - scratch_end)
        usage.computed_tokens, usage.context_tokens = usage.computed_tokens + L - scratch_end, L
        usage.truncated = window > 0
        self.metrics.prefill_tokens.inc(L - start)
        if L // C > scratch_end // C:  # the extend closed a chunk
            self._count_decoded_chunk(usage, lambdas, float(np.asarray(lam)[0]))
        return session, usage, lambdas, (token, doc, session.cache, window, L)

    def _scratch_window(self, commit_end: int, end: int) -> int | None:
        """The window of positions ``commit_end`` to ``end`` (scratch and generation): the committed end's if they fit
        in it, else None (each block's own), so that a suffix reaching the next block does not move the session's
        window (the next request would re-read a window to move it back). A cold start computes the same."""
        start = self.runner.window_start(commit_end)
        return start if end - start <= self.runner.W else None

    def _ensure_window(self, session: Session, tokens: list[int], position: int, usage: Usage, start: int | None = None) -> None:
        """Makes the session's cache encode the window at ``start`` (default: that of the block holding ``position``)."""
        start = self.runner.window_start(position) if start is None else start
        if session.cache is not None and session.window == start:
            return
        session.cache = self.runner.encode_window(session.cache, tokens[start:position])  # the base re-reads them
        session.window = start
        usage.reencoded_tokens += position - start

    def _run_chunks(self, session: Session, tokens: list[int], begin: int, end: int, doc, usage: Usage, lambdas, commit: bool,
                    window: int | None = None):
        """Whole chunks ``tokens[begin:end]`` in dual form from ``doc``; returns the state after them.

        A generator: it yields the tokens of each call once the call is done.
        With ``commit``, the session's committed tokens and snapshots follow
        after every call, so the session is whole between calls. Calls never
        cross a window block and take the largest bucket first. ``window``:
        the window every call runs in (default: each block's own).
        """
        p = begin
        while p < end:
            self._ensure_window(session, tokens, p, usage, window)
            n = self.runner.prefill_size(p, end)
            doc, session.cache, lam, updated, flops = self.runner.prefill(doc, session.cache, tokens[p : p + n], p, session.window)
            self._count_chunks(usage, lambdas, lam, updated, flops)
            usage.computed_tokens, usage.context_tokens = usage.computed_tokens + n, usage.context_tokens + n
            p += n
            if commit:
                session.commit(tokens[:p], doc, self.config.snapshots, self.sessions.block)
            yield n
        return doc

    def _count_chunks(self, usage: Usage, lambdas: list[float], lam, updated, flops: float) -> None:
        """Books closed chunks (λ [n], updated [n], their update FLOPs) to the usage, ``lambdas`` and metrics."""
        for value, up in zip(lam.tolist(), updated.tolist()):
            self.metrics.chunk_lambda.observe(value)
            self.metrics.chunks.labels(self.config.schedule.kind, "updated" if up else "skipped").inc()
            usage.chunks_updated += int(up)
            usage.chunks_skipped += int(not up)
            lambdas.append(value)
        usage.ttt_flops += flops
        self.metrics.ttt_flops.inc(flops)

    def _count_decoded_chunk(self, usage: Usage, lambdas: list[float], value: float) -> None:
        """Books one chunk closed token by token."""
        updated = value > 0
        self._count_chunks(usage, lambdas, np.asarray([value]), np.asarray([updated]), self.runner.chunk_flops if updated else 0.0)

    # --- Admission.

    def _admit(self) -> bool:
        """Starts one waiting job in a free slot (or finishes it). True if it did anything.

        The job's prompt runs up to ``scheduler.SLICE_TOKENS`` tokens now (a warm
        keystroke: all of it); a longer one is parked in ``_prefilling`` and
        continues a slice per iteration of the loop, between decode steps.
        """
        with self._lock:
            free = scheduler.free_slots(self.config.slots, self._running, {p.slot for p in self._prefilling})
            if not free or not self._waiting:
                return False
            job = scheduler.pick_next(self._waiting, [p.job for p in self._prefilling], self.sessions.committed, time.monotonic())
            if job is None:
                return False
            self._waiting.remove(job)
            self.metrics.waiting.set(len(self._waiting))
        self.metrics.queue_time.observe(time.monotonic() - job.arrival)
        task = _Prefilling(job, free[0])
        task.steps = self._prefill(task)
        self._advance(task, scheduler.SLICE_TOKENS)
        return True

    def _advance(self, task: _Prefilling, budget: int) -> None:
        """Runs ``task``'s prefill calls until ``budget`` tokens are computed or the prompt is done.

        A done prompt goes into its slot (an ingestion ends); an unfinished
        one is parked; a cancelled or late one ends, keeping what it committed.
        """
        job = task.job
        if job.cancelled.is_set() or (job.deadline is not None and time.monotonic() > job.deadline):
            task.steps.close()
            self._unpark(task)
            if task.usage is not None:  # cut short in its prefill: what it did
                task.usage.prompt_s, task.usage.truncated = time.monotonic() - task.started, task.session.window > 0
            self._finish_unstarted(job, "cancelled" if job.cancelled.is_set() else "deadline", task.usage)
            return
        try:
            done = 0
            while done < budget:
                done += next(task.steps)
        except StopIteration as stop:
            self._unpark(task)
            self._start(task, *stop.value)
        except Exception as error:  # a bug must fail the request, never the engine
            log.exception("prefill failed")
            self._unpark(task)
            job.put(ErrorEvent(error))
        else:
            if task not in self._prefilling:
                with self._lock:
                    self._prefilling.append(task)

    def _unpark(self, task: _Prefilling) -> None:
        """Ends ``task``'s prefill (done, cancelled or failed): it leaves the parked list, its session is counted."""
        with self._lock:
            if task in self._prefilling:
                self._prefilling.remove(task)
            if task.session is not None:
                self.sessions.count(task.session)

    def _start(self, task: _Prefilling, session: Session, usage: Usage, lambdas: list[float], first) -> None:
        """Puts a job whose prompt is done into its slot and emits its first token (an ingestion ends)."""
        job = task.job
        with self._lock:
            self.sessions.evict(keep=session, busy=[p.session for p in self._prefilling])
        usage.prompt_s = time.monotonic() - task.started
        if first is None:
            job.put(TokenEvent([], lambdas))
            job.put(DoneEvent("length", usage, session.session_id))
            return
        token, doc, cache, window, doc_end = first
        self.runner.insert(task.slot, job, doc, cache, token, window, doc_end)
        now = time.monotonic()
        running = _Running(job, session, usage, 0, now, doc_end - window + 1, now)
        with self._lock:
            self._running[task.slot] = running
            self.metrics.running.set(len(self._running))
        self._emit(task.slot, running, int(np.asarray(token)[0]), lambdas)

    def _finish_unstarted(self, job: Job, reason: str, usage: Usage | None = None) -> None:
        """Ends a job cut short in its prefill, or one that never reached a slot (``usage`` None): its context is
        then what its session (without an id: the key's best match) has committed of its prompt."""
        if reason == "cancelled":
            self.metrics.cancellations.labels(job.cancel_reason).inc()
        if usage is None:
            with self._lock:
                held = [s for s in self.sessions if s.api_key == job.api_key and job.session_id in (None, s.session_id)]
                usage = Usage(len(job.tokens), context_tokens=max((common_prefix(s.tokens, job.tokens) for s in held), default=0))
        job.put(DoneEvent(reason, usage, job.session_id or ""))

    def _end_remaining(self) -> None:
        """On stop: ends every job still waiting, being prefilled or decoding, so that no reader waits forever."""
        with self._lock:
            for job in self._jobs():
                job.cancel("shutdown")  # ``stop`` did; a job that slipped in after it too
            waiting = list(self._waiting)
            self._waiting.clear()
            self.metrics.waiting.set(0)
        self._in_flight = None
        for task in list(self._prefilling):
            self._advance(task, 0)  # cancelled: it ends, keeping what it committed
        for slot in list(self._running):
            self._finish(slot, "cancelled")
        for job in waiting:
            self._finish_unstarted(job, "cancelled")

    # --- Decoding.

    def _emit(self, slot: int, running: _Running, token: int, lambdas: list[float]) -> None:
        """Hands one new token to the job and finishes it when it is done."""
        now = time.monotonic()
        job = running.job
        if running.generated:
            self.metrics.inter_token.observe(now - running.last_token_time)
        running.last_token_time = now
        running.generated += 1
        ended = token == self.eot_id
        if not ended:
            running.usage.generated_tokens += 1
            self.metrics.generated_tokens.inc()
        job.put(TokenEvent([token], list(lambdas)))
        if ended:
            self._finish(slot, "stop")
        elif running.generated >= job.max_new_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        self.runner.release(slot)
        with self._lock:
            running = self._running.pop(slot)
            self.metrics.running.set(len(self._running))
        running.usage.generation_s = time.monotonic() - running.first_token_time
        running.usage.context_tokens += running.generated - 1  # every token emitted but the last was fed back
        if reason == "cancelled":
            self.metrics.cancellations.labels(running.job.cancel_reason).inc()
        running.job.put(DoneEvent(reason, running.usage, running.session.session_id))

    def _step(self, dispatch: bool = True) -> None:
        """Starts a decode step for every running slot, then hands out the tokens of the step before it.

        Pipelined: XLA computes this step while the thread hands out the
        previous one's tokens (events, metrics, and the front ends that read
        them), so the Python work of a token overlaps the model instead of
        following it. A job that ended since a step was started (its last
        token, a cancellation, a deadline) gets nothing from that step; its
        slot's extra row of work is thrown away.
        """
        now = time.monotonic()
        for slot, running in list(self._running.items()):  # free cancelled / late slots before the step
            job = running.job
            if job.cancelled.is_set():
                self._finish(slot, "cancelled")
            elif job.deadline is not None and now > job.deadline:
                self._finish(slot, "deadline")
        previous, self._in_flight = self._in_flight, None
        if dispatch and self._running:
            longest = max(r.window_end for r in self._running.values())  # window position after one step
            # A lone stream takes several steps per call while nothing waits (tokens past its end are dropped).
            alone = list(self._running) == [0] and not self._waiting and not self._prefilling
            steps = self.runner.lone_steps if alone and longest + self.runner.lone_steps - 1 <= self.runner.W else 1
            tokens, lam, count = self.runner.decode(self._running.keys(), longest + steps - 1, steps)
            for running in self._running.values():
                running.window_end += steps
            self._in_flight = _Step(tokens, lam, count, dict(self._running))
        if previous is not None:
            self._hand_out(previous)

    def _hand_out(self, step: _Step) -> None:
        """Emits a finished step's token to each job that was running then and still is."""
        tokens, lam, count = (np.asarray(a) for a in (step.tokens, step.lam, step.count))  # [steps, slots]
        for slot, running in step.running.items():
            for i in range(len(tokens)):
                if self._running.get(slot) is not running:
                    break  # ended after the step started (or its slot went to another job)
                if running.job.cancelled.is_set():
                    self._finish(slot, "cancelled")
                    break
                lambdas = []
                if count[i, slot] % self.C == 0:  # the token fed closed a chunk
                    self._count_decoded_chunk(running.usage, lambdas, float(lam[i, slot]))
                self._emit(slot, running, int(tokens[i, slot]), lambdas)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._prefilling and not self._running:
                    self._lock.wait()
                stopping = self._stop
            if stopping:
                self._end_remaining()
                return
            try:
                # An iteration: start one waiting job, one more slice of the oldest parked
                # prompt, one decode step (skipped while more jobs can still join this one).
                # Only this thread changes ``_prefilling``: it reads it without the lock.
                for task in [p for p in self._prefilling if p.job.cancelled.is_set()]:
                    self._advance(task, 0)  # a superseded prompt frees its slot and session now
                parked = self._prefilling[0] if self._prefilling else None
                admitted = self._admit()
                if parked is not None:
                    self._advance(parked, 1)
                dispatch = scheduler.dispatch(len(self._running), len(self._prefilling), len(self._waiting), admitted,
                                              self.config.slots)
                if dispatch or self._in_flight is not None:
                    self._step(dispatch)
            except Exception:  # pragma: no cover - a bug; keep serving and fail the running requests
                log.exception("engine step failed")
                for slot in list(self._running):
                    self._running[slot].job.put(ErrorEvent(RuntimeError("the engine failed; see the server log")))
                    with self._lock:
                        self._running.pop(slot, None)
                self.runner.reset()
                self._in_flight = None
