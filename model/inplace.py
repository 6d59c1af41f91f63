"""In-Place TTT: the MLP down projections of GPT-2's top blocks are the fast weights (issue 22).

The base stays as published, except that in the top ``InPlaceConfig.layers``
blocks the MLP's ``c_proj`` kernel (W_down, [F = 4D, D]) is a per-document
fast weight that starts at the pretrained value; ``c_fc`` (W_up) and every
bias stay frozen. With every update skipped the model is exactly the base.

The update of chunk c (C tokens) in block l is an outer-product step toward
an LM-aligned target::

    Z_t  = gelu(LN_2(x_t) W_up + b_up)                   [F]   (block l's MLP activation)
    V̂_t  = (sum_j k_j * X0_{t+1-j}) W_target[l]           [D]   (X0: token embeddings)
    Δ_c  = clip(λ_c η sum_{t in c} Z_tᵀ V̂_t)              [F, D]

The depthwise convolution ``k`` (width ``conv_width``) ends at token t+1, the
token the LM must predict at t, so the fast weights learn what next-token
prediction needs; ``k`` and ``W_target`` are the slow weights stage 2 trains
(``W_target`` starts at zero: a new model is the base under any schedule).
Each delta is clipped to a Frobenius norm (``clip``; clipped deltas are
counted per row), and fast weights are float32 whatever the model dtype.

Apply-then-update: chunk c runs with W_down + Σ_{c' < c} Δ_c'. ``__call__``
computes every chunk's delta at once and combines them with a causal prefix
sum (restricted to each packed document); ``step`` accumulates the open
chunk's Σ Z_tᵀ V̂_t token by token and applies it when the next chunk's
first token arrives (the last target needs that token), so both give the
same numbers. A state on a chunk boundary therefore still holds the last
chunk's pending update (``InPlaceState.acc`` and ``z_last``).

Schedules: lam per chunk comes from ``skip``, ``update``, ``fixed`` or
``random`` (``Schedule``), or from ``chunk_lambda``; a chunk with lam = 0
does no update work when no row of the batch updates it. No gate drives
this kind: a lam chosen from chunk c's read (as LoRA's read gate does) would
depend on every earlier lam, so the deltas could not be computed at once.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ponder.model.config import FastBlocksConfig, GPTConfig
from ponder.model.fast_weights import select_rows
from ponder.model.gating import Schedule
from ponder.model.gpt2 import GPT, KVCache

SCHEDULES = ("skip", "update", "fixed", "random")  # the schedules in-place and LoRA fast weights follow


def schedule_lambda(schedule: Schedule, count, chunk: int):
    """[B] lam of the chunk (``chunk`` tokens) starting at document position ``count`` [B], for ``SCHEDULES``."""
    B = count.shape[0]
    if schedule.kind == "skip":
        return jnp.zeros((B,), jnp.float32)
    if schedule.kind == "update":
        return jnp.ones((B,), jnp.float32)
    if schedule.kind == "fixed":
        return jnp.full((B,), schedule.value, jnp.float32)
    if schedule.kind == "random":
        key = jax.random.key(schedule.seed)
        draw = lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), schedule.rate)
        return jax.vmap(draw)(count // chunk).astype(jnp.float32)
    raise ValueError(f"these fast weights follow the schedules {SCHEDULES}, not {schedule.kind!r}")


def _rows(rows, new, old):
    return jax.tree.map(lambda a, b: select_rows(rows, a, b), new, old)


def extend_by_steps(step, tokens, positions, length, cache: KVCache, state):
    """``step(token [B], position [B], cache, state) -> (logits, cache, state)`` over up to T tokens per row.

    The serving path's prompt tail (fewer tokens than a chunk, read as
    decoding reads them), under ``lax.scan``. Rows are right-padded: tokens
    at or after ``length`` [B] leave the state as it was (their keys land in
    the cache past the row's end, where attention never looks).

    Returns:
      ``(logits [B, V] at each row's last real token, cache, state)``.
    """
    logits_shape = jax.eval_shape(step, tokens[:, 0], positions[:, 0], cache, state)[0]

    def one(carry, inputs):
        cache, state, last = carry
        t, token, position = inputs
        logits, cache, new_state = step(token, position, cache, state)
        real = t < length  # [B]
        return (cache, _rows(real, new_state, state), select_rows(real, logits, last)), None

    inputs = (jnp.arange(tokens.shape[1]), tokens.T, positions.T)
    last = jnp.zeros(logits_shape.shape, logits_shape.dtype)
    (cache, state, last), _ = jax.lax.scan(one, (cache, state, last), inputs)
    return last, cache, state


@dataclasses.dataclass(frozen=True)
class InPlaceConfig:
    """In-place fast weights.

    Attributes:
      layers: how many of the base's top blocks have a fast W_down.
      chunk: tokens per update (lam is chosen per chunk).
      eta: step size of an update (times lam).
      clip: Frobenius-norm cap of one chunk's delta (0: none).
      conv_width: taps of the target's causal convolution over token embeddings.
    """

    layers: int = 1
    chunk: int = 64
    eta: float = 1e-3
    clip: float = 1.0
    conv_width: int = 4

    def __post_init__(self):
        for name in ("layers", "chunk", "conv_width"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"InPlaceConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.clip < 0:
            raise ValueError(f"InPlaceConfig.clip must be >= 0 (0: no cap), got {self.clip!r}")


@dataclasses.dataclass(frozen=True)
class InPlaceLMConfig(FastBlocksConfig):
    KIND: ClassVar[str] = "inplace"
    SETTINGS: ClassVar[type] = InPlaceConfig

    base: GPTConfig
    inplace: InPlaceConfig = InPlaceConfig()
    eot_id: int | None = None  # a document starts with this token: decoding resets the fast weights there


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class InPlaceState:
    """One document's in-place state per row.

    Attributes:
      W: [B, L, F, D] float32 fast W_down of each fast block (updates of closed chunks applied).
      acc: [B, L, F, D] float32 Σ Z_tᵀ V̂_t of the open chunk so far (its last token's term waits on the next token).
      z_last: [B, L, F] float32 the last token's MLP activation per fast block.
      history: [B, conv_width - 1, D] the last token embeddings (the target convolution's window).
      count: [B] tokens of the document seen so far.
      lam: [B] lam of the open chunk.
      clipped: [B] deltas clipped so far.
    """

    W: jax.Array
    acc: jax.Array
    z_last: jax.Array
    history: jax.Array
    count: jax.Array
    lam: jax.Array
    clipped: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class InPlaceOutput:
    logits: jax.Array  # [B, T, V] float32
    chunk_lambda: jax.Array  # [B, n_chunks]
    state: InPlaceState
    cache: KVCache | None


class InPlaceLM(nnx.Module):
    def __init__(self, config: InPlaceLMConfig, *, rngs: nnx.Rngs, base: GPT | None = None):
        self.config = config
        self.base = base if base is not None else GPT(config.base, rngs=rngs)
        cfg, D = config.inplace, config.base.n_embd
        self.conv = nnx.Param(jnp.zeros((cfg.conv_width, D), jnp.float32).at[0].set(1.0))  # tap j reads X0_{t+1-j}
        self.W_target = nnx.Param(jnp.zeros((cfg.layers, D, D), jnp.float32))

    @property
    def fast_blocks(self):
        return self.base.h[self.config.base.n_layer - self.config.inplace.layers:]

    @property
    def replaced_kernels(self):
        """The base's linear layers whose kernels these fast weights replace (``model.quantize`` keeps them)."""
        return [b.mlp.c_proj for b in self.fast_blocks]

    # --- State.

    def init_state(self, batch_size: int) -> InPlaceState:
        """The state at a document start: every fast W_down at its pretrained value."""
        B, cfg, D = batch_size, self.config.inplace, self.config.base.n_embd
        W = jnp.stack([jax.lax.stop_gradient(b.mlp.c_proj.kernel[...]).astype(jnp.float32) for b in self.fast_blocks])
        W = jnp.broadcast_to(W, (B, *W.shape))  # [B, L, F, D]
        return InPlaceState(
            W=W,
            acc=jnp.zeros_like(W),
            z_last=jnp.zeros(W.shape[:3], jnp.float32),
            history=jnp.zeros((B, cfg.conv_width - 1, D), jnp.float32),
            count=jnp.zeros((B,), jnp.int32),
            lam=jnp.zeros((B,), jnp.float32),
            clipped=jnp.zeros((B,), jnp.int32),
        )

    def reset(self, state: InPlaceState, rows) -> InPlaceState:
        """Document boundary: rows where ``rows`` [B] is True go back to the start-of-document state."""
        return _rows(rows, self.init_state(rows.shape[0]), state)

    def update_flops(self, steps: int = 1) -> float:
        """Matmul FLOPs one chunk's update adds (every fast block): the chunk's Σ Z_tᵀ V̂_t (2 C F D)
        and its targets (2 C D D); applying the fast weights is paid by skipped chunks too. An in-place
        update is one closed-form step: ``steps`` (UPDATE_k's k) changes nothing."""
        c, D = self.config.inplace, self.config.base.n_embd
        return float(c.layers * c.chunk * (2 * 4 * D * D + 2 * D * D))

    # --- Pieces shared by both paths.

    def _targets(self, window):
        """V̂ per fast block from conv windows [..., conv_width, D] (oldest first): [L, ..., D]."""
        conv = jnp.einsum("...jd,jd->...d", window, self.conv[...][::-1])  # tap 0 reads the newest
        return jnp.einsum("...d,lde->l...e", conv, self.W_target[...])

    def _clip(self, delta):
        """Frobenius cap of deltas [B, ..., F, D] (per row and leading index): (clipped delta, was clipped)."""
        cap = self.config.inplace.clip
        if not cap:
            return delta, jnp.zeros(delta.shape[:-2], bool)
        # Clamped under the root: sqrt's gradient at a zero delta (W_target starts at zero) is infinite.
        norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(delta), axis=(-2, -1)), 1e-30))  # [B, ...]
        scale = jnp.minimum(1.0, cap / norm)
        return delta * scale[..., None, None], norm > cap

    def _absorb(self, state: InPlaceState, x0) -> InPlaceState:
        """A token with embedding ``x0`` [B, D] arrives: the last token's target is now known.

        Adds the last token's term to the open chunk, and when ``x0`` opens a
        chunk applies the chunk just closed (lam-scaled, clipped). The
        history keeps its embeddings before ``x0``.
        """
        started, lam = state.count > 0, state.lam
        window = jnp.concatenate([state.history, x0[:, None]], axis=1)  # [B, w, D]
        target = self._targets(window).swapaxes(0, 1)  # [B, L, D]
        term = state.z_last[..., None] * target[:, :, None]  # [B, L, F, D]
        acc = state.acc + jnp.where((started & (lam > 0))[:, None, None, None], term, 0.0)
        closing = started & (state.count % self.config.inplace.chunk == 0) & (lam > 0)  # [B]
        delta, clipped = self._clip(lam[:, None, None, None] * self.config.inplace.eta * acc)
        W = state.W + jnp.where(closing[:, None, None, None], delta, 0.0)
        boundary = state.count % self.config.inplace.chunk == 0
        acc = jnp.where(boundary[:, None, None, None], 0.0, acc)
        n_clipped = (closing[:, None] & clipped).sum(-1).astype(jnp.int32)
        return dataclasses.replace(state, W=W, acc=acc, clipped=state.clipped + n_clipped)

    def _forward(self, tokens, positions, cache, segment_ids, attend_keys, fast_mlp):
        """The base with ``fast_mlp(l, z) -> [B, T, D]`` in place of the fast blocks' ``c_proj`` kernel.

        Returns ``(x before ln_f [B, T, D], cache)``.
        """
        base, first = self.base, self.config.base.n_layer - self.config.inplace.layers
        x = base.wte(tokens) + base.wpe(positions)  # [B, T, D]
        new_k, new_v = [], []
        for layer, block in enumerate(base.h):
            kv = None if cache is None else (cache.k[layer], cache.v[layer])
            if layer < first:
                x, kv = block(x, positions, kv, segment_ids, attend_keys)
            else:
                a, kv = block.attn(block.ln_1(x), positions, kv, segment_ids, attend_keys)
                x = x + a
                z = jax.nn.gelu(block.mlp.c_fc(block.ln_2(x)), approximate=True)  # [B, T, F]
                x = x + (fast_mlp(layer - first, z) + block.mlp.c_proj.bias[...]).astype(x.dtype)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return x, None if cache is None else KVCache(tuple(new_k), tuple(new_v))

    # --- Whole chunks.

    def __call__(
        self, tokens, positions, schedule: Schedule = Schedule("update"), segment_ids=None, *,
        state: InPlaceState | None = None, cache: KVCache | None = None, chunk_lambda=None,
    ) -> InPlaceOutput:
        """Forward over whole chunks in parallel form, from a document start or from ``state``.

        Args:
          tokens, positions: [B, T], T a multiple of the chunk size.
          schedule: where lam comes from (``SCHEDULES``).
          segment_ids: [B, T] document ids of packed rows (from a document
            start only; documents start on chunk boundaries): the fast
            weights restart with each document.
          state: the document so far, on a chunk boundary.
          cache: the base's KV cache holding the positions before these.
          chunk_lambda: [B, n_chunks] lam per chunk, overriding the schedule.
        """
        B, T = tokens.shape
        cfg, C = self.config.inplace, self.config.inplace.chunk
        if T % C:
            raise ValueError(f"sequence length {T} is not a multiple of the in-place chunk size {C}")
        if segment_ids is not None and state is not None:
            raise ValueError("segment_ids packs documents from a document start: pass no state with them")
        n = T // C
        state = self.init_state(B) if state is None else state
        x0 = jax.lax.stop_gradient(self.base.wte(tokens)).astype(jnp.float32)  # [B, T, D]
        state = self._absorb(state, x0[:, 0])  # the previous call's last chunk, if any, is applied now
        segments = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
        opens = jnp.pad(segments[:, 1:] != segments[:, :-1], ((0, 0), (1, 0)))  # [B, T] a document starts here
        doc = segments[:, ::C]  # [B, n]
        # Position of each chunk's first token in its document.
        chunk_start = jnp.arange(n) * C  # [n]
        last_open = jax.lax.cummax(jnp.where(opens[:, ::C], chunk_start, 0), axis=1)  # [B, n]
        count0 = jnp.where(last_open > 0, 0, state.count[:, None]) + chunk_start - last_open  # [B, n]
        if chunk_lambda is None:
            lam = jax.vmap(lambda c: schedule_lambda(schedule, c, self.config.inplace.chunk), in_axes=1, out_axes=1)(count0)  # [B, n]
        else:
            lam = chunk_lambda.astype(jnp.float32)
        # Targets: token t's window ends at t + 1 (the history, then this call's embeddings, then a zero).
        w = cfg.conv_width
        ext = jnp.concatenate([state.history, x0, jnp.zeros_like(x0[:, :1])], axis=1)  # [B, w - 1 + T + 1, D]
        ext_seg = jnp.concatenate([jnp.broadcast_to(segments[:, :1], (B, w - 1)), segments, segments[:, -1:] - 1], 1)
        index = jnp.arange(T)[:, None] + 1 + jnp.arange(w)[None]  # [T, w] ext index, oldest first
        same = ext_seg[:, index] == segments[:, :, None]  # [B, T, w] stay inside the document
        window = jnp.where(same[..., None], ext[:, index], 0.0)  # [B, T, w, D]
        targets = self._targets(window)  # [L, B, T, D]
        # Same-document causal prefix over chunks: chunk k sees the deltas of chunks j < k of its document.
        prefix = (jnp.arange(n)[None, :] < jnp.arange(n)[:, None])[None] & (doc[:, :, None] == doc[:, None, :])  # [B, n, n]
        per_chunk = lambda a: a.reshape(B, n, C, *a.shape[2:])  # [B, n, C, ...]
        W, acc, z_last, clipped = [], [], [], jnp.zeros((B,), jnp.int32)
        updating = jnp.any(lam > 0)

        def fast_mlp(l, z):
            nonlocal clipped
            zc = per_chunk(z.astype(jnp.float32))  # [B, n, C, F]
            tc = per_chunk(targets[l] * (jnp.arange(T) < T - 1)[None, :, None])  # the last token's target waits

            def deltas():
                sums = jnp.einsum("bkcf,bkcd->bkfd", zc, tc)  # [B, n, F, D] Σ Z_tᵀ V̂_t per chunk
                delta, was_clipped = self._clip(lam[:, :, None, None] * cfg.eta * sums)
                return sums, delta, (was_clipped & (lam > 0) & (jnp.arange(n) < n - 1)).sum(-1).astype(jnp.int32)

            def no_deltas():
                zero = jnp.zeros((B, n, *state.W.shape[2:]), jnp.float32)
                return zero, zero, jnp.zeros((B,), jnp.int32)

            sums, delta, n_clipped = jax.lax.cond(updating, deltas, no_deltas)  # SKIP: no update work
            # Packed documents start from the pretrained W_down, which is then also state.W.
            weights = state.W[:, l, None] + jnp.einsum("bkj,bjfd->bkfd", prefix.astype(jnp.float32), delta)  # [B, n, F, D]
            W.append(weights[:, -1])
            acc.append(sums[:, -1])
            z_last.append(z[:, -1].astype(jnp.float32))
            clipped = clipped + n_clipped
            return jnp.einsum("bkcf,bkfd->bkcd", zc, weights).reshape(B, T, -1)  # [B, T, D]

        x, cache = self._forward(tokens, positions, cache, segment_ids, None, fast_mlp)
        count_end = jnp.where(last_open[:, -1] > 0, 0, state.count) + T - last_open[:, -1]
        end = InPlaceState(
            W=jnp.stack(W, 1), acc=jnp.stack(acc, 1), z_last=jnp.stack(z_last, 1),
            history=ext[:, T: T + w - 1],  # the last w - 1 embeddings
            count=count_end.astype(jnp.int32), lam=lam[:, -1], clipped=state.clipped + clipped,
        )
        logits = self.base.logits(self.base.ln_f(x), frozen=True)
        return InPlaceOutput(logits=logits, chunk_lambda=lam, state=end, cache=cache)

    # --- One token.

    def step(self, tokens, positions, cache: KVCache, state: InPlaceState, schedule: Schedule = Schedule("update"),
             attend_keys: int | None = None):
        """One token per row: the decode path. Returns ``(logits [B, V], cache, state)``."""
        if self.config.eot_id is not None:
            state = self.reset(state, tokens == self.config.eot_id)
        x0 = jax.lax.stop_gradient(self.base.wte(tokens)).astype(jnp.float32)  # [B, D]
        state = self._absorb(state, x0)
        opening = state.count % self.config.inplace.chunk == 0
        lam = jnp.where(opening, schedule_lambda(schedule, state.count, self.config.inplace.chunk), state.lam)
        z_last = []

        def fast_mlp(l, z):  # z [B, 1, F]
            z_last.append(z[:, 0].astype(jnp.float32))
            return jnp.einsum("btf,bfd->btd", z.astype(jnp.float32), state.W[:, l])

        x, cache = self._forward(tokens[:, None], positions[:, None], cache, None, attend_keys, fast_mlp)
        history = jnp.concatenate([state.history, x0[:, None]], axis=1)[:, 1:]
        state = dataclasses.replace(state, z_last=jnp.stack(z_last, 1), history=history, count=state.count + 1, lam=lam)
        return self.base.logits(self.base.ln_f(x), frozen=True)[:, 0], cache, state

    def extend(self, tokens, positions, length, cache: KVCache, state: InPlaceState, schedule: Schedule = Schedule("update")):
        """``step`` over up to T tokens per row ([B, T], ``length`` [B] real): see ``extend_by_steps``."""
        step = lambda t, p, c, s: self.step(t, p, c, s, schedule)
        return extend_by_steps(step, tokens, positions, length, cache, state)
