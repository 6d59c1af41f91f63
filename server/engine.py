"""The inference engine: sessions, decode slots and continuous batching.

JetStream's shape: ``prefill`` a request's prompt into a session, ``insert``
the result into a free decode slot, ``generate`` one token for every slot per
step. One thread owns the model and every session; front ends only
``submit`` jobs (``server.types.Job``) and read their events. The engine
speaks token ids only.

Sessions (DESIGN.md §4). A session is ``(api_key, session_id)`` and holds a
document's committed tokens (always whole chunks), the TTT ``DocState`` after
them, the base's KV cache, and snapshots of the ``DocState`` at earlier chunk
boundaries. A job's prompt is compared with the committed tokens: the
session rolls back to the last snapshot at or before the first difference
(nothing, when the prompt extends the history), then

* whole chunks of the prompt up to its last chunk boundary (and up to the
  job's ``commit_limit``) run in dual form and are committed, a snapshot
  after each call;
* the rest (a fill-in-the-middle suffix, the open chunk, always at least
  the last token) runs on a scratch copy: ``extend`` for the open chunk,
  which also samples the first new token;
* the scratch state is inserted into a decode slot. Generated tokens never
  reach the session.

The same rules applied to an empty session give a cold start, so reuse is
exact by construction (and tested).

Scheduling. Each iteration of the engine loop starts one waiting job (the
one with the least prompt to compute), runs one more prefill call of the
oldest long prompt in progress, and takes one decode step. A prompt with more
than ``SLICE_TOKENS`` to compute is parked between its calls, holding its
slot, so a cold document delays others' keystrokes and tokens by one call,
not by its whole prefill; the session is whole between calls, and a parked
job that is superseded or cancelled keeps the chunks it committed. Decode
steps are pipelined: a step is started before the previous one's tokens are
handed out, so XLA and the Python that delivers tokens run at once.

Long documents. Positions are learned up to the context window W, so the
base attends within a window: tokens in block k (``BLOCK`` tokens each) are
encoded with the window starting at ``window_start(k * BLOCK)``, which
leaves at least ``max_new_tokens`` positions free for generation. Moving to
the next block re-encodes the window's earlier tokens with the base (a
prefill, no TTT). The fast weights see the whole document.

Compiled shapes: dual-form prefill of 1, 2 or 4 chunks; ``extend`` of 16,
32 or 64 tokens; the window re-encode at two lengths; ``insert``; the decode
step over every slot, or over slot 0 alone on its own one-row state (a lone
stream), reading 128, 256 or all cache keys. ``warmup`` compiles them all
before the engine reports ready; the compile counter (every XLA compilation
of the process) stays flat afterwards.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools
import itertools
import logging
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponder.model.gating import Schedule
from ponder.model.generate import sample
from ponder.model.gpt2 import GPT, KVCache
from ponder.model.ttt import TTTConfig
from ponder.model.ttt_lm import DocState, TTTLMConfig, TTTTransformerLM
from ponder.server.metrics import ServerMetrics
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

BLOCK = 256  # tokens per window block (a multiple of the gate chunk)
PREFILL_CHUNKS = (4, 2, 1)  # dual-form prefill calls, in chunks (largest first)
EXTEND_LENGTHS = (16, 32, 64)  # extend buckets, in tokens
PATIENCE_S = 0.5  # a job waiting this long is admitted next, however much prompt it brings
SLICE_TOKENS = 256  # a prompt with more to compute is prefilled this much per engine iteration


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
      schedule: where λ comes from (the learned gate by default).
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


def as_ttt_model(model: GPT | TTTTransformerLM) -> TTTTransformerLM:
    """A base-only checkpoint served through the TTT path: a fresh TTT layer
    (zero output projection) on top predicts exactly what the base does."""
    if isinstance(model, TTTTransformerLM):
        return model
    c = model.config
    config = TTTLMConfig(base=c, ttt=TTTConfig(width=c.n_embd, n_head=c.n_head))
    return TTTTransformerLM(config, rngs=nnx.Rngs(0), base=model)


# --- Compiled functions (the graph is static, parameters are arguments).


@dataclasses.dataclass
class Slots:
    """Every decode slot's state, one row per slot."""

    cache: KVCache
    doc: DocState
    token: jax.Array  # [S] last sampled token, fed next
    position: jax.Array  # [S] window position ``token`` takes
    doc_position: jax.Array  # [S] document position ``token`` takes (sampling keys)
    key: jax.Array  # [S] sampling key
    temperature: jax.Array  # [S]
    top_k: jax.Array  # [S]
    top_p: jax.Array  # [S]
    active: jax.Array  # [S] bool: the slot holds a job (idle slots feed end-of-document at position 0)


