"""The two training stages: what trains and what the loss is.

* ``BaseStage`` (stage 1): every GPT-2 parameter, next-token cross-entropy
  over packed rows (attention stays inside each document piece).
* ``TTTStage`` (stage 2): the base is frozen; the TTT layers, their
  LayerNorms and the gating network train on
  ``L = CE + beta * L_TTT + gamma * mean(lam)`` (docs/design.md, "Gating") over rows whose
  documents start on chunk boundaries, fast weights reset at each. A fixed
  schedule (SKIP, UPDATE_k, FIXED_lam, ...) trains the same way for comparison.
  With ``window`` set, base attention sees windows of that many tokens from
  each piece's start (positions restart in each), as when a document longer
  than the context is served or evaluated, while the fast weights carry
  across windows: the layer learns to keep what attention can no longer see.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ponder.model.gating import Schedule
from ponder.train.data import Batch, loss_mask


def masked_cross_entropy(logits, batch: Batch):
    """Mean next-token cross-entropy over the predictions ``loss_mask`` keeps. Scalar."""
    # Every position is scored against the next token (the last one against the row's first,
    # masked out): slicing off the last position would copy the [B, T, V] logits, and its
    # gradient would be padded back, two copies of the largest tensor of the step.
    mask = jnp.pad(loss_mask(batch.segment_ids, batch.real), ((0, 0), (0, 1)))  # [B, T]
    targets = jnp.roll(batch.tokens, -1, axis=1)  # [B, T]
    logits = logits.astype(jnp.float32)
    # log-sum-exp minus the target's logit: no [B, T, V] log-probabilities are materialised.
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1)


def _gpt_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x parameters in matmuls, plus causal attention."""
    D, L, V = config.n_embd, config.n_layer, config.vocab_size
    matmul_params = L * 12 * D * D + V * D
    attention = L * 2 * 2 * D * (seq_len + 1) / 2  # QK^T and AV over the causal half
    return 6 * matmul_params + 3 * attention


@dataclasses.dataclass(frozen=True)
class BaseStage:
    seq_len: int
    name: str = "base"
    align: int = 1
    trainable: object = nnx.Param

    def loss(self, model, batch: Batch):
        logits, _, _ = model(batch.tokens, batch.positions, segment_ids=batch.segment_ids)
        ce = masked_cross_entropy(logits, batch)
        return ce, {"ce": ce}

    def tokens_flops(self, model) -> float:
        return _gpt_flops_per_token(model.config, self.seq_len)


@dataclasses.dataclass(frozen=True)
class TTTStage:
    seq_len: int
    chunk: int
    schedule: Schedule = Schedule()
    beta: float = 0.1
    gamma: float = 0.1
    window: int | None = None  # base attention window; None: the whole row
    name: str = "ttt"
    # Everything but the frozen base.
    trainable: object = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("base")))

    @property
    def align(self) -> int:
        return self.chunk

    def __post_init__(self):
        if self.window is not None and (self.window <= 0 or self.window % self.chunk):
            raise ValueError(f"window {self.window} must be a positive multiple of the chunk size {self.chunk}")

    def attention(self, batch: Batch):
        """Base positions and attention ids: one id per window of each piece (the piece's own id without windows)."""
        if self.window is None:
            return batch.positions, batch.segment_ids
        windows = -(-self.seq_len // self.window)
        return batch.positions % self.window, batch.segment_ids * windows + batch.positions // self.window

    def loss(self, model, batch: Batch):
        positions, attention = self.attention(batch)
        out = model(batch.tokens, positions, self.schedule, segment_ids=batch.segment_ids, attention_ids=attention)
        ce = masked_cross_entropy(out.logits, batch)
        ttt_loss = out.ttt_loss.mean()
        mean_lambda = out.chunk_lambda.mean()
        loss = ce + self.beta * ttt_loss + self.gamma * mean_lambda
        updated = out.chunk_updated.sum()
        return loss, {
            "ce": ce,
            "ttt_loss": ttt_loss,
            "mean_lambda": mean_lambda,
            "chunks_updated": updated,
            "chunks_skipped": out.chunk_updated.size - updated,
            "ttt_flops": out.ttt_flops.sum(),
        }

    def tokens_flops(self, model) -> float:
        # The frozen base runs forward only (2 x), the TTT layers forward and backward.
        base = _gpt_flops_per_token(model.base.config, min(self.seq_len, self.window or self.seq_len)) / 3
        D = model.config.base.n_embd
        ttt = sum(6 * 4 * D * D + 3 * layer.update_flops(self.chunk) / self.chunk for layer in model.ttt)
        return base + ttt + 2 * D * model.config.base.vocab_size * 3
