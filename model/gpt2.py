"""GPT-2 in Flax NNX, functional in its KV cache.

The network is GPT-2 exactly (learned token and position embeddings, pre-LN
blocks, tanh-GELU MLP, final LayerNorm, LM head tied to ``wte``) and its
parameters carry GPT-2's names, so Hugging Face weights map one to one
(``h.N.attn.c_attn.weight`` -> ``h.N.attn.c_attn.kernel``; HF's Conv1D
already stores weights as ``[in, out]``). Three ``GPTConfig`` switches cover
the variants of Hugging Face's GPT-2 that change the math: an untied head
(``lm_head``), unscaled attention, and attention scaled by 1 / (layer + 1).

The blocks are separate modules (``h.0`` .. ``h.{L-1}``), applied by a loop
that unrolls at trace time. Stacking them and running ``lax.scan`` compiles
faster, but on CPU the scan's per-layer dynamic slicing of the weights made a
single-token step 2.4x slower (4 tiny blocks: 1.50 ms scanned, 0.62 ms
unrolled), and single-token decode is what a completion server lives on.

The KV cache holds one fixed-size buffer ``[B, H, S, hd]`` per layer for keys
and one for values (heads before slots, so attention's matmuls read it without
a transpose); the slot index is the absolute token position. A call with T
new tokens attends to cache slots before ``positions[b, 0]`` plus its own
tokens (causally), then writes its keys/values at slots ``positions[b, 0] ..
positions[b, 0] + T - 1``. Slots at or past the first new position (stale
tokens from an edit, or right-padding of a bucketed prefill) are never seen
and need no clearing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ponder.model import quantize
from ponder.model.config import GPTConfig

_MASKED = float(jnp.finfo(jnp.float32).min)
ATTN_BLOCK = 256  # query block of causal attention over long prompts


class KVCache(NamedTuple):
    """Keys and values of every layer, indexed by absolute position."""

    k: tuple[jax.Array, ...]  # L x [B, H, S, hd]
    v: tuple[jax.Array, ...]  # L x [B, H, S, hd]

    @classmethod
    def init(cls, config: GPTConfig, batch_size: int, length: int | None = None) -> "KVCache":
        length = config.n_positions if length is None else length
        shape = (batch_size, config.n_head, length, config.head_dim)
        # Distinct buffers: the cache is donated, and a buffer may be donated once.
        zeros = lambda: tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.n_layer))
        return cls(zeros(), zeros())


def _attention_output(*parts):
    """softmax over the keys of every part, applied to their values: ``(scores, v)`` pairs -> [B, H, t, hd].

    Each part holds some of the keys: ``scores`` [B, H, t, s_i] (f32, masked),
    ``v`` [B, H, s_i, hd]. The weights are normalised after the product with
    the values, so the division runs over [t, hd] instead of [t, s] (a pass
    over the scores fewer, forward and backward: 5-7% of a training step),
    and parts need not be concatenated. The row maximum only keeps ``exp`` in
    range (the result does not depend on it), so no gradient flows through it.
    """
    top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s, _ in parts]))
    weights = [jnp.exp(s - top) for s, _ in parts]  # [B, H, t, s_i]
    out = sum(jnp.einsum("bhts,bhsd->bhtd", w.astype(v.dtype), v) for w, (_, v) in zip(weights, parts))
    return out / sum(w.sum(axis=-1) for w in weights)[..., None].astype(out.dtype)


def _write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new`` [B, H, T, hd] into ``cache`` [B, H, S, hd] at row-wise slot ``start`` [B]."""
    at = lambda *index: tuple(jnp.asarray(i, start.dtype) for i in index)  # one index dtype, under x64 too
    for b in range(new.shape[0]):  # B is static; each row's update happens in place
        cache = jax.lax.dynamic_update_slice(cache, new[b : b + 1], at(b, 0, start[b], 0))
    return cache


def _layer_norm(config: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.n_embd,
        epsilon=config.layer_norm_epsilon,
        use_fast_variance=False,  # two-pass variance, as torch computes it
        dtype=config.compute_dtype,
        param_dtype=config.weight_dtype,
        rngs=rngs,
    )