jax.tree_util.register_dataclass(
    Slots,
    data_fields=["cache", "doc", "token", "position", "doc_position", "key", "temperature", "top_k", "top_p", "active"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True, eq=False)
class _Model:
    """The model's static half for the compiled functions below, with its parameters' tree structure.

    Hashed by identity, and the parameters travel as a flat list: a graphdef's
    own hash and an ``nnx.State``'s flattening walk the whole module tree,
    which measured 2.4 ms of Python per decode step.
    """

    graphdef: nnx.GraphDef
    treedef: jax.tree_util.PyTreeDef

    def merge(self, leaves: list) -> TTTTransformerLM:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("cache",))
def _prefill_chunks(model: _Model, schedule, params, tokens, positions, doc, cache):
    """Whole chunks [1, T] in dual form: ``(doc, cache, chunk_lambda [n], chunk_updated [n], ttt_flops)``."""
    out = model.merge(params)(tokens, positions, schedule, state=doc, cache=cache)
    return out.state, out.cache, out.chunk_lambda[0], out.chunk_updated[0], out.ttt_flops[0]


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _base_fill(model: _Model, params, tokens, positions, cache):
    """The base alone on [1, T] tokens from window position 0 into the KV cache (a window move)."""
    _, _, cache = model.merge(params).base(tokens, positions, cache, compute_logits=False, attend_keys=0)
    return cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("cache",))
def _extend(model: _Model, schedule, params, tokens, positions, length, doc, cache, key, doc_position, sampling):
    """An open chunk's tokens [1, T] (``length`` real) and the first sampled token: ``(token [1], doc, cache)``."""
    logits, cache, doc = model.merge(params).extend(tokens, positions, length, cache, doc, schedule)
    keys = jax.vmap(jax.random.fold_in)(key, doc_position)
    return sample(logits, keys, *sampling), doc, cache


@functools.partial(jax.jit, donate_argnames=("slots",))
def _insert(slots: Slots, row: Slots, index):
    """Writes a one-row ``Slots`` into row ``index`` of ``slots``."""
    put = lambda a, b: jax.lax.dynamic_update_slice(a, b.astype(a.dtype), (index,) + (0,) * (a.ndim - 1))
    return jax.tree.map(put, slots, row)


@functools.partial(jax.jit, donate_argnames=("slots",))
def _release(slots: Slots, index):
    """Marks slot ``index`` idle."""
    return dataclasses.replace(slots, active=slots.active.at[index].set(False))


@jax.jit
def _first_row(slots: Slots) -> Slots:
    """Slot 0's state as a one-row ``Slots`` (a copy)."""
    return jax.tree.map(lambda x: x[:1], slots)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnames=("slots",))
def _decode(model: _Model, schedule, eot_id, attend_keys, params, slots: Slots):
    """One token for every row of ``slots``: ``(slots, tokens [S], lam [S], count [S])``.

    Attention reads the first ``attend_keys`` cache slots only (a bucket
    above every live row's position): on this CPU, reading all of every
    slot's cache cost more than the weights.
    """
    model = model.merge(params)
    fed = jnp.where(slots.active, slots.token, eot_id)
    position = jnp.where(slots.active, slots.position, 0)
    logits, cache, doc = model.step(fed, position, slots.cache, slots.doc, schedule, attend_keys)
    keys = jax.vmap(jax.random.fold_in)(slots.key, slots.doc_position + 1)
    token = sample(logits, keys, slots.temperature, slots.top_k, slots.top_p)
    slots = dataclasses.replace(
        slots, cache=cache, doc=doc, token=token, position=position + 1, doc_position=slots.doc_position + 1
    )
    return slots, token, doc.lam, doc.count


# --- Sessions.


