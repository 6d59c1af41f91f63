"""The model runner: every compiled call of the engine, and the decode slots' state.

The only part of the server that touches JAX. The engine (``server/engine.py``)
decides what runs when; this module runs it: dual-form ``prefill`` of whole
chunks, ``extend`` of an open chunk with the first sampled token, the window
re-encode, ``insert`` of a prepared row into a decode slot, and ``decode``
of one token for every busy slot. ``tests/fake_runner.py`` implements the
same methods without a model, so the engine's policy is tested on its own.

Document states (``DocState``, or the In-Place and LoRA fast weights'
states) and KV caches pass through the engine as opaque values: it stores
them in sessions and hands them back.

Three kinds of fast weights are served: the TTT layer on top of the base,
In-Place TTT and LoRA (docs/design.md, "Other fast weights: In-Place TTT and LoRA").
The last two follow the schedules ``model.inplace.SCHEDULES``, and LoRA with
a fitted read gate also ``learned`` and ``learned_budget`` (whose per-session
budget it reads, ``model.read_gate``); both change the top blocks' keys and values,
so their KV cache depends on the document's fast weights
(``ModelRunner.fast_keys``).

Long documents. Positions are learned up to the context window W, so the
base attends within a window: tokens in block k (``BLOCK`` tokens each) are
encoded with the window starting at ``window_start(k * BLOCK)``, which
leaves at least ``max_new_tokens`` positions free for generation. Moving to
the next block re-encodes the window's earlier tokens with the base (a
prefill, no TTT). The fast weights see the whole document.

Compiled shapes: dual-form prefill of 1, 2 or 4 chunks; ``extend`` of 16,
32 or 64 tokens; the window re-encode at two lengths; ``insert``; the decode
step over every slot, or, while only slot 0 is busy (``HEAD_ROWS``), over
its row on a state of its own, reading 128, 256 or all cache keys (the
smaller reads only where the slice XLA copies is small,
``SLICE_COPY_BYTES``). ``warmup`` compiles them all
before the engine reports ready; the compile counter (every XLA compilation
of the process) stays flat afterwards.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import gc
import logging
import os
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponder.model.doc_state import DocState
from ponder.model.document import FastWeightLM as Served
from ponder.model.document import chunk_size, chunk_work, clipped, initial_state
from ponder.model.gating import Schedule
from ponder.model.gpt2 import GPT, KVCache
from ponder.model.inplace import SCHEDULES as FIXED_SCHEDULES
from ponder.model.lora import LoRALM
from ponder.model.read_gate import READ_SCHEDULES
from ponder.model.sampling import SamplerRows, Sampling, accept, ring, sample
from ponder.model.ttt import TTTConfig
from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM
from ponder.runtime import HeapTrimmer
from ponder.server.metrics import ServerMetrics
from ponder.server.types import Job

log = logging.getLogger("ponder.engine")

BLOCK = 256  # tokens per window block (a multiple of the gate chunk)
PREFILL_CHUNKS = (4, 2, 1)  # dual-form prefill calls, in chunks (largest first)
EXTEND_LENGTHS = (16, 32, 64)  # extend buckets, in tokens
# While only slots below n are busy, their n rows step on their own state. Slot 0 alone (n = 1) pays:
# 1.4 against 2.6 ms a step at tiny. Slots 0-3 (n = 4) were measured at 124M, 8 slots, 4 streams:
# +2% aggregate tokens/s (noise) for +670 MiB resident (bench/README.md), so they step with the rest.
HEAD_ROWS = (1,)
# Tokens a lone stream decodes per call while no other request waits: the per-call cost (dispatch,
# the engine's hand-out, waking the front end) is paid once for them (bench/README.md).
LONE_STEPS = 4
KEY_BUCKETS = (128, 256)  # attention may read only this many cache slots (then the whole window)
# A bucket makes XLA copy the slice of every layer's cache it reads; past this many bytes the copy
# costs more than reading every key in place (bench/README.md, "Head rows and key buckets at 124M").
SLICE_COPY_BYTES = 48 << 20


def as_served_model(model: GPT | Served) -> Served:
    """The model as served: fast-weight models as they are; a base-only checkpoint through the TTT
    path, with a fresh TTT layer (zero output projection) on top that predicts exactly what the base does."""
    if isinstance(model, Served):
        return model
    if not isinstance(model, GPT):
        raise ValueError(f"the server runs GPT-2, TTT-layer, In-Place and LoRA checkpoints, not {type(model).__name__}")
    c = model.config
    config = TTTLMConfig(base=c, ttt=TTTConfig(width=c.n_embd, n_head=c.n_head))
    return TTTTransformerLM(config, rngs=nnx.Rngs(0), base=model)


# --- Compiled functions (the graph is static, parameters are arguments).


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """Every decode slot's state, one row per slot."""

    cache: KVCache
    doc: DocState
    token: jax.Array  # [S] last sampled token, fed next
    position: jax.Array  # [S] window position ``token`` takes
    doc_position: jax.Array  # [S] document position ``token`` takes (sampling keys)
    key: jax.Array  # [S] sampling key
    sampler: SamplerRows  # [S] each slot's sampling controls
    recent: jax.Array  # [S, W] ring of each slot's document tokens before ``token`` (the penalties' window)
    active: jax.Array  # [S] bool: the slot holds a job (idle slots feed end-of-document at position 0)