def _linear(config: GPTConfig, n_in: int, n_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        kernel_init=nnx.initializers.normal(std),
        dtype=config.compute_dtype,
        param_dtype=config.weight_dtype,
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, config: GPTConfig, layer: int, *, rngs: nnx.Rngs):
        self.config = config
        D = config.n_embd
        # Multiplies the scores: 1/sqrt(hd) in GPT-2, then 1/(layer + 1) when configured (as transformers).
        self.scale = (1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0) / (
            layer + 1 if config.scale_attn_by_inverse_layer_idx else 1
        )
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's scaled init
        self.c_attn = _linear(config, D, 3 * D, 0.02, rngs)
        self.c_proj = _linear(config, D, D, residual_std, rngs)

    def __call__(self, x, positions, kv, segment_ids=None, attend_keys: int | None = None, qkv_delta=None):
        """Causal self-attention.

        Args:
          x: [B, T, D] inputs.
          positions: [B, T] absolute positions; contiguous within a row.
          kv: ``(k, v)`` cache of this layer, each [B, H, S, hd], or None.
          segment_ids: [B, T] document of each token in a packed row (cache-free
            calls only); tokens attend within their own document.
          attend_keys: read only the first ``attend_keys`` cache slots (static;
            every row's positions must lie below it). Decoding reads the
            whole cache on every step, so a server bounds it by the longest
            live row. 0: the cache holds nothing before these
            tokens (every row starts its document), so none of it is read.
          qkv_delta: [B, T, 3D] added to the query/key/value projection
            (low-rank fast weights, ``model.lora``), or None.

        Returns:
          ``(y [B, T, D], new_kv)``.
        """
        B, T, D = x.shape
        H, hd = self.config.n_head, self.config.head_dim
        qkv = self.c_attn(x)  # [B, T, 3D]
        if qkv_delta is not None:
            qkv = qkv + qkv_delta.astype(qkv.dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x [B, T, D]
        heads_first = lambda a: a.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]
        q, k, v = heads_first(q), heads_first(k), heads_first(v)
        causal = positions[:, None, :] <= positions[:, :, None]  # [B, T, T]
        if segment_ids is not None:
            causal &= segment_ids[:, None, :] == segment_ids[:, :, None]

        def attend(q_rows, n_keys):
            """Queries ``q_rows`` (a slice of T) against the first ``n_keys`` new keys."""
            scores = jnp.einsum("bhtd,bhsd->bhts", q[:, :, q_rows], k[:, :, :n_keys]) * self.scale  # [B, H, t, s]
            mask = causal[:, q_rows, :n_keys]
            return jnp.where(mask[:, None], scores.astype(jnp.float32), _MASKED)  # [B, H, t, s]

        def attend_new_only():
            if T <= ATTN_BLOCK or T % ATTN_BLOCK:
                return _attention_output((attend(slice(None), T), v)).transpose(0, 2, 1, 3)  # [B, T, H, hd]
            # Long prompts: query block i only needs keys of blocks 0..i, which
            # skips the masked upper triangle (37% of the work at 4 blocks) and
            # keeps each softmax small enough to stay in cache.
            out = []
            for i in range(T // ATTN_BLOCK):
                rows, n_keys = slice(i * ATTN_BLOCK, (i + 1) * ATTN_BLOCK), (i + 1) * ATTN_BLOCK
                out.append(_attention_output((attend(rows, n_keys), v[:, :, :n_keys])))  # [B, H, ATTN_BLOCK, hd]
            return jnp.concatenate(out, axis=2).transpose(0, 2, 1, 3)  # [B, T, H, hd]

        if kv is None:
            y = attend_new_only()
        else:
            # Attend to the cache as it was (slots before this call's first
            # position) plus the new keys, then write the new keys. Reading
            # the cache after the write made XLA duplicate the update and copy
            # every layer's cache on every decode step (3x slower at 1024 slots).
            cache_k, cache_v = kv
            S = cache_k.shape[2] if attend_keys is None else attend_keys
            past_k, past_v = cache_k[:, :, :S], cache_v[:, :, :S]

            def attend_past_and_new():
                seen = jnp.arange(S)[None, :] < positions[:, :1]  # [B, S]
                past = jnp.einsum("bhtd,bhsd->bhts", q, past_k) * self.scale  # [B, H, T, S]
                past = jnp.where(seen[:, None, None], past.astype(jnp.float32), _MASKED)
                return _attention_output((past, past_v), (attend(slice(None), T), v)).transpose(0, 2, 1, 3)  # [B, T, H, hd]

            if S == 0:  # known to start the document: attend among the new tokens only
                y = attend_new_only()
            elif T == 1:
                y = attend_past_and_new()
            else:
                # A prompt at the start of its document has no past: skip reading
                # (and softmaxing over) S empty slots, which doubled prefill time.
                y = jax.lax.cond(jnp.any(positions[:, 0] > 0), attend_past_and_new, attend_new_only)
            kv = (_write(cache_k, k, positions[:, 0]), _write(cache_v, v, positions[:, 0]))
        y = y.reshape(B, T, D)  # [B, T, D]
        return self.c_proj(y), kv


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        D = config.n_embd
        self.c_fc = _linear(config, D, 4 * D, 0.02, rngs)
        self.c_proj = _linear(config, 4 * D, D, 0.02 / math.sqrt(2 * config.n_layer), rngs)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # [B, T, D]


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, layer: int, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs)
        self.attn = Attention(config, layer, rngs=rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, kv, segment_ids=None, attend_keys=None):
        a, kv = self.attn(self.ln_1(x), positions, kv, segment_ids, attend_keys)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nnx.Module):
    """GPT-2 language model; its LM head is ``wte`` unless ``config.tie_word_embeddings`` is False."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = nnx.Embed(
            config.vocab_size,
            config.n_embd,
            embedding_init=nnx.initializers.normal(0.02),
            dtype=config.compute_dtype,
            param_dtype=config.weight_dtype,
            rngs=rngs,
        )
        self.wpe = nnx.Embed(
            config.n_positions,
            config.n_embd,
            embedding_init=nnx.initializers.normal(0.01),
            dtype=config.compute_dtype,
            param_dtype=config.weight_dtype,
            rngs=rngs,
        )
        self.h = nnx.List([Block(config, layer, rngs=rngs) for layer in range(config.n_layer)])
        self.ln_f = _layer_norm(config, rngs)
        # An untied head is a second [V, D] table, read like wte.
        self.lm_head = nnx.data(None if config.tie_word_embeddings else nnx.Embed(
            config.vocab_size, config.n_embd, embedding_init=nnx.initializers.normal(0.02),
            dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs,
        ))

    def __call__(
        self, tokens, positions, cache: KVCache | None = None, *, compute_logits: bool = True, segment_ids=None,
        attend_keys: int | None = None,
    ):
        """Runs the model on T new tokens per row.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] absolute positions, contiguous within a row and
            below ``n_positions``.
          cache: the KV cache holding positions before ``positions[:, 0]``,
            or None for a cache-free forward over exactly these tokens.
          compute_logits: False skips the LM head (logits is then None), for
            callers that need logits at a few positions only (``self.logits``).
          segment_ids: [B, T] document ids of a packed cache-free batch
            (positions restart with each document); attention stays inside
            each document.
          attend_keys: see ``Attention``.

        Returns:
          ``(logits [B, T, V] float32, hidden [B, T, D], new_cache)`` where
          ``hidden`` is the output of ``ln_f`` and ``new_cache`` is None when
          ``cache`` is None.
        """
        x = self.wte(tokens) + self.wpe(positions)  # [B, T, D]
        new_k, new_v = [], []
        for layer, block in enumerate(self.h):
            kv = None if cache is None else (cache.k[layer], cache.v[layer])
            x, kv = block(x, positions, kv, segment_ids, attend_keys)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        hidden = self.ln_f(x)  # [B, T, D]
        logits = self.logits(hidden) if compute_logits else None
        return logits, hidden, None if cache is None else KVCache(tuple(new_k), tuple(new_v))

    @property
    def head(self):
        """The LM head's table: ``wte`` when tied, else ``lm_head``."""
        return self.wte if self.lm_head is None else self.lm_head

    def head_rows(self, tokens):
        """The LM head's rows of ``tokens`` [...]: [..., D], what each token's logit reads from the hidden state."""
        return self.head(tokens)

    def logits(self, hidden, *, frozen: bool = False):
        """LM head: [B, T, D] -> [B, T, V] float32; ``frozen`` stops gradients to its weights."""
        B, T, D = hidden.shape
        head = self.head
        if isinstance(head, quantize.Embed):  # stored in fewer bits for serving: frozen already
            return head.logits(hidden)
        embedding = head.embedding[...]  # [V, D]
        if frozen:
            embedding = jax.lax.stop_gradient(embedding)
        if B * T <= 64:
            # Decode: [V, D] x [B*T, D] -> [V, B*T] reads the table as stored. The
            # [B*T, D] x [D, V] form made XLA transpose all of wte on every
            # decode step on CPU.
            logits = jax.lax.dot_general(embedding, hidden.reshape(B * T, D), (((1,), (1,)), ((), ())))
            logits = logits.T.reshape(B, T, -1)  # [B, T, V]
        else:
            logits = jnp.einsum("btd,vd->btv", hidden, embedding)  # [B, T, V]
        return logits.astype(jnp.float32)


