"""The gate of fast weights that update after reading a chunk (LoRA, ``model.lora``).

The TTT layer's gate chooses lam_c before chunk c from the chunk before
(``model.gating``). LoRA applies first and updates after: chunk c is read
with the adapters of chunks < c, and only then is its update made, so its
lam can be chosen from chunk c itself, from what the read already computed:
the model's loss and entropy on the chunk's own next-token predictions
(token t + 1 from t, both in the chunk: what the ``lm`` update descends),
their spread and peak, how many of its tokens are new to the document, its
position, and the previous chunk's loss (``READ_FEATURES``).

The network is ``model.gating.GatingNetwork`` with ``output = "value"``:
its score is the predicted worth of updating the chunk, fitted by
``train.stages.ReadGateStage`` to -dCE/dlam_c per later token
(``train.evaluate.update_value``'s measure). ``learned`` updates where the
score is above 0, ``learned_budget`` ranks it among the document's recent
chunks (``model.gating.budget_choice``) against the row's target rate.

The full forward scores a whole chunk's logits at once; decoding scores
each token under the previous token's logits as it arrives and keeps them
in ``ReadState``, so both paths choose from the same numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ponder.model.fast_weights import select_rows
from ponder.model.gating import BUDGET_WINDOW, ChunkStats, GatingNetwork, Schedule, budget_choice, chunk_stats, token_stats

READ_FEATURES = ("ce", "entropy", "nll_std", "nll_max", "diversity", "novelty", "log_position", "ce_previous",
                 "ce_ema", "surprise")
READ_SCHEDULES = ("learned", "learned_budget")  # the schedules that read the chunk (a gate is needed)
CE_EMA = 0.9  # decay of the document's CE average per chunk


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ReadState:
    """What the gate keeps of a document, per row.

    Attributes:
      nll, entropy: [B, C - 1] the open chunk's in-chunk predictions so far (decoding fills them).
      last: [B, V] float32 logits of the token read last (they predict the next one).
      seen: [B, V] bool, the document's tokens so far.
      features: [B, len(READ_FEATURES)] of the last closed chunk (zeros at a document start).
      scores: [B, BUDGET_WINDOW] the gate's scores of recent chunks (a ring by chunk number).
      used: [B] chunks updated so far; target: [B] the budget (share of chunks to update).
    """

    nll: jax.Array
    entropy: jax.Array
    last: jax.Array
    seen: jax.Array
    features: jax.Array
    scores: jax.Array
    used: jax.Array
    target: jax.Array


def init_read_state(batch_size: int, chunk: int, vocab_size: int, rate: float) -> ReadState:
    B = batch_size
    return ReadState(
        nll=jnp.zeros((B, chunk - 1), jnp.float32),
        entropy=jnp.zeros((B, chunk - 1), jnp.float32),
        last=jnp.zeros((B, vocab_size), jnp.float32),
        seen=jnp.zeros((B, vocab_size), bool),
        features=jnp.zeros((B, len(READ_FEATURES)), jnp.float32),
        scores=jnp.zeros((B, BUDGET_WINDOW), jnp.float32),
        used=jnp.zeros((B,), jnp.float32),
        target=jnp.full((B,), rate, jnp.float32),
    )


def read_features(previous, stats: ChunkStats, position):
    """[B, len(READ_FEATURES)] of a chunk read, given the previous chunk's (zeros at a document start).

    Args:
      previous: [B, F] the previous chunk's features; stats: the chunk's ``ChunkStats``;
      position: [B] tokens of the document after the chunk.
    """
    index = {name: i for i, name in enumerate(READ_FEATURES)}
    first = previous[:, index["log_position"]] == 0  # no chunk before: the averages start at this one
    ce_previous = jnp.where(first, stats.ce, previous[:, index["ce"]])
    ce_ema = jnp.where(first, stats.ce, CE_EMA * previous[:, index["ce_ema"]] + (1 - CE_EMA) * stats.ce)
    values = {
        "ce": stats.ce, "entropy": stats.entropy, "nll_std": stats.nll_std, "nll_max": stats.nll_max,
        "diversity": stats.diversity, "novelty": stats.novelty, "log_position": jnp.log1p(position.astype(jnp.float32)),
        "ce_previous": ce_previous, "ce_ema": ce_ema, "surprise": stats.ce - ce_ema,
    }
    return jnp.stack([values[name] for name in READ_FEATURES], axis=-1)


def chunk_read_stats(logits, tokens):
    """``(nll, entropy)`` [B, C - 1] of a chunk's in-chunk predictions from its logits [B, C, V]."""
    return token_stats(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])