@dataclasses.dataclass(frozen=True, eq=False)
class _Model:
    """The model's static half for the compiled functions below, with its parameters' tree structure.

    Hashed by identity, and the parameters travel as a flat list: a graphdef's
    own hash and an ``nnx.State``'s flattening walk the whole module tree,
    which measured 2.4 ms of Python per decode step.
    """

    graphdef: nnx.GraphDef
    treedef: jax.tree_util.PyTreeDef

    def merge(self, leaves: list) -> Served:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("cache",))
def _prefill_chunks(model: _Model, schedule, params, tokens, positions, doc, cache):
    """Whole chunks [1, T] in dual (parallel) form:
    ``(doc, cache, chunk_lambda [n], chunk_updated [n], update FLOPs, capped updates)``."""
    m = model.merge(params)
    out = m(tokens, positions, schedule, state=doc, cache=cache)
    updated, flops = chunk_work(m, out, schedule)
    return out.state, out.cache, out.chunk_lambda[0], updated[0], flops[0], (clipped(out.state) - clipped(doc)).sum()


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _base_fill(model: _Model, params, tokens, positions, cache):
    """The base alone on [1, T] tokens from window position 0 into the KV cache (a window move)."""
    _, _, cache = model.merge(params).base(tokens, positions, cache, compute_logits=False, attend_keys=0)
    return cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("cache",))
def _extend(model: _Model, schedule, params, tokens, positions, length, doc, cache, key, doc_position, sampler, recent):
    """An open chunk's tokens [1, T] (``length`` real) and the first sampled token: ``(token [1], doc, cache, capped updates)``.

    ``recent``: the ring of the document's tokens before ``doc_position``, where the sampled token goes.
    """
    logits, cache, new_doc = model.merge(params).extend(tokens, positions, length, cache, doc, schedule)
    keys = jax.vmap(jax.random.fold_in)(key, doc_position)
    return sample(logits, keys, sampler, recent, doc_position - 1), new_doc, cache, (clipped(new_doc) - clipped(doc)).sum()


@functools.partial(jax.jit, donate_argnames=("slots",))
def _insert(slots: Slots, row: Slots, index):
    """Writes a one-row ``Slots`` into row ``index`` of ``slots``."""
    put = lambda a, b: jax.lax.dynamic_update_slice(a, b.astype(a.dtype), (index,) + (0,) * (a.ndim - 1))
    return jax.tree.map(put, slots, row)