# Logical axis names of GPT-2's parameters, by the end of their path; one
# table (``train.sharding``) maps logical names to mesh axes. Unlisted
# parameters (LayerNorms, TTT layers, the gate) are replicated.
LOGICAL_AXES = {
    ("wte", "embedding"): ("vocab", "embed"),
    ("lm_head", "embedding"): ("vocab", "embed"),
    ("wpe", "embedding"): (None, "embed"),
    ("attn", "c_attn", "kernel"): ("embed", "heads"),
    ("attn", "c_attn", "bias"): ("heads",),
    ("attn", "c_proj", "kernel"): ("heads", "embed"),
    ("mlp", "c_fc", "kernel"): ("embed", "mlp"),
    ("mlp", "c_fc", "bias"): ("mlp",),
    ("mlp", "c_proj", "kernel"): ("mlp", "embed"),
}


def init_model(config: GPTConfig, seed: int = 0) -> GPT:
    return GPT(config, rngs=nnx.Rngs(seed))


def abstract_model(config: GPTConfig) -> GPT:
    """A parameter-free skeleton (shapes and dtypes only) to restore into."""
    return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def forward(graphdef, state, tokens, positions, cache=None):
    """Jitted ``GPT.__call__`` on a split model (``nnx.split(model)``)."""
    return nnx.merge(graphdef, state)(tokens, positions, cache)


def next_token_loss(model: GPT, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    logits, _, _ = model(inputs, positions)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
