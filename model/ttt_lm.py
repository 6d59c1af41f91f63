"""The TTT language model: TTT layers on top of a frozen GPT-2 (DESIGN.md §2).

``h = base(x)`` (after ``ln_f``, gradient stopped), then for each TTT layer
``h = h + TTT(LN(h))``, then ``logits = h . wte^T`` with the base's tied head.
The TTT output projections start at zero, so a fresh model predicts exactly
what the base does.

``step`` is the decode path: one token per row through the base's KV cache
and every TTT layer's primal step; it reproduces the full forward.

The full forward runs chunk by chunk with the gate (``model.gating``).

Not yet built (issue 3): gating in the decode path (``step`` takes lam from
the caller), end-of-document tokens as boundaries inside a full forward
(packed rows use segment ids, on chunk boundaries), UPDATE_k with k > 1, ORACLE.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import GPTConfig
from model.gpt2 import GPT, KVCache
from model.gating import N_FEATURES, GateConfig, GatingNetwork, Schedule, chunk_token_stats
from model.ttt import TTTConfig, TTTLayer, TTTState, select_rows


@dataclasses.dataclass(frozen=True)
class TTTLMConfig:
    """A base GPT-2 config, the TTT layer config and how many TTT layers to stack."""

    base: GPTConfig
    ttt: TTTConfig
    n_ttt_layers: int = 1
    gate: GateConfig = GateConfig()
    eot_id: int | None = None  # a document starts with this token: decoding resets the fast weights there

    def __post_init__(self):
        if self.gate.chunk % self.ttt.mini_batch:
            raise ValueError(
                f"gate chunk ({self.gate.chunk}) must be a multiple of the TTT mini-batch ({self.ttt.mini_batch})"
            )
        if self.ttt.width != self.base.n_embd:
            raise ValueError(f"TTT width {self.ttt.width} must equal the base model's n_embd {self.base.n_embd}")
        if self.n_ttt_layers < 1:
            raise ValueError(f"n_ttt_layers must be >= 1, got {self.n_ttt_layers}")


@dataclasses.dataclass
class LMOutput:
    """What a TTT forward returns.

    Attributes:
      logits: [B, T, V] float32.
      chunk_lambda: [B, n_chunks] lam used per chunk (0 where skipped).
      chunk_updated: [B, n_chunks] bool.
      ttt_flops: [B] fast-weight update FLOPs of the chunks each row updated
        (``TTTLayer.update_flops``). A chunk is skipped for real only when no
        row of the batch updates it; otherwise skipped rows ride along with
        lam = 0 (same result) and are still counted as skipped.
      states: one ``TTTState`` per TTT layer, to continue decoding from.
    """

    logits: jax.Array
    chunk_lambda: jax.Array
    chunk_updated: jax.Array
    ttt_flops: jax.Array
    states: list[TTTState]


jax.tree_util.register_dataclass(
    LMOutput, data_fields=["logits", "chunk_lambda", "chunk_updated", "ttt_flops", "states"], meta_fields=[]
)


class TTTTransformerLM(nnx.Module):
    def __init__(self, config: TTTLMConfig, *, rngs: nnx.Rngs, base: GPT | None = None):
        self.config = config
        self.base = base if base is not None else GPT(config.base, rngs=rngs)
        self.ttt_norms = nnx.List(
            [nnx.LayerNorm(config.base.n_embd, epsilon=1e-5, rngs=rngs) for _ in range(config.n_ttt_layers)]
        )
        self.ttt = nnx.List([TTTLayer(config.ttt, rngs=rngs) for _ in range(config.n_ttt_layers)])
        self.gate = GatingNetwork(config.gate, rngs=rngs)

    def __call__(self, tokens, positions, schedule: Schedule = Schedule(), segment_ids=None) -> LMOutput:
        """Full-sequence forward from a document start, chunk by chunk.

        For each chunk c: lam_c from the schedule (features of chunk c-1 and
        the history only), then every TTT layer on the chunk in dual form, or
        only applied when lam_c is below the gate threshold for every row.

        Args:
          tokens, positions: [B, T], T a multiple of the gate chunk size.
          schedule: where lam comes from (the learned gate by default).
          segment_ids: [B, T] document ids of packed rows. Documents must
            start on chunk boundaries (packing pads them to whole chunks):
            where a chunk's first token opens a new document, the fast
            weights and the gating history go back to the start-of-document
            state, and base attention stays inside each document.

        Returns:
          An ``LMOutput``.
        """
        B, T = tokens.shape
        C, K = self.config.gate.chunk, self.config.ttt.mini_batch
        if T % C:
            raise ValueError(f"sequence length {T} is not a multiple of the gate chunk size {C}")
        n_chunks = T // C
        base_logits, hidden, _ = self.base(tokens, positions, segment_ids=segment_ids)
        base_logits, h = jax.lax.stop_gradient(base_logits), jax.lax.stop_gradient(hidden)  # frozen base
        ce, entropy = chunk_token_stats(base_logits, tokens, C)  # [B, n_chunks] each
        gate = self.config.gate
        layer_flops = self.ttt[0].update_flops(C) * len(self.ttt)

        def run_chunk(carry, inputs):
            h_c, ce_c, entropy_c, index, new_document = inputs  # h_c [B, C, D], new_document [B]
            # A document opening here starts from the initial fast weights and gating history.
            carry = jax.tree.map(lambda fresh, old: select_rows(new_document, fresh, old), initial, carry)
            states, features, difficulty, threshold, rate = carry
            lam = self._lam(schedule, features, threshold, index, (index == 0) | new_document)  # [B]
            lam = jnp.where(lam < gate.threshold, 0.0, lam)  # below the threshold: no update
            updated = lam > 0

            def run(update: bool):
                x, new_states, recon = h_c, [], []
                for norm, layer, state in zip(self.ttt_norms, self.ttt, states):
                    lam_mb = jnp.broadcast_to(lam[:, None], (B, C // K))
                    delta, state, losses = layer.chunk(norm(x), lam_mb, state, update=update)
                    x = x + delta
                    new_states.append(state)
                    recon.append(losses)
                return x, new_states, recon[0]

            # A real skip: when no row updates, the update branch does not run.
            # Gate features use the first TTT layer's reconstruction losses.
            y_c, states, (recon_before, recon_after) = jax.lax.cond(
                jnp.any(updated), lambda: run(True), lambda: run(False)
            )
            difficulty = gate.ema * difficulty + (1 - gate.ema) * ce_c
            position = jnp.log1p(states[0].count.astype(jnp.float32))
            features = jnp.stack([ce_c, entropy_c, recon_before, recon_after, position, difficulty], axis=-1)
            # Threshold gate: steer the threshold so the update rate tracks the target.
            rate = gate.ema * rate + (1 - gate.ema) * updated
            threshold = threshold * jnp.exp(schedule.gain * (rate - schedule.rate))
            flops = jnp.where(updated, float(layer_flops), 0.0)
            return (states, features, difficulty, threshold, rate), (y_c, lam, updated, flops)

        initial = (
            self.init_states(B),
            jnp.zeros((B, N_FEATURES)),
            jnp.zeros((B,)),
            jnp.full((B,), schedule.initial_threshold),
            jnp.full((B,), schedule.rate),
        )
        per_chunk = lambda a: a.reshape(B, n_chunks, C, *a.shape[2:]).swapaxes(0, 1)  # [n, B, C, ...]
        if segment_ids is None:
            new_document = jnp.zeros((n_chunks, B), bool)
        else:
            starts = segment_ids[:, ::C]  # [B, n_chunks]: document of each chunk's first token
            new_document = jnp.concatenate([jnp.zeros((B, 1), bool), starts[:, 1:] != starts[:, :-1]], axis=1).T
        inputs = (per_chunk(h), ce.T, entropy.T, jnp.arange(n_chunks), new_document)
        (states, *_), (y, lam, updated, flops) = jax.lax.scan(run_chunk, initial, inputs)
        y = y.swapaxes(0, 1).reshape(B, T, -1)  # [B, T, D]
        return LMOutput(
            logits=self.base.logits(y, frozen=True),
            chunk_lambda=lam.T,
            chunk_updated=updated.T,
            ttt_flops=flops.sum(0),
            states=states,
        )

    def _lam(self, schedule: Schedule, features, threshold, index, document_start):
        """lam of one chunk per row, from chunk c-1's features and the history. [B]"""
        B = features.shape[0]
        if schedule.kind == "learned":
            return self.gate(features)
        if schedule.kind == "skip":
            return jnp.zeros((B,))
        if schedule.kind == "update":
            return jnp.ones((B,))
        if schedule.kind == "fixed":
            return jnp.full((B,), schedule.value)
        if schedule.kind == "random":
            key = jax.random.fold_in(jax.random.key(schedule.seed), index)
            return jax.random.bernoulli(key, schedule.rate, (B,)).astype(jnp.float32)
        # threshold: update when chunk c-1 was hard to reconstruct (a document's first chunk always updates).
        recon_before = features[:, 2]
        return jnp.where(document_start | (recon_before > threshold), 1.0, 0.0)

    def init_states(self, batch_size: int) -> list[TTTState]:
        return [layer.init_state(batch_size) for layer in self.ttt]

    def step(self, tokens, positions, cache: KVCache, states: list[TTTState], lam):
        """One token per row: the decode path.

        An end-of-document token (``config.eot_id``) opens a new document:
        the row's TTT state is reset before the token is fed. Its position
        should restart at 0, which hides the old document from attention.

        Args:
          tokens, positions: [B]; cache: the base's KV cache; states: one per
            TTT layer; lam: [B] gate scale of the mini-batch each token is in.

        Returns:
          ``(logits [B, V], cache, states)``.
        """
        if self.config.eot_id is not None:
            boundary = tokens == self.config.eot_id
            states = [layer.reset(state, boundary) for layer, state in zip(self.ttt, states)]
        _, hidden, cache = self.base(tokens[:, None], positions[:, None], cache, compute_logits=False)
        h = hidden[:, 0]  # [B, D]
        new_states = []
        for norm, layer, state in zip(self.ttt_norms, self.ttt, states):
            delta, state = layer.step(state, norm(h), lam)
            h = h + delta
            new_states.append(state)
        return self.base.logits(h[:, None], frozen=True)[:, 0], cache, new_states