@functools.partial(jax.jit, donate_argnames=("slots",))
def _release(slots: Slots, index):
    """Marks slot ``index`` idle."""
    return dataclasses.replace(slots, active=slots.active.at[index].set(False))


@functools.partial(jax.jit, static_argnums=1)
def _first_rows(slots: Slots, n: int) -> Slots:
    """Slots 0 to n - 1's state as an n-row ``Slots`` (a copy)."""
    return jax.tree.map(lambda x: x[:n], slots)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnames=("slots",))
def _decode(model: _Model, schedule, eot_id, attend_keys, steps, params, slots: Slots):
    """``steps`` tokens for every row of ``slots``, one after the other (``_decode_one``).

    Returns ``(slots, tokens, lam, count, capped updates)``, the per-row outputs
    [steps, S]: several steps in one call save the call's fixed cost (dispatch,
    the engine's hand-out), which a lone stream pays on every token.
    """
    def one(slots, _):
        slots, token, lam, count, clips = _decode_one(model, schedule, eot_id, attend_keys, params, slots)
        return slots, (token, lam, count, clips)

    slots, (tokens, lam, count, clips) = jax.lax.scan(one, slots, length=steps)
    return slots, tokens, lam, count, clips.sum()


def _decode_one(model: _Model, schedule, eot_id, attend_keys, params, slots: Slots):
    """One token for every row of ``slots``: ``(slots, tokens [S], lam [S], count [S], capped updates)``.

    Attention reads the first ``attend_keys`` cache slots only (a bucket
    above every live row's position): on this CPU, reading all of every
    slot's cache cost more than the weights.
    """
    model = model.merge(params)
    fed = jnp.where(slots.active, slots.token, eot_id)
    position = jnp.where(slots.active, slots.position, 0)
    logits, cache, doc = model.step(fed, position, slots.cache, slots.doc, schedule, attend_keys)
    clips = jnp.where(slots.active, clipped(doc) - clipped(slots.doc), 0).sum()  # idle rows' updates are thrown away
    keys = jax.vmap(jax.random.fold_in)(slots.key, slots.doc_position + 1)
    recent = accept(slots.recent, slots.doc_position, fed)
    token = sample(logits, keys, slots.sampler, recent, slots.doc_position)
    slots = dataclasses.replace(
        slots, cache=cache, doc=doc, token=token, position=position + 1, doc_position=slots.doc_position + 1,
        recent=recent,
    )
    return slots, token, doc.lam, doc.count, clips


# --- The runner.


def _row(tokens: list[int], first_position: int, pad_to: int | None = None):
    """``tokens`` as ids [1, n] (zero-padded to ``pad_to``) with their positions [1, n]."""
    n = len(tokens) if pad_to is None else pad_to
    ids = np.zeros((1, n), np.int32)
    ids[0, : len(tokens)] = tokens
    return ids, (first_position + np.arange(n, dtype=np.int32))[None]