@dataclasses.dataclass(eq=False)
class Session:
    """One document's committed state (see the module docstring)."""

    api_key: str
    session_id: str
    document_id: str | None
    tokens: list[int]  # committed tokens (whole chunks)
    doc: DocState  # state after ``tokens``
    cache: KVCache | None  # base keys/values of the window ``window`` (None: not built)
    window: int  # document position of cache slot 0
    snapshots: list[tuple[int, DocState]]  # (boundary, state), ascending
    last_used: float = 0.0
    counted: int = 0  # its bytes in ``Engine._session_bytes``, as last measured

    def nbytes(self) -> int:
        leaves = jax.tree.leaves((self.cache, [s for _, s in self.snapshots], self.doc))
        return sum(a.nbytes for a in leaves) + 8 * len(self.tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclasses.dataclass(eq=False)
class _Prefilling:
    """A job whose prompt is being computed a slice per engine iteration; it holds ``slot``."""

    job: Job
    slot: int
    steps: collections.abc.Generator | None = None  # ``Engine._prefill``: yields tokens per call, returns its result
    session: Session | None = None


@dataclasses.dataclass
class _Running:
    """A job holding a decode slot."""

    job: Job
    session: Session
    usage: Usage
    generated: int
    last_token_time: float
    window_end: int  # window position of the next token fed, plus one


@dataclasses.dataclass
class _Step:
    """A decode step started and not yet handed out: its outputs (device arrays) and the jobs it ran."""

    tokens: jax.Array  # [S], or [1] for slot 0 alone
    lam: jax.Array  # like tokens
    count: jax.Array  # like tokens
    running: dict[int, _Running]  # slot -> job, when the step started


class Engine:
    def __init__(self, model: GPT | TTTTransformerLM, config: EngineConfig = EngineConfig(), metrics: ServerMetrics | None = None):
        model = as_ttt_model(model)
        self.model, self.config = model, config
        self.metrics = metrics if metrics is not None else ServerMetrics.create()
        graphdef, params = nnx.split(model)
        # One plain device placement for every array: a checkpoint's parameters carry
        # mesh shardings whose propagation into outputs would make a state fed back
        # into a compiled function look like a new input type (a recompilation).
        device = jax.devices()[0]
        self._place = lambda tree: jax.tree.map(lambda a: jax.device_put(a, device), tree)
        leaves, treedef = jax.tree.flatten(self._place(params))
        self.static, self.params = _Model(graphdef, treedef), leaves
        self.base_config = model.config.base
        self.C = model.config.gate.chunk
        self.W = self.base_config.n_positions
        if BLOCK % self.C or self.W - config.max_new_tokens - BLOCK < 0:
            raise ValueError(
                f"max_new_tokens {config.max_new_tokens} leaves no room for a {BLOCK}-token block in a {self.W}-token window"
            )
        self.eot_id = model.config.eot_id if model.config.eot_id is not None else 0
        self.chunk_flops = float(sum(layer.update_flops(self.C) for layer in model.ttt))
        self.ready = False
        self.draining = False
        self.compilations = 0
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._prefilling: list[_Prefilling] = []  # parked between slices, oldest first
        self._in_flight: _Step | None = None  # the decode step whose tokens are not out yet
        # While slot 0 is the only busy slot, its state lives here as one row and steps alone:
        # a step on one row sliced out of all the slots' state (and written back) took 2.6 ms,
        # one on a one-row state 1.4 ms (bench/engine_step.py). Row 0 of ``_slots`` is stale then.
        self._lone: Slots | None = None
        self._sessions: collections.OrderedDict[tuple[str, str], Session] = collections.OrderedDict()
        self._session_bytes = 0
        self._anonymous = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.metrics.slots.set(config.slots)
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    # --- Public interface (thread-safe).

    def start(self, warmup: bool = True) -> None:
        """Starts the engine thread; with ``warmup``, compiles every shape first, then reports ready."""
        self._fresh_doc = self._place(self.model.init_state(1, self.config.schedule))
        self._slots = self._empty_slots()
        if warmup:
            self.warmup()
        self.ready = True
        self._thread = threading.Thread(target=self._loop, name="ponder-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues ``job``; a newer job of the same session cancels the older one.

        Raises:
          NotReady: before warm-up ends or while draining.
          QueueFull: the waiting queue is at ``queue_size``.
          RequestError: the job cannot fit the limits.
        """
        if not self.ready or self.draining:
            raise NotReady("the server is warming up" if not self.ready else "the server is shutting down")
        if job.max_new_tokens > self.config.max_new_tokens:
            raise RequestError("max_tokens", f"must be at most {self.config.max_new_tokens}, got {job.max_new_tokens}")
        if not job.tokens:
            raise RequestError("prompt", "holds no tokens")
        with self._lock:
            if len(self._waiting) >= self.config.queue_size:
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting, limit {self.config.queue_size})")
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
            session = self._sessions.pop((api_key, session_id), None)
            if session is not None:
                self._session_bytes -= session.counted
                self.metrics.sessions_reset.labels("explicit").inc()
                self._update_session_gauges()
            return session is not None

    def stop(self, drain_s: float = 30.0) -> None:
        """Graceful drain: refuse new jobs, let running and waiting ones finish (at most ``drain_s``), stop."""
        self.draining = True
        end = time.monotonic() + drain_s
        while time.monotonic() < end:
            with self._lock:
                if not self._waiting and not self._prefilling and not self._running:
                    break
            time.sleep(0.02)
        with self._lock:
            for job in list(self._jobs()):
                job.cancel("shutdown")
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def session_count(self) -> int:
        return len(self._sessions)

    def committed_tokens(self, api_key: str, session_id: str) -> list[int] | None:
        """A copy of the session's committed tokens (whole chunks; see ``Session``), or None if there is no such session."""
        with self._lock:
            session = self._sessions.get((api_key, session_id))
            return None if session is None else list(session.tokens)

    # --- Warm-up and compile counting.

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.compilations += 1
            self.metrics.compilations.inc()
            if self.ready and threading.current_thread() is self._thread:  # a shape warm-up missed: say where
                where = "".join(traceback.format_stack(limit=8)[:-1])
                log.warning("XLA compilation after warm-up (%.2f s); add its shape to warmup():\n%s", duration, where)

    def warmup(self) -> None:
        """Compiles every shape the engine uses, on throwaway inputs."""
        t0 = time.perf_counter()
        C, W = self.C, self.W
        for n in PREFILL_CHUNKS:
            self._call_prefill(self._fresh_doc, self._new_cache(), [self.eot_id] * (n * C), 0, 0)
        for length in sorted({self._fill_bucket(W - self.config.max_new_tokens - BLOCK + r) for r in range(0, BLOCK, C)}):
            _base_fill(self.static, self.params, *self._row([self.eot_id] * length, 0), self._new_cache())
        for length in EXTEND_LENGTHS:
            job = Job("", None, None, [self.eot_id] * length, 1)
            token, doc, cache = self._call_extend(job, self._fresh_doc, self._new_cache(), 0, 0, length)
        self._slots = _insert(self._slots, self._slot_row(job, doc, cache, token, 0, length), 0)
        self._lone = _first_row(self._slots)
        for keys in self._key_buckets():
            self._slots, *_ = self._decode(keys, self._slots)
            self._lone, *_ = self._decode(keys, self._lone)
        self._merge_lone()
        self._slots = _release(self._slots, 0)
        jax.block_until_ready(self._slots)
        self._slots = self._empty_slots()
        log.info("warm-up: %d compilations in %.1f s", self.compilations, time.perf_counter() - t0)

    # --- Shapes.

    def _new_cache(self) -> KVCache:
        return self._place(KVCache.init(self.base_config, 1, self.W))

    def _empty_slots(self) -> Slots:
        S = self.config.slots
        return self._place(Slots(
            cache=KVCache.init(self.base_config, S, self.W),
            doc=self.model.init_state(S, self.config.schedule),
            token=jnp.full((S,), self.eot_id, jnp.int32),
            position=jnp.zeros((S,), jnp.int32),
            doc_position=jnp.zeros((S,), jnp.int32),
            key=jax.random.split(jax.random.key(0), S),
            temperature=jnp.zeros((S,), jnp.float32),
            top_k=jnp.zeros((S,), jnp.int32),
            top_p=jnp.ones((S,), jnp.float32),
            active=jnp.zeros((S,), bool),
        ))

    def _fill_bucket(self, n: int) -> int:
        return -(-n // BLOCK) * BLOCK

    def window_start(self, position: int) -> int:
        """Document position of the window that encodes the block holding ``position``."""
        block_end = (position // BLOCK + 1) * BLOCK
        return max(0, block_end + self.config.max_new_tokens - self.W)

    @staticmethod
    def _row(tokens: list[int], first_position: int, pad_to: int | None = None):
        n = len(tokens) if pad_to is None else pad_to
        ids = np.zeros((1, n), np.int32)
        ids[0, : len(tokens)] = tokens
        return ids, (first_position + np.arange(n, dtype=np.int32))[None]

    # --- Prefill pieces.

    def _call_prefill(self, doc, cache, tokens, doc_start, window):
        ids, positions = self._row(tokens, doc_start - window)
        return _prefill_chunks(self.static, self.config.schedule, self.params, ids, positions, doc, cache)

    def _call_extend(self, job: Job, doc, cache, doc_start, window, length):
        tokens = job.tokens[doc_start : doc_start + length]
        T = next(n for n in EXTEND_LENGTHS if n >= len(tokens))
        ids, positions = self._row(tokens, doc_start - window, T)
        s = job.sampling
        sampling = (
            np.full((1,), s.temperature, np.float32), np.full((1,), s.top_k, np.int32), np.full((1,), s.top_p, np.float32)
        )
        key = jax.random.key(s.seed)[None]
        doc_position = np.full((1,), doc_start + len(tokens), np.int32)
        return _extend(
            self.static, self.config.schedule, self.params, ids, positions, np.full((1,), len(tokens), np.int32),
            doc, cache, key, doc_position, sampling,
        )

    def _slot_row(self, job: Job, doc, cache, token, window, doc_end) -> Slots:
        s = job.sampling
        return Slots(
            cache=cache,
            doc=doc,
            token=token,
            position=np.full((1,), doc_end - window, np.int32),
            doc_position=np.full((1,), doc_end, np.int32),
            key=jax.random.key(s.seed)[None],
            temperature=np.full((1,), s.temperature, np.float32),
            top_k=np.full((1,), s.top_k, np.int32),
            top_p=np.full((1,), s.top_p, np.float32),
            active=np.ones((1,), bool),
        )

    def _ensure_window(self, session: Session, tokens: list[int], position: int) -> None:
        """Makes the session's cache encode the window of the block holding ``position``."""
        start = self.window_start(position)
        if session.cache is not None and session.window == start:
            return
        cache = self._new_cache() if session.cache is None else session.cache
        if position > start:  # re-encode the window's earlier tokens (the base only)
            ids, positions = self._row(tokens[start:position], 0, self._fill_bucket(position - start))
            cache = _base_fill(self.static, self.params, ids, positions, cache)
        session.cache, session.window = cache, start

    def _run_chunks(self, session: Session, tokens: list[int], begin: int, end: int, doc, usage: Usage, lambdas, commit: bool):
        """Whole chunks ``tokens[begin:end]`` in dual form from ``doc``; returns the state after them.

        A generator: it yields the tokens of each call once the call is done.
        With ``commit``, the session's committed tokens and snapshots follow
        after every call, so the session is whole between calls. Calls never
        cross a window block and take the largest bucket first.
        """
        C, p = self.C, begin
        while p < end:
            self._ensure_window(session, tokens, p)
            room = min(end, (p // BLOCK + 1) * BLOCK) - p
            n = next(k for k in PREFILL_CHUNKS if k * C <= room)
            doc, session.cache, lam, updated, flops = self._call_prefill(doc, session.cache, tokens[p : p + n * C], p, session.window)
            self._count_chunks(usage, lambdas, np.asarray(lam), np.asarray(updated), float(flops))
            p += n * C
            if commit:
                session.tokens = tokens[:p]
                session.doc = doc
                session.snapshots.append((p, doc))
                del session.snapshots[: -self.config.snapshots]
            yield n * C
        return doc

    def _count_chunks(self, usage: Usage, lambdas: list[float], lam, updated, flops: float) -> None:
        """Books closed chunks (λ [n], updated [n], their update FLOPs) to the usage, ``lambdas`` and metrics."""
        for value, up in zip(lam.tolist(), updated.tolist()):
            self.metrics.chunk_lambda.observe(value)
            self.metrics.chunks.labels("updated" if up else "skipped").inc()
            usage.chunks_updated += int(up)
            usage.chunks_skipped += int(not up)
            lambdas.append(value)
        usage.ttt_flops += flops
        self.metrics.ttt_flops.inc(flops)

    def _count_decoded_chunk(self, usage: Usage, lambdas: list[float], value: float) -> None:
        """Books one chunk closed token by token."""
        updated = value > 0
        self._count_chunks(usage, lambdas, np.asarray([value]), np.asarray([updated]), self.chunk_flops if updated else 0.0)

    # --- Sessions (engine thread, under the lock).

    def _session_for(self, job: Job) -> tuple[Session, bool]:
        """The job's session, created or reset as the job asks: ``(session, reused)``."""
        sessions = self._sessions
        session_id = job.session_id
        if session_id is None:  # llama.cpp-style: the key's session sharing the longest prefix (a chunk at least)
            best, best_len = None, self.C - 1
            for (key, _), s in sessions.items():
                if key == job.api_key:
                    n = _common_prefix(s.tokens, job.tokens)
                    if n > best_len:
                        best, best_len = s, n
            session_id = best.session_id if best is not None else f"anonymous-{next(self._anonymous)}"
        session = sessions.get((job.api_key, session_id))
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
        reused = session is not None
        self.metrics.session_lookups.labels("hit" if reused else "miss").inc()
        if session is None:
            session = Session(job.api_key, session_id, job.document_id, [], self._fresh_doc, None, 0, [])
            sessions[(job.api_key, session_id)] = session
        if job.document_id is not None:
            session.document_id = job.document_id
        sessions.move_to_end((job.api_key, session_id))
        return session, reused

    def _drop(self, session: Session) -> None:
        if self._sessions.pop((session.api_key, session.session_id), None) is not None:
            self._session_bytes -= session.counted

    def _count(self, session: Session) -> None:
        """Brings ``_session_bytes`` up to date with ``session``, which a prefill has just changed.

        Only a prefill changes a session, and each is counted when its prefill
        ends: summing every session's arrays on every request instead took
        ~10 ms with a hundred sessions kept.
        """
        if self._sessions.get((session.api_key, session.session_id)) is session:  # not dropped meanwhile
            size = session.nbytes()
            self._session_bytes += size - session.counted
            session.counted = size

    def _evict(self, keep: Session) -> None:
        """Drops least recently used sessions until the cap holds (never ``keep`` or one being prefilled)."""
        cap = self.config.session_memory_mb * 2**20
        busy = [p.session for p in self._prefilling]  # sessions compare by identity
        for key in list(self._sessions):
            if self._session_bytes <= cap:
                break
            session = self._sessions[key]
            if session is keep or session in busy:
                continue
            self._drop(session)
            self.metrics.sessions_evicted.inc()
        self._update_session_gauges()

    def _update_session_gauges(self) -> None:
        self.metrics.sessions_active.set(len(self._sessions))
        self.metrics.session_bytes.set(self._session_bytes)

    def _rollback(self, session: Session, tokens: list[int]) -> int:
        """Rolls the session back to its last snapshot at or before where ``tokens`` leaves its history."""
        shared = _common_prefix(session.tokens, tokens)
        if shared >= len(session.tokens):
            return len(session.tokens)
        keep = [(b, s) for b, s in session.snapshots if b <= shared]
        session.snapshots = keep
        if keep:
            session.tokens, session.doc = session.tokens[: keep[-1][0]], keep[-1][1]
        else:
            session.tokens, session.doc = [], self._fresh_doc
        return len(session.tokens)

    # --- The loop.

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
        tokens = job.tokens
        eot_at = max(i for i, t in enumerate(tokens) if t == self.eot_id) if self.eot_id in tokens else 0
        with self._lock:
            session, reused = self._session_for(job)
            task.session = session
        if eot_at:  # an end-of-document token inside the prompt opens a new document there
            tokens = job.tokens = tokens[eot_at:]
        L = len(tokens)
        limit = L if job.commit_limit is None else max(0, min(L, job.commit_limit - eot_at))
        last = L if job.max_new_tokens == 0 else L - 1  # a completion keeps at least its last token for extend
        commit_end = min(last, limit) // C * C
        start = self._rollback(session, tokens[:commit_end])
        usage, lambdas = Usage(prompt_tokens=L, cached_tokens=start), []
        self.metrics.prompt_tokens.inc(L)
        doc = yield from self._run_chunks(session, tokens, start, commit_end, session.doc, usage, lambdas, commit=True)
        if job.max_new_tokens == 0:
            self.metrics.prefill_tokens.inc(commit_end - start)
            return session, usage, lambdas, None
        scratch_end = (L - 1) // C * C
        doc = yield from self._run_chunks(session, tokens, commit_end, scratch_end, doc, usage, lambdas, commit=False)
        self._ensure_window(session, tokens, scratch_end)
        window = session.window
        count_before = scratch_end
        token, doc, session.cache = self._call_extend(job, doc, session.cache, scratch_end, window, L - scratch_end)
        self.metrics.prefill_tokens.inc(L - start)
        if L // C > count_before // C:  # the extend closed a chunk
            self._count_decoded_chunk(usage, lambdas, float(np.asarray(doc.lam)[0]))
        return session, usage, lambdas, (token, doc, session.cache, window, L)

    def _admit(self) -> bool:
        """Starts one waiting job in a free slot (or finishes it). True if it did anything.

        The job's prompt runs up to ``SLICE_TOKENS`` tokens now (a warm
        keystroke: all of it); a longer one is parked in ``_prefilling`` and
        continues a slice per iteration of the loop, between decode steps.
        """
        with self._lock:
            reserved = {p.slot for p in self._prefilling}
            free = [i for i in range(self.config.slots) if i not in self._running and i not in reserved]
            if not free or not self._waiting:
                return False
            job = self._next_waiting()
            if job is None:
                return False
            self.metrics.waiting.set(len(self._waiting))
        self.metrics.queue_time.observe(time.monotonic() - job.arrival)
        task = _Prefilling(job, free[0])
        task.steps = self._prefill(task)
        self._advance(task, SLICE_TOKENS)
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
            self._finish_unstarted(job, "cancelled" if job.cancelled.is_set() else "deadline")
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
                self._count(task.session)

    def _start(self, task: _Prefilling, session: Session, usage: Usage, lambdas: list[float], first) -> None:
        """Puts a job whose prompt is done into its slot and emits its first token (an ingestion ends)."""
        job = task.job
        with self._lock:
            self._evict(keep=session)
        if first is None:
            job.put(TokenEvent([], lambdas))
            job.put(DoneEvent("length", usage, session.session_id))
            return
        token, doc, cache, window, doc_end = first
        self._merge_lone()  # the new job joins the others: slot 0 steps with them
        self._slots = _insert(self._slots, self._slot_row(job, doc, cache, token, window, doc_end), task.slot)
        running = _Running(job, session, usage, 0, time.monotonic(), doc_end - window + 1)
        with self._lock:
            self._running[task.slot] = running
            self.metrics.running.set(len(self._running))
        self._emit(task.slot, running, int(np.asarray(token)[0]), lambdas)

    def _next_waiting(self) -> Job | None:
        """Takes the waiting job with the least prompt to compute (caller holds the lock).

        A keystroke in a warm session costs one ``extend``; a cold document
        costs a prefill of all of it. Taking the cheap ones first keeps warm
        TTFT low while cold prompts arrive; a job waiting ``PATIENCE_S`` goes
        first regardless, so none starves. The estimate is the prompt minus
        what the session has committed (an edit looks cheaper than it is).
        While a long prompt is being prefilled, other long ones wait (they go
        one at a time), and so does a job whose session may be the one being
        prefilled. None when every waiting job waits.
        """

        def work(job: Job) -> int:
            session = self._sessions.get((job.api_key, job.session_id)) if job.session_id is not None else None
            fresh = session is None or job.reset or job.document_id not in (None, session.document_id)
            return len(job.tokens) - (0 if fresh else len(session.tokens))

        def clashes(job: Job, other: Job) -> bool:  # an anonymous job may match any session of its key
            ids = (job.session_id, other.session_id)
            return job.api_key == other.api_key and (None in ids or ids[0] == ids[1])

        parked = [p.job for p in self._prefilling]
        ready = [job for job in self._waiting
                 if not (parked and (work(job) > SLICE_TOKENS or any(clashes(job, other) for other in parked)))]
        if not ready:
            return None
        oldest = ready[0]
        if time.monotonic() - oldest.arrival < PATIENCE_S:
            oldest = min(ready, key=work)  # the first of equals: arrival order otherwise
        self._waiting.remove(oldest)
        return oldest

    def _finish_unstarted(self, job: Job, reason: str) -> None:
        if reason == "cancelled":
            self.metrics.cancellations.labels(job.cancel_reason).inc()
        job.put(DoneEvent(reason, Usage(prompt_tokens=len(job.tokens)), job.session_id or ""))

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
        if slot == 0:
            self._lone = None  # row 0 of ``_slots`` is stale, and idle from here on
        self._slots = _release(self._slots, slot)
        with self._lock:
            running = self._running.pop(slot)
            self.metrics.running.set(len(self._running))
        if reason == "cancelled":
            self.metrics.cancellations.labels(running.job.cancel_reason).inc()
        running.job.put(DoneEvent(reason, running.usage, running.session.session_id))

    def _key_buckets(self) -> list[int]:
        # 128 and 256 keys, else the whole window: XLA copies a sliced cache before reading it, so an
        # 8-row step reading 512 or 768 keys (5.4, 6.7 ms) costs more than reading all 1,024 (4.5 ms;
        # bench/engine_step.py).
        return sorted({min(self.W, 128), min(self.W, 256), self.W})

    def _decode(self, attend_keys: int, slots: Slots):
        return _decode(self.static, self.config.schedule, self.eot_id, attend_keys, self.params, slots)

    def _merge_lone(self) -> None:
        """Writes slot 0's lone state back into row 0 of ``_slots``."""
        if self._lone is not None:
            self._slots, self._lone = _insert(self._slots, self._lone, 0), None

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
            longest = max(r.window_end for r in self._running.values())  # window position after this step
            attend_keys = next(k for k in self._key_buckets() if k >= longest)
            if max(self._running) == 0:  # slot 0 alone (jobs take the lowest free slot)
                if self._lone is None:
                    self._lone = _first_row(self._slots)
                self._lone, tokens, lam, count = self._decode(attend_keys, self._lone)
            else:
                self._merge_lone()
                self._slots, tokens, lam, count = self._decode(attend_keys, self._slots)
            for running in self._running.values():
                running.window_end += 1
            self._in_flight = _Step(tokens, lam, count, dict(self._running))
        if previous is not None:
            self._hand_out(previous)

    def _hand_out(self, step: _Step) -> None:
        """Emits a finished step's token to each job that was running then and still is."""
        tokens, lam, count = (np.asarray(a) for a in (step.tokens, step.lam, step.count))
        for slot, running in step.running.items():
            if self._running.get(slot) is not running:
                continue  # ended after the step started (or its slot went to another job)
            if running.job.cancelled.is_set():
                self._finish(slot, "cancelled")
                continue
            lambdas = []
            if count[slot] % self.C == 0:  # the token fed closed a chunk
                self._count_decoded_chunk(running.usage, lambdas, float(lam[slot]))
            self._emit(slot, running, int(tokens[slot]), lambdas)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._prefilling and not self._running:
                    self._lock.wait()
                if self._stop:
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
                busy = len(self._running) + len(self._prefilling)
                dispatch = bool(self._running) and not (admitted and self._waiting and busy < self.config.slots)
                if dispatch or self._in_flight is not None:
                    self._step(dispatch)
            except Exception:  # pragma: no cover - a bug; keep serving and fail the running requests
                log.exception("engine step failed")
                for slot in list(self._running):
                    self._running[slot].job.put(ErrorEvent(RuntimeError("the engine failed; see the server log")))
                    with self._lock:
                        self._running.pop(slot, None)
                self._slots, self._lone, self._in_flight = self._empty_slots(), None, None
