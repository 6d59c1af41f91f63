"""LoRA fast weights: low-rank adapters on the attention queries and values, trained while reading (issue 22).

In the top ``LoRAConfig.layers`` blocks of the frozen base, the query and
value projections (``targets``; the MLP's up projection can be added) get a
per-document low-rank term::

    q_t += (h_t A_q) B_q        v_t += (h_t A_v) B_v        h_t = LN_1(x_t)
    (mlp: the pre-activation of c_fc gets (LN_2(x_t) A_f) B_f)

A ([D, r]) starts at the slow weight ``A0`` (random, trainable in stage 2)
and B ([r, out]) at zero, so a new document, and every document under SKIP,
is exactly the base. This is dynamic evaluation restricted to a few thousand
parameters per block: after a chunk of C tokens is read, UPDATE_k takes k
optimizer steps on the adapters (plain gradient descent, or Adam with its
moments kept per document), on a loss of the predictions inside that chunk
(token t+1 from tokens <= t, both in the chunk; ``LoRAConfig.objective``:
the language model's cross-entropy, or a self-supervised target in the
hidden space), with step size ``lr``: each step's change of a row's
adapters is capped to a Frobenius norm (``clip``; capped steps are
counted), then scaled by ``lam`` (so lam sets a capped step's length too).

Apply-then-update: chunk c is read with the adapters after chunks < c. The
update's forward starts from the residual stream entering the first fast
block (kept from the read) and attends to the KV cache of the tokens before
the chunk as they were read, so the full forward (``__call__``, a scan over
chunks) and token-by-token decoding (``step``, which buffers the open chunk
and updates when its last token has been read) do the same arithmetic.

Schedules: ``skip``, ``update`` (k = ``Schedule.steps``), ``fixed`` and
``random`` (``model.inplace.SCHEDULES``), or lam per chunk from
``chunk_lambda``; a chunk no row updates does no update work. With a gate
(``LoRALMConfig.gate``, fitted by ``ponder train gate``), ``learned`` and
``learned_budget`` choose lam from the chunk just read (``model.read_gate``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ponder.model.config import FastBlocksConfig, GPTConfig
from ponder.model.fast_weights import select_rows
from ponder.model.gating import GateConfig, GatingNetwork, Schedule
from ponder.model.gpt2 import GPT, KVCache
from ponder.model.inplace import extend_by_steps, schedule_lambda
from ponder.model.read_gate import READ_FEATURES, READ_SCHEDULES, ReadState, chunk_read_stats, close_chunk, close_rows, \
    init_read_state, observe

OPTIMIZERS = ("sgd", "adam")
TARGETS = ("q", "v", "mlp")  # query, value, the MLP's up projection
OBJECTIVES = ("lm", "ssl")


def _direction(name: str) -> optax.GradientTransformation:
    """The step direction before ``-lr * lam`` (applied per row, vmapped)."""
    return optax.scale_by_adam() if name == "adam" else optax.identity()


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank fast weights.

    Attributes:
      layers: how many of the base's top blocks have adapters (on Q and V).
      rank: r of each adapter.
      chunk: tokens per update (lam is chosen per chunk).
      lr: step size of one step (its change is capped, then scaled by lam).
      clip: Frobenius-norm cap of one step's change of a row's adapters (0: none).
      optimizer: ``sgd`` (the gradient) or ``adam`` (Adam's normalised
        direction, moments kept per document and row; ``optax.scale_by_adam``).
      targets: the projections with adapters, among ``TARGETS``.
      objective: what an update descends on the chunk just read: ``lm``, the next-token
        cross-entropy (dynamic evaluation); ``ssl``, a self-supervised target that needs no
        LM head: one minus the cosine between the top hidden state at t (after ``ln_f``) and
        the LM head's row of token t + 1 (In-Place TTT's LM-aligned target with the next
        token's embedding as V-hat: with tied weights that row is what the logit of t + 1 reads).
    """

    layers: int = 4
    rank: int = 16
    chunk: int = 16
    lr: float = 1.0
    clip: float = 0.5
    optimizer: str = "sgd"
    targets: tuple[str, ...] = ("q", "v", "mlp")
    objective: str = "lm"

    def __post_init__(self):
        for name in ("layers", "rank", "chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LoRAConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.chunk < 2:
            raise ValueError(f"LoRAConfig.chunk must be at least 2 (an update learns from the chunk's own predictions), got {self.chunk}")
        object.__setattr__(self, "targets", tuple(self.targets))  # a list when read from JSON
        if not self.targets or len(set(self.targets)) < len(self.targets) or not set(self.targets) <= set(TARGETS):
            raise ValueError(f"LoRAConfig.targets must be distinct names among {TARGETS}, got {self.targets!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"LoRAConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LoRAConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.lr < 0 or self.clip < 0:
            raise ValueError(f"LoRAConfig.lr and .clip must be >= 0, got {self.lr!r}, {self.clip!r}")


@dataclasses.dataclass(frozen=True)
class LoRALMConfig(FastBlocksConfig):
    KIND: ClassVar[str] = "lora"
    SETTINGS: ClassVar[type] = LoRAConfig

    base: GPTConfig
    lora: LoRAConfig = LoRAConfig()
    eot_id: int | None = None  # a document starts with this token: decoding resets the adapters there
    gate: GateConfig | None = None  # the read gate (``model.read_gate``); None: no learned schedule

    def to_dict(self) -> dict:
        return {**super().to_dict(), **({} if self.gate is None else {"gate": dataclasses.asdict(self.gate)})}

    @classmethod
    def from_dict(cls, base: GPTConfig, data: dict):
        config = super().from_dict(base, data)
        return config if data.get("gate") is None else dataclasses.replace(config, gate=GateConfig(**data["gate"]))

    @staticmethod
    def read_gate(chunk: int, hidden: int = 16) -> GateConfig:
        """The config of a read gate: a value gate over ``READ_FEATURES``."""
        return GateConfig(chunk=chunk, hidden=hidden, features=len(READ_FEATURES), output="value")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRAState:
    """One document's adapters per row, and the chunk being read.

    Attributes:
      A: [B, n, L, D, r] float32 down projections of the n targets in each fast block.
      B: per target, [B, L, r, out] float32 up projections.
      inputs: [B, C, D] residual stream entering the first fast block, for the open chunk's tokens.
      tokens: [B, C] the open chunk's tokens; positions: [B, C] theirs.
      opt: the optimizer's state per row (``LoRAConfig.optimizer``; Adam's moments and step count).
      count: [B] tokens of the document seen so far.
      lam: [B] lam of the open chunk (under a read schedule, of the chunk closed last).
      clipped: [B] steps capped so far.
      read: what the read gate keeps (``model.read_gate.ReadState``; its budget, ``target``, is the session's).
    """

    A: jax.Array
    B: tuple[jax.Array, ...]
    opt: optax.OptState
    inputs: jax.Array
    tokens: jax.Array
    positions: jax.Array
    count: jax.Array
    lam: jax.Array
    clipped: jax.Array
    read: ReadState


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRAOutput:
    logits: jax.Array  # [B, T, V] float32
    chunk_lambda: jax.Array  # [B, n_chunks]
    state: LoRAState
    cache: KVCache
    features: jax.Array | None = None  # [B, n_chunks, len(READ_FEATURES)] of each chunk read, when asked for


class LoRALM(nnx.Module):
    def __init__(self, config: LoRALMConfig, *, rngs: nnx.Rngs, base: GPT | None = None):
        self.config = config
        self.base = base if base is not None else GPT(config.base, rngs=rngs)
        cfg, D = config.lora, config.base.n_embd
        shape = (len(cfg.targets), cfg.layers, D, cfg.rank)
        self.A0 = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) / D**0.5)
        self.gate = nnx.data(None if config.gate is None else GatingNetwork(config.gate, rngs=rngs))

    @property
    def first(self) -> int:
        """Index of the first block with adapters."""
        return self.config.base.n_layer - self.config.lora.layers

    # --- State.

    def init_state(self, batch_size: int, schedule: Schedule = Schedule("update")) -> LoRAState:
        """The state at a document start: A at ``A0``, B zero (the base exactly); the budget ``schedule.rate``."""
        n, cfg, D = batch_size, self.config.lora, self.config.base.n_embd
        A = jnp.broadcast_to(self.A0[...], (n, *self.A0.shape))
        out = {"q": D, "v": D, "mlp": 4 * D}
        B = tuple(jnp.zeros((n, cfg.layers, cfg.rank, out[name]), jnp.float32) for name in cfg.targets)
        return LoRAState(
            A=A,
            B=B,
            opt=jax.vmap(_direction(cfg.optimizer).init)((A, B)),
            inputs=jnp.zeros((n, cfg.chunk, D), jnp.float32),
            tokens=jnp.zeros((n, cfg.chunk), jnp.int32),
            positions=jnp.zeros((n, cfg.chunk), jnp.int32),
            count=jnp.zeros((n,), jnp.int32),
            lam=jnp.zeros((n,), jnp.float32),
            clipped=jnp.zeros((n,), jnp.int32),
            read=init_read_state(n, cfg.chunk, self.config.base.vocab_size, schedule.rate),
        )

    def reset(self, state: LoRAState, rows) -> LoRAState:
        """Document boundary: rows where ``rows`` [B] is True go back to the start-of-document state
        (keeping their budget: it belongs to the session)."""
        fresh = self.with_target(self.init_state(rows.shape[0]), state.read.target)
        return jax.tree.map(lambda new, old: select_rows(rows, new, old), fresh, state)

    @staticmethod
    def with_target(state: LoRAState, target) -> LoRAState:
        """``state`` with each row's budget set to ``target`` [B] (a share of chunks to update)."""
        read = dataclasses.replace(state.read, target=jnp.asarray(target, jnp.float32))
        return dataclasses.replace(state, read=read)

    def update_flops(self, steps: int = 1) -> float:
        """Matmul FLOPs one chunk's update adds: per step, the forward and backward (3x the forward)
        of the chunk through the adapted blocks (24 D^2 a token, and the adapters) and, for ``lm``, the LM head.
        Attention over the earlier keys is left out."""
        c, base = self.config.lora, self.config.base
        D, out = base.n_embd, {"q": base.n_embd, "v": base.n_embd, "mlp": 4 * base.n_embd}
        adapters = sum(2 * c.rank * (D + out[name]) for name in c.targets)
        head = 2 * D * base.vocab_size if c.objective == "lm" else 0  # ssl's target needs no LM head
        forward = c.chunk * (c.layers * (24 * D * D + adapters) + head)
        return float(steps * 3 * forward)

    # --- The network with adapters.

    def _top(self, x, positions, cache: KVCache, adapters, attend_keys=None, head=True):
        """The fast blocks on residual inputs ``x`` [B, T, D]: ``(logits [B, T, V], new cache layers)``,
        or the final hidden states (after ``ln_f``, [B, T, D]) in place of the logits when not ``head``."""
        A, B = adapters
        targets = self.config.lora.targets

        def low_rank(name, h, l):  # [B, T, out], or None for a projection without adapters
            if name not in targets:
                return None
            i = targets.index(name)
            return jnp.einsum("btd,bdr,bro->bto", h.astype(jnp.float32), A[:, i, l], B[i][:, l])

        new_k, new_v = [], []
        for l, block in enumerate(self.base.h[self.first:]):
            layer = self.first + l
            h = block.ln_1(x)
            q, v = low_rank("q", h, l), low_rank("v", h, l)
            zero = jnp.zeros((*h.shape[:2], h.shape[-1]), jnp.float32)
            delta = None if q is None and v is None else jnp.concatenate(
                [zero if q is None else q, zero, zero if v is None else v], axis=-1)  # keys unchanged
            a, (k_l, v_l) = block.attn(h, positions, (cache.k[layer], cache.v[layer]), None, attend_keys, delta)
            x = x + a
            h = block.ln_2(x)
            up, fc = block.mlp.c_fc(h), low_rank("mlp", h, l)
            up = up if fc is None else up + fc.astype(up.dtype)
            x = x + block.mlp.c_proj(jax.nn.gelu(up, approximate=True))
            new_k.append(k_l)
            new_v.append(v_l)
        hidden = self.base.ln_f(x)
        return (self.base.logits(hidden, frozen=True) if head else hidden), (new_k, new_v)

    def _read(self, tokens, positions, cache: KVCache, state: LoRAState, attend_keys=None):
        """Reads T tokens with the current adapters: ``(logits, inputs of the first fast block, cache)``."""
        base = self.base
        x = base.wte(tokens) + base.wpe(positions)  # [B, T, D]
        new_k, new_v = [], []
        for layer, block in enumerate(base.h[: self.first]):
            x, (k_l, v_l) = block(x, positions, (cache.k[layer], cache.v[layer]), None, attend_keys)
            new_k.append(k_l)
            new_v.append(v_l)
        logits, (top_k, top_v) = self._top(x, positions, cache, (state.A, state.B), attend_keys)
        return logits, x.astype(jnp.float32), KVCache(tuple(new_k + top_k), tuple(new_v + top_v))

    def _update(self, state: LoRAState, cache: KVCache, rows, steps: int) -> LoRAState:
        """``steps`` gradient steps on the buffered chunk's own next-token loss, for rows where ``rows`` [B].

        The cache must hold the tokens before the chunk; the chunk's own keys
        and values are recomputed with the adapters of each step.
        """
        cfg = self.config.lora
        x, tokens, positions = jax.lax.stop_gradient((state.inputs, state.tokens, state.positions))
        dtype = self.config.base.compute_dtype

        def loss(adapters):  # per row, summed: rows' adapters are independent, each gets its own row's gradient
            out, _ = self._top(x.astype(dtype), positions, cache, adapters, head=cfg.objective == "lm")
            out = out[:, :-1].astype(jnp.float32)  # token t + 1 from tokens <= t, inside the chunk
            if cfg.objective == "lm":
                nll = jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, tokens[:, 1:, None], -1)[..., 0]
                return nll.mean(-1).sum()
            target = jax.lax.stop_gradient(self.base.head_rows(tokens[:, 1:]).astype(jnp.float32))  # [B, C - 1, D]
            norms = jnp.linalg.norm(out, axis=-1) * jnp.linalg.norm(target, axis=-1)
            return (1.0 - jnp.sum(out * target, -1) / (norms + 1e-6)).mean(-1).sum()

        per_row = lambda v, c: v.reshape(-1, *[1] * (c.ndim - 1))
        adapters, clipped, opt = (state.A, state.B), state.clipped, state.opt
        direction = jax.vmap(_direction(cfg.optimizer).update)
        for _ in range(steps):
            step, new_opt = direction(jax.grad(loss)(adapters), opt)
            opt = jax.tree.map(lambda new, old: select_rows(rows, new, old), new_opt, opt)
            change = jax.tree.map(lambda g: -cfg.lr * per_row(rows, g) * g, step)
            if cfg.clip:
                norm = jnp.sqrt(sum(jnp.square(c).reshape(len(c), -1).sum(-1) for c in jax.tree.leaves(change)))  # [B]
                shrink = jnp.minimum(1.0, cfg.clip / jnp.maximum(norm, 1e-30))
                change = jax.tree.map(lambda c: c * per_row(shrink, c), change)
                clipped = clipped + (norm > cfg.clip).astype(jnp.int32)
            change = jax.tree.map(lambda c: c * per_row(state.lam, c), change)  # lam scales the capped step
            adapters = jax.tree.map(jnp.add, adapters, change)
        return dataclasses.replace(state, A=adapters[0], B=adapters[1], opt=opt, clipped=clipped)

    def _maybe_update(self, state, cache, rows, steps):
        """``_update`` when some row updates; no update work otherwise (SKIP)."""
        rows = rows & (state.lam > 0)
        return jax.lax.cond(jnp.any(rows), lambda s: self._update(s, cache, rows, steps), lambda s: s, state)

    # --- Whole chunks.

    def __call__(
        self, tokens, positions, schedule: Schedule = Schedule("update"), segment_ids=None, *,
        state: LoRAState | None = None, cache: KVCache | None = None, chunk_lambda=None, features: bool = False,
    ) -> LoRAOutput:
        """Forward over whole chunks, one after the other, from a document start or from ``state``.

        A call in which no chunk updates (SKIP, or every lam zero) runs as one
        forward: with the adapters fixed, reading chunk by chunk gives the same.

        Args:
          tokens, positions: [B, T], T a multiple of the chunk size.
          schedule: where lam comes from (``model.inplace.SCHEDULES``); UPDATE_k takes ``schedule.steps`` steps.
          segment_ids: [B, T] document ids of packed rows (positions restart
            with each document, and documents start on chunk boundaries):
            the adapters restart with each document.
          state: the document so far, on a chunk boundary (``count`` a multiple of the chunk).
          cache: the base's KV cache holding the positions before these; a fresh one when None.
          chunk_lambda: [B, n_chunks] lam per chunk, overriding the schedule.
          features: also return each chunk's read features (``model.read_gate``; always computed
            under a read schedule, which runs chunk by chunk).
        """
        B, T = tokens.shape
        C = self.config.lora.chunk
        if T % C:
            raise ValueError(f"sequence length {T} is not a multiple of the LoRA chunk size {C}")
        n = T // C
        state = self.init_state(B, schedule) if state is None else state
        reads = features or schedule.kind in READ_SCHEDULES
        cache = KVCache.init(self.config.base, B) if cache is None else cache
        segments = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
        opens = jnp.concatenate([jnp.zeros((B, 1), bool), segments[:, C::C] != segments[:, C - 1:-1:C]], 1)  # [B, n]
        by_chunk = lambda a: a.reshape(B, n, C, *a.shape[2:]).swapaxes(0, 1)  # [n, B, C, ...]

        def chunk(carry, xs):
            state, cache = carry
            tok, pos, open_, lam = xs
            state = self.reset(state, open_)
            if lam is None and schedule.kind not in READ_SCHEDULES:
                lam = schedule_lambda(schedule, state.count, C)
            logits, inputs, cache = self._read(tok, pos, cache, state)
            count = state.count + C
            feats = jnp.zeros((B, len(READ_FEATURES)), jnp.float32)
            read = state.read
            if reads:
                nll, entropy = chunk_read_stats(logits, tok)
                lam, feats, read = close_chunk(self.gate, schedule, read, nll, entropy, tok, count, lam)
                read = dataclasses.replace(read, last=logits[:, -1].astype(jnp.float32))
            lam = lam.astype(jnp.float32)
            state = dataclasses.replace(state, inputs=inputs, tokens=tok, positions=pos, lam=lam, count=count, read=read)
            state = self._maybe_update(state, cache, jnp.ones((B,), bool), schedule.steps)
            return (state, cache), (logits, lam, feats)

        def chunked(state, cache, lams):
            xs = (by_chunk(tokens), by_chunk(positions), opens.T, None if lams is None else lams.T)
            (state, cache), (logits, lam, feats) = jax.lax.scan(chunk, (state, cache), xs)
            return logits.swapaxes(0, 1).reshape(B, T, -1), lam.T, state, cache, feats.swapaxes(0, 1)

        def at_once(state, cache, lams):
            """No chunk updates, so the adapters stay as they are: one forward over all T tokens."""
            logits, inputs, cache = self._read(tokens, positions, cache, state)
            last = slice(T - C, T)  # the buffers hold the last chunk, as the chunked form leaves them
            state = dataclasses.replace(state, inputs=inputs[:, last], tokens=tokens[:, last], positions=positions[:, last],
                                        lam=lams[:, -1], count=state.count + T)
            return logits, lams, state, cache, jnp.zeros((B, n, len(READ_FEATURES)), jnp.float32)

        if segment_ids is not None or reads:  # adapters reset inside the call, or lam read from each chunk
            logits, lam, state, cache, feats = chunked(state, cache, chunk_lambda)
        else:
            counts = state.count[:, None] + jnp.arange(n) * C  # [B, n] document position of each chunk
            lams = jax.vmap(lambda c: schedule_lambda(schedule, c, C), 1, 1)(counts) if chunk_lambda is None \
                else chunk_lambda.astype(jnp.float32)
            logits, lam, state, cache, feats = jax.lax.cond(jnp.any(lams > 0), chunked, at_once, state, cache, lams)
        return LoRAOutput(logits=logits, chunk_lambda=lam, state=state, cache=cache, features=feats if reads else None)

    # --- One token.

    def step(self, tokens, positions, cache: KVCache, state: LoRAState, schedule: Schedule = Schedule("update"),
             attend_keys: int | None = None):
        """One token per row: the decode path. Returns ``(logits [B, V], cache, state)``."""
        if self.config.eot_id is not None:
            state = self.reset(state, tokens == self.config.eot_id)
        C = self.config.lora.chunk
        at = state.count % C  # [B] this token's place in its chunk
        reads = schedule.kind in READ_SCHEDULES
        lam = state.lam if reads else jnp.where(at == 0, schedule_lambda(schedule, state.count, C), state.lam)
        logits, inputs, cache = self._read(tokens[:, None], positions[:, None], cache, state, attend_keys)
        here = (jnp.arange(C)[None] == at[:, None])  # [B, C]
        state = dataclasses.replace(
            state,
            inputs=jnp.where(here[..., None], inputs, state.inputs),
            tokens=jnp.where(here, tokens[:, None], state.tokens),
            positions=jnp.where(here, positions[:, None], state.positions),
            count=state.count + 1, lam=lam,
        )
        closes = at == C - 1
        if reads:  # the chunk's last token: lam of its update from what the chunk's read said
            read = observe(state.read, tokens, at, logits[:, 0])
            chosen, read = close_rows(self.gate, schedule, read, state.tokens, state.count, closes)
            state = dataclasses.replace(state, read=read, lam=jnp.where(closes, chosen, state.lam))
        state = self._maybe_update(state, cache, closes, schedule.steps)
        return logits[:, 0], cache, state

    def extend(self, tokens, positions, length, cache: KVCache, state: LoRAState, schedule: Schedule = Schedule("update")):
        """``step`` over up to T tokens per row ([B, T], ``length`` [B] real): see ``model.inplace.extend_by_steps``."""
        step = lambda t, p, c, s: self.step(t, p, c, s, schedule)
        return extend_by_steps(step, tokens, positions, length, cache, state)