def resident_bytes() -> int | None:
    """The process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ModelRunner:
    """Runs the model for the engine: the compiled calls and the decode slots' state.

    Called from the engine thread only (``warmup`` before it starts). A
    document state (``doc``) or KV cache (``cache``) handed in is consumed:
    use the one returned. Tokens, λ and counts come back as arrays that are
    still being computed; ``np.asarray`` waits for them.

    Attributes:
      model: the fast-weight model served (a base-only checkpoint gets a fresh TTT layer).
      chunk: tokens per chunk (C) of the fast weights: prompts are committed in whole chunks.
      fast_keys: the top blocks' keys and values depend on the document's fast weights (In-Place,
        LoRA), so a window re-encoded by the base is exact only at a block start (``BLOCK``).
      reads_budget: the document state carries a per-session budget (the TTT layer's gate, LoRA's under ``learned_budget``).
      eot_id: the end-of-document token.
      chunk_flops: update FLOPs of one chunk closed while decoding.
      compilations: XLA compilations of the process since this runner was made.
      serving_thread: compilations on this thread are logged as missed warm-up shapes.
    """

    def __init__(self, model: GPT | Served, slots: int, max_new_tokens: int, schedule: Schedule,
                 metrics: ServerMetrics):
        model = as_served_model(model)
        is_ttt = isinstance(model, TTTTransformerLM)
        gated = isinstance(model, LoRALM) and model.gate is not None and schedule.kind in READ_SCHEDULES
        if not is_ttt and schedule.kind not in FIXED_SCHEDULES and not gated:
            more = " (and learned / learned_budget once `ponder train gate` has fitted its gate)" \
                if isinstance(model, LoRALM) else ""
            raise ValueError(f"{model.config.KIND} fast weights follow the schedules {', '.join(FIXED_SCHEDULES)}{more}, "
                             f"not {schedule.kind!r}: serve with --schedule update")
        self.model, self.slots, self.max_new_tokens, self.schedule = model, slots, max_new_tokens, schedule
        self.metrics = metrics
        graphdef, params = nnx.split(model)
        # One plain device placement for every array: a checkpoint's parameters carry
        # mesh shardings whose propagation into outputs would make a state fed back
        # into a compiled function look like a new input type (a recompilation).
        device = jax.devices()[0]
        self._place = lambda tree: jax.tree.map(lambda a: jax.device_put(a, device), tree)
        leaves, treedef = jax.tree.flatten(self._place(params))
        self.static, self.params = _Model(graphdef, treedef), leaves
        self.base_config = model.config.base
        self.chunk = chunk_size(model)
        self.fast_keys, self.reads_budget = not is_ttt, is_ttt or (gated and schedule.kind == "learned_budget")
        self.W = self.base_config.n_positions
        if BLOCK % self.chunk or self.W - max_new_tokens - BLOCK < 0:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for a {BLOCK}-token block in a {self.W}-token window"
            )
        self.eot_id = model.config.eot_id if model.config.eot_id is not None else 0
        self.chunk_flops = float(sum(layer.update_flops(self.chunk) for layer in model.ttt)) if is_ttt \
            else model.update_flops()
        self.compilations = 0
        self.serving_thread: threading.Thread | None = None
        self._fresh_doc: DocState | None = None
        self._slots: Slots | None = None
        # While only slots below n (``HEAD_ROWS``) are busy, their state lives here as n rows and
        # steps alone: a step on one row sliced out of all the slots' state (and written back) took
        # 2.6 ms, one on a one-row state 1.4 ms (bench/engine_step.py, tiny). Rows 0 to n - 1 of
        # ``_slots`` are stale then.
        self._head: Slots | None = None
        self.head_rows = tuple(n for n in HEAD_ROWS if n < slots)
        self.lone_steps = LONE_STEPS if 1 in self.head_rows else 1
        self._clips: list[jax.Array] = []  # capped-update counts of calls still running (booked at the next call)
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    # --- Set-up.

    def start(self) -> None:
        """Allocates the empty document state and the decode slots (before ``warmup``)."""
        self._fresh_doc = self._place(initial_state(self.model, 1, self.schedule))
        self._slots = self.empty_slots()
        self.metrics.memory.labels("weights").set(self.state_bytes(self.params))
        head = jax.eval_shape(lambda slots: [_first_rows(slots, n) for n in self.head_rows], self._slots)  # no copy
        head_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(head))
        self.metrics.memory.labels("slots").set(self.state_bytes(self._slots) + head_bytes)

    def empty_doc(self, rate: float) -> DocState:
        """The state of an empty document whose budget (``GateHistory.target``) is ``rate`` (shared; never changed in place)."""
        if rate == self.schedule.rate or not self.reads_budget:  # the engine refuses a rate such states ignore
            return self._fresh_doc
        return self.model.with_target(self._fresh_doc, self._place(np.full((1,), rate, np.float32)))

    def _book_clips(self, clips=None, wait: bool = False) -> None:
        """Adds capped-update counts to the metrics: those of earlier calls, and ``clips`` (this call's) now
        with ``wait``, else at the next call (a decode step's outputs are still being computed)."""
        pending = self._clips + ([] if clips is None else [clips])
        self._clips = [] if wait else pending[-1:] if clips is not None else []
        for count in pending if wait else pending[: len(pending) - len(self._clips)]:
            if self.serving_thread is not None:  # not the warm-up's throwaway inputs
                self.metrics.fast_weight_clips.inc(int(count))

    def state_bytes(self, tree) -> int:
        """Bytes held by the arrays of ``tree`` (states, caches, lists of them; None counts 0)."""
        return sum(a.nbytes for a in jax.tree.leaves(tree))

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.compilations += 1
            self.metrics.compilations.inc()
            if threading.current_thread() is self.serving_thread:  # a shape warm-up missed: say where
                where = "".join(traceback.format_stack(limit=8)[:-1])
                log.warning("XLA compilation after warm-up (%.2f s); add its shape to warmup():\n%s", duration, where)

    def warmup(self) -> None:
        """Compiles every shape the runner uses, on throwaway inputs."""
        gc.collect()  # what loading left (a checkpoint's float32 weights once stored in fewer bits) goes back first
        HeapTrimmer(interval_s=0)()
        t0, resident = time.perf_counter(), resident_bytes()
        C, W = self.chunk, self.W
        for n in PREFILL_CHUNKS:
            self.prefill(self._fresh_doc, self._new_cache(), [self.eot_id] * (n * C), 0, 0)
        for length in sorted({self._fill_bucket(W - self.max_new_tokens - BLOCK + r) for r in range(0, BLOCK, C)}):
            _base_fill(self.static, self.params, *_row([self.eot_id] * length, 0), self._new_cache())
        for length in EXTEND_LENGTHS:
            job = Job("", None, None, [self.eot_id] * length, 1)
            token, _, doc, cache = self.extend(job, self._fresh_doc, self._new_cache(), 0, 0, length)
        self.insert(0, job, doc, cache, token, 0, length)
        for keys in self._key_buckets(self.slots):
            self._slots, *_ = self._decode(keys, self._slots)
        for n in self.head_rows:
            self._head = _first_rows(self._slots, n)
            self._head = _release(self._head, 0)
            self.insert(0, job, doc, cache, token, 0, length)
            for keys in self._key_buckets(n):
                for steps in {1, self.lone_steps if n == 1 else 1}:
                    self._head, *_ = self._decode(keys, self._head, steps)
            self._merge_head()
        self._slots = _release(self._slots, 0)
        jax.block_until_ready(self._slots)
        self._slots = self.empty_slots()
        self._clips = []  # the throwaway inputs' updates are not the server's
        HeapTrimmer(interval_s=0)()  # the throwaway inputs' buffers and the compilers' scratch go back
        if resident is not None:
            self.metrics.memory.labels("warmup").set(resident_bytes() - resident)
        log.info("warm-up: %d compilations in %.1f s", self.compilations, time.perf_counter() - t0)

    # --- Shapes and windows.

    def _new_cache(self) -> KVCache:
        return self._place(KVCache.init(self.base_config, 1, self.W))

    def empty_slots(self) -> Slots:
        """Every slot idle (a fresh allocation)."""
        S = self.slots
        return self._place(Slots(
            cache=KVCache.init(self.base_config, S, self.W),
            doc=initial_state(self.model, S, self.schedule),
            token=jnp.full((S,), self.eot_id, jnp.int32),
            position=jnp.zeros((S,), jnp.int32),
            doc_position=jnp.zeros((S,), jnp.int32),
            key=jax.random.split(jax.random.key(0), S),
            sampler=jax.tree.map(lambda a: np.repeat(a, S, axis=0), Sampling().rows(self.W, 0)),
            recent=jnp.zeros((S, self.W), jnp.int32),
            active=jnp.zeros((S,), bool),
        ))

    @staticmethod
    def _fill_bucket(n: int) -> int:
        return -(-n // BLOCK) * BLOCK

    def _key_buckets(self, rows: int) -> list[int]:
        """The cache slots a step over ``rows`` rows may read: ``KEY_BUCKETS`` whose slice is small enough to
        copy, and the whole window. XLA copies a sliced cache before reading it: an 8-row step reading 512
        or 768 keys (5.4, 6.7 ms) cost more than reading all 1,024 (4.5 ms) at ``tiny``; at 124M an 8-row
        step reading 128 or 256 keys (75 or 151 MB copied: 55, 101 ms) more than reading all (42 ms), while
        4 rows reading 128 (38 MB) gained (24 against 30 ms; bench/engine_step.py)."""
        c = self.base_config
        copy = lambda keys: rows * c.n_layer * 2 * keys * c.n_embd * jnp.dtype(c.compute_dtype).itemsize
        return sorted({min(self.W, k) for k in KEY_BUCKETS if copy(k) <= SLICE_COPY_BYTES} | {self.W})

    def window_start(self, position: int) -> int:
        """Document position of the window that encodes the block holding ``position``."""
        block_end = (position // BLOCK + 1) * BLOCK
        return max(0, block_end + self.max_new_tokens - self.W)

    def prefill_size(self, position: int, end: int) -> int:
        """Tokens the next prefill call from ``position`` takes toward ``end`` (whole chunks, ``end - position`` at least one).

        The largest compiled call that fits and does not cross a window block.
        """
        room = min(end, (position // BLOCK + 1) * BLOCK) - position
        return next(k for k in PREFILL_CHUNKS if k * self.chunk <= room) * self.chunk

    # --- Prefill.

    def encode_window(self, cache: KVCache | None, tokens: list[int]) -> KVCache:
        """A cache (``cache`` reused, or a new one) holding the base's keys and values of ``tokens`` from window position 0.

        A window move: the window's tokens before the block are re-encoded
        with the base alone (the fast weights already saw them).
        """
        cache = self._new_cache() if cache is None else cache
        if not tokens:
            return cache
        ids, positions = _row(tokens, 0, self._fill_bucket(len(tokens)))
        return _base_fill(self.static, self.params, ids, positions, cache)

    def prefill(self, doc: DocState, cache: KVCache, tokens: list[int], doc_start: int, window: int):
        """Whole chunks ``tokens`` (one compiled size) in dual form, from document position ``doc_start``.

        Args:
          doc: the state after the document's first ``doc_start`` tokens.
          cache: the base's cache of the window starting at document position ``window``.
        Returns:
          ``(doc, cache, chunk_lambda [n], chunk_updated [n], ttt_flops)``: the state and cache after
          the tokens, then λ and whether the fast weights moved for each of the n chunks (NumPy), and
          the FLOPs their updates cost.
        """
        ids, positions = _row(tokens, doc_start - window)
        doc, cache, lam, updated, flops, clips = _prefill_chunks(self.static, self.schedule, self.params, ids, positions, doc, cache)
        self._book_clips(clips, wait=True)  # the engine waits for λ anyway
        return doc, cache, np.asarray(lam), np.asarray(updated), float(flops)

    def extend(self, job: Job, doc: DocState, cache: KVCache, doc_start: int, window: int, length: int):
        """The open chunk ``job.tokens[doc_start : doc_start + length]`` token by token, and the first new token.

        Sampled with the job's sampling controls, keyed by document position; the repetition
        penalties read the job's tokens up to there.

        Returns:
          ``(token [1], lam [1], doc, cache)``: the first generated token, λ of the state after the
          tokens (the chunk's, if they closed one), the state and the cache.
        """
        tokens = job.tokens[doc_start : doc_start + length]
        T = next(n for n in EXTEND_LENGTHS if n >= len(tokens))
        ids, positions = _row(tokens, doc_start - window, T)
        end = doc_start + len(tokens)
        token, doc, cache, clips = _extend(
            self.static, self.schedule, self.params, ids, positions, np.full((1,), len(tokens), np.int32),
            doc, cache, jax.random.key(job.sampling.seed)[None], np.full((1,), end, np.int32),
            job.sampling.rows(self.W, end), ring(job.tokens[:end], self.W),
        )
        self._book_clips(clips)
        return token, doc.lam, doc, cache

    # --- Decode slots.

    def insert(self, slot: int, job: Job, doc: DocState, cache: KVCache, token, window: int, doc_end: int) -> None:
        """Puts a job into decode slot ``slot``: ``token`` [1] (from ``extend``) is fed next, at document position ``doc_end``."""
        row = Slots(
            cache=cache,
            doc=doc,
            token=token,
            position=np.full((1,), doc_end - window, np.int32),
            doc_position=np.full((1,), doc_end, np.int32),
            key=jax.random.key(job.sampling.seed)[None],
            sampler=job.sampling.rows(self.W, doc_end),
            recent=ring(job.tokens[:doc_end], self.W),
            active=np.ones((1,), bool),
        )
        if self._head is not None and slot < len(self._head.active):  # joins the head rows' own state
            self._head = _insert(self._head, row, slot)
        else:
            self._merge_head()  # the new job joins the others: every slot steps together
            self._slots = _insert(self._slots, row, slot)

    def release(self, slot: int) -> None:
        """Marks ``slot`` idle."""
        if self._head is not None and slot < len(self._head.active):
            self._head = _release(self._head, slot)
        else:
            self._slots = _release(self._slots, slot)

    def reset(self) -> None:
        """Every slot idle, on fresh arrays (after a failed step)."""
        self._slots, self._head = self.empty_slots(), None

    def _decode(self, attend_keys: int, slots: Slots, steps: int = 1):
        slots, tokens, lam, count, clips = _decode(self.static, self.schedule, self.eot_id, attend_keys, steps,
                                                   self.params, slots)
        self._book_clips(clips)
        return slots, tokens, lam, count

    def _merge_head(self) -> None:
        """Writes the head rows' own state back into the first rows of ``_slots``."""
        if self._head is not None:
            self._slots, self._head = _insert(self._slots, self._head, 0), None

    def decode(self, busy: collections.abc.Collection[int], window_end: int, steps: int = 1):
        """Starts ``steps`` decode steps: every busy slot feeds its last token and samples the next, in turn.

        Args:
          busy: the slots that hold a job.
          window_end: the highest busy slot's window position after these steps (the keys attention reads).
          steps: 1, or ``lone_steps`` while only slot 0 is busy.
        Returns:
          ``(tokens, lam, count)``, each [steps, slots] (by step, then slot): the new tokens, and λ and
          the document's token count of each state after the token fed (a count that is a multiple of
          ``chunk`` closed one).
        """
        n = next((n for n in self.head_rows if max(busy) < n), None)  # jobs take the lowest free slot
        if steps != 1 and n != 1:
            raise ValueError(f"{steps} steps in one call are for slot 0 alone, not slots {sorted(busy)}")
        if n is None:
            self._merge_head()
            attend_keys = next(k for k in self._key_buckets(self.slots) if k >= window_end)
            self._slots, tokens, lam, count = self._decode(attend_keys, self._slots)
            return tokens, lam, count
        if self._head is not None and len(self._head.active) != n:
            self._merge_head()
        if self._head is None:
            self._head = _first_rows(self._slots, n)
        attend_keys = next(k for k in self._key_buckets(n) if k >= window_end)
        self._head, tokens, lam, count = self._decode(attend_keys, self._head, steps)
        return tokens, lam, count
