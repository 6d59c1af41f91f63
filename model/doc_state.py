"""What a TTT model carries through a document, and what its forward returns (docs/design.md, "Sessions").

``DocState`` is one document's state per row (the fast weights of every TTT
layer, the gate's ``GateHistory``, and the open chunk's buffers for
decoding); a session keeps it between requests. ``LMOutput`` is what
``TTTTransformerLM.__call__`` returns.
"""

from __future__ import annotations

import dataclasses

import jax

from ponder.model.gpt2 import KVCache
from ponder.model.ttt import TTTState


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GateHistory:
    """What the gate knows of a document before its next chunk (per row).

    Attributes:
      features: [B, N_FEATURES] features of the last closed chunk (zeros before the first).
      threshold: [B] the threshold gate's reconstruction-loss threshold.
      rate: [B] EMA of the update rate (the threshold controller's input).
      target: [B] the budget: target update rate of budgeted schedules.
      used: [B] chunks of the document updated so far.
      scores: [B, BUDGET_WINDOW] the gate's scores of recent chunks (a ring
        indexed by chunk number; ``learned_budget`` ranks against them).
      seen: [B, V] bool, the tokens the document has used so far.
    """

    features: jax.Array
    threshold: jax.Array
    rate: jax.Array
    target: jax.Array
    used: jax.Array
    scores: jax.Array
    seen: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DocState:
    """One document's state per row: TTT layers, gating history, and the open chunk.

    Attributes:
      ttt: one ``TTTState`` per TTT layer.
      history: the ``GateHistory`` (kept up to date under schedules that read
        it, ``Schedule.reads_history``; others leave it as it was).
      lam: [B] lam of the current chunk (0 when it is skipped).
      steps: [B] gradient steps per mini-batch of the current chunk (0 when it is skipped).
      hidden: [B, C + 1, D] base hidden states of the token before the
        current chunk (slot 0) and of the chunk's tokens so far (decoding).
      tokens: [B, C] the current chunk's tokens so far (decoding).
      start: the first TTT layer's state at the current chunk's start (decoding).
      The three decoding buffers are kept only under schedules that read the
      history; fixed schedules leave them as they were.
    """

    ttt: list[TTTState]
    history: GateHistory
    lam: jax.Array
    steps: jax.Array
    hidden: jax.Array
    tokens: jax.Array
    start: TTTState

    @property
    def count(self) -> jax.Array:
        """[B] tokens of the document seen so far."""
        return self.ttt[0].count


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LMOutput:
    """What a TTT forward returns.

    Attributes:
      logits: [B, T, V] float32.
      chunk_lambda: [B, n_chunks] lam used per chunk (0 where skipped).
      chunk_updated: [B, n_chunks] bool.
      chunk_steps: [B, n_chunks] gradient steps per mini-batch (0 where skipped).
      chunk_features: [B, n_chunks, N_FEATURES] the features each chunk's lam
        was computed from (those of the chunk before; zeros under schedules
        that do not read them).
      ttt_flops: [B] fast-weight update FLOPs of the chunks each row updated
        (``TTTLayer.update_flops``). A chunk is skipped for real only when no
        row of the batch updates it; otherwise skipped rows ride along with
        lam = 0 (same result) and are still counted as skipped.
      ttt_loss: [B, n_chunks] the TTT layers' mean reconstruction loss
        after each chunk's update (L_TTT of the stage-2 objective).
      state: the ``DocState`` after the last token, to continue from.
      cache: the base's KV cache after the last token (None without one).
    """

    logits: jax.Array
    chunk_lambda: jax.Array
    chunk_updated: jax.Array
    chunk_steps: jax.Array
    chunk_features: jax.Array
    ttt_flops: jax.Array
    ttt_loss: jax.Array
    state: DocState
    cache: KVCache | None