def observe(read: ReadState, token, at, logits) -> ReadState:
    """Decoding: scores ``token`` [B], at place ``at`` [B] of its chunk, under the logits read before
    it (where ``at`` > 0), and keeps this token's ``logits`` [B, V] for the next."""
    nll, entropy = token_stats(read.last[:, None], token[:, None])  # [B, 1]
    here = (jnp.arange(read.nll.shape[1])[None] == (at - 1)[:, None])  # [B, C - 1]; nowhere at a chunk's start
    return dataclasses.replace(read, nll=jnp.where(here, nll, read.nll), entropy=jnp.where(here, entropy, read.entropy),
                               last=logits.astype(jnp.float32))


def close_chunk(gate: GatingNetwork | None, schedule: Schedule, read: ReadState, nll, entropy, tokens, end, given=None):
    """The chunk just read (``tokens`` [B, C], ending at document position ``end`` [B]) is closed.

    Returns:
      ``(lam [B], features [B, F], read)``: lam is ``given`` [B] when set, else the gate's choice
      (``schedule.kind`` in ``READ_SCHEDULES``); ``read`` has the chunk's tokens seen, its features,
      its score in the ring and its update counted.
    """
    stats, seen = chunk_stats(nll, entropy, jnp.ones(nll.shape, bool), tokens, read.seen)
    features = read_features(read.features, stats, end)
    C = tokens.shape[1]
    index = end // C - 1  # [B] the chunk's number in the document
    if gate is None and given is None:
        raise ValueError(f"schedule {schedule.kind!r} needs a gate: this checkpoint has none (fit one with `ponder train gate`)")
    score = jnp.zeros(end.shape, jnp.float32) if gate is None else gate.score(features)
    if given is not None:
        lam = given.astype(jnp.float32)
    elif schedule.kind == "learned":
        lam = gate.lam(score)
    elif schedule.kind == "learned_budget":
        lam = budget_choice(score, read.scores, index, read.used, read.target).astype(jnp.float32)
    else:
        raise ValueError(f"a chunk's read chooses lam under {READ_SCHEDULES}, not {schedule.kind!r}")
    ring = jnp.arange(BUDGET_WINDOW)[None] == (index % BUDGET_WINDOW)[:, None]
    read = dataclasses.replace(read, seen=seen, features=features, scores=jnp.where(ring, score[:, None], read.scores),
                               used=read.used + (lam > 0), nll=nll, entropy=entropy)
    return lam, features, read


def close_rows(gate, schedule: Schedule, read: ReadState, tokens, end, rows):
    """Decoding: ``close_chunk`` on the buffered predictions for rows where ``rows`` [B] (a chunk's last
    token was read), only when some row closes. Returns ``(lam [B], read)``; lam 0 elsewhere."""

    def close(read):
        lam, _, new = close_chunk(gate, schedule, read, read.nll, read.entropy, tokens, end)
        return jnp.where(rows, lam, 0.0), jax.tree.map(lambda a, b: select_rows(rows, a, b), new, read)

    return jax.lax.cond(jnp.any(rows), close, lambda r: (jnp.zeros(rows.shape, jnp.float32), r), read)
