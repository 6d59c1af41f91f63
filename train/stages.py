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
* ``LoRAStage`` (stage 2 with ``--fast-weights lora``): the adapters'
  starting down projections, through the updates made while reading.
* ``InPlaceStage`` (stage 2 with ``--fast-weights inplace``): the base is
  frozen, its fast W_down start from the pretrained values in every
  document; the target's convolution and ``W_target`` train on the CE of
  the fast-weight model under the schedule (``model.inplace``).
* ``ValueGateStage`` (stage 2b, ``ponder train gate``): everything but the
  gating network is frozen; the gate (``GateConfig.output = "value"``)
  learns to predict, from the features of the chunk before, what updating a
  chunk is worth: its CE gain in nats/token (docs/design.md, "Gating").
* ``ReadGateStage`` (``ponder train gate`` of a LoRA checkpoint): only the
  read gate (``model.read_gate``) trains, on what updating each chunk is
  worth to the tokens after it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
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
    validation: str = "ce"
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
    validation: str = "ce"
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


@dataclasses.dataclass(frozen=True)
class InPlaceStage:
    seq_len: int
    chunk: int
    schedule: Schedule = Schedule("update")
    name: str = "inplace"
    validation: str = "ce"
    trainable: object = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("base")))  # the conv and W_target

    @property
    def align(self) -> int:
        return self.chunk

    def loss(self, model, batch: Batch):
        out = model(batch.tokens, batch.positions, self.schedule, segment_ids=batch.segment_ids)
        ce = masked_cross_entropy(out.logits, batch)
        return ce, {"ce": ce, "mean_lambda": out.chunk_lambda.mean(), "clipped": out.state.clipped.sum()}

    def tokens_flops(self, model) -> float:
        # The frozen base forward (2 x) and, per fast block, the update's outer products and the
        # per-chunk weights' products, forward and backward.
        D, L = model.config.base.n_embd, model.config.inplace.layers
        base = _gpt_flops_per_token(model.base.config, self.seq_len) / 3
        return base + L * 3 * (2 * 4 * D * D * 2 + 2 * D * D)


@dataclasses.dataclass(frozen=True)
class LoRAStage(InPlaceStage):
    """Stage 2 of LoRA fast weights (``model.lora``): ``A0``, the adapters' starting down projections.

    Its gradient flows through the updates made while reading (a second-order
    step): the loss is the CE of the text read with the adapters trained on it.
    """

    name: str = "lora"

    def tokens_flops(self, model) -> float:
        # The base forward, then per fast block an update (forward and backward over the chunk), all
        # differentiated once more: about three times the forward and backward of the fast blocks.
        cfg = model.config
        blocks = _gpt_flops_per_token(cfg.base, self.seq_len) / cfg.base.n_layer
        return _gpt_flops_per_token(cfg.base, self.seq_len) / 3 + 3 * cfg.lora.layers * blocks


@dataclasses.dataclass(frozen=True)
class ValueGateStage(TTTStage):
    """Regression of the gate's score on each chunk's measured gain (``ponder train gate``).

    Each step runs every row three times over the same base pass: with every
    chunk updated (lam = 1), with none, and with a random share of chunks
    updated (a rate drawn per row in ``rates``), along which the features are
    computed, so the gate sees the states a budget leaves (some chunks
    skipped, the books of spending against a target). A chunk's gain is its
    mean CE with no chunk updated minus with every chunk updated: what ORACLE
    ranks by. The loss is the squared error of ``gate.score`` on the
    features before the chunk, over every chunk with a scored token; a gate
    that ranks chunks as their gains do spends a budget where it pays.
    """

    rates: tuple[float, float] = (0.2, 0.8)
    name: str = "gate"
    validation: str = "value_loss"
    trainable: object = nnx.All(nnx.Param, nnx.PathContains("gate"))

    def loss(self, model, batch: Batch):
        positions, attention = self.attention(batch)
        B, T = batch.tokens.shape
        n = T // self.chunk
        run = lambda lam, target=None: model(
            batch.tokens, positions, self.schedule, segment_ids=batch.segment_ids, attention_ids=attention,
            chunk_lambda=lam, target=target,
        )
        key = jax.random.key(jnp.sum(batch.tokens, dtype=jnp.uint32))  # a fresh draw per batch, reproducible
        rate_key, coin_key = jax.random.split(key)
        rate = jax.random.uniform(rate_key, (B,), minval=self.rates[0], maxval=self.rates[1])
        behaviour = run(jax.random.bernoulli(coin_key, rate[:, None], (B, n)).astype(jnp.float32), rate)
        per_chunk = lambda out: _chunk_losses(out.logits, batch, self.chunk)
        (updated_ce, weight), (skipped_ce, _) = per_chunk(run(jnp.ones((B, n)))), per_chunk(run(jnp.zeros((B, n))))
        gain = jax.lax.stop_gradient(skipped_ce - updated_ce)  # [B, n]
        features = jax.lax.stop_gradient(behaviour.chunk_features)  # [B, n, F]
        score = model.gate.score(features.reshape(B * n, -1)).reshape(B, n)
        real = (weight > 0).astype(jnp.float32)
        loss = (jnp.square(score - gain) * real).sum() / jnp.maximum(real.sum(), 1.0)
        centred = lambda a: (a - (a * real).sum() / jnp.maximum(real.sum(), 1.0)) * real
        correlation = _correlation(centred(score), centred(gain))
        return loss, {
            "value_loss": loss,
            "ce": (updated_ce * weight).sum() / jnp.maximum(weight.sum(), 1.0),
            "mean_gain": (gain * real).sum() / jnp.maximum(real.sum(), 1.0),
            "score_gain_correlation": correlation,
            "behaviour_rate": behaviour.chunk_updated.mean(),
        }

    def tokens_flops(self, model) -> float:
        # Three forward passes of the frozen model (TTTStage counts one forward and the TTT backward).
        D, V = model.config.base.n_embd, model.config.base.vocab_size
        base = _gpt_flops_per_token(model.base.config, min(self.seq_len, self.window or self.seq_len)) / 3
        ttt = sum(2 * 4 * D * D + layer.update_flops(self.chunk) / self.chunk for layer in model.ttt)
        return 3 * (base + ttt + 2 * D * V)


@dataclasses.dataclass(frozen=True)
class ReadGateStage:
    """Regression of LoRA's read gate on what updating each chunk is worth (``ponder train gate``).

    Each row is read with lam = ``at`` on every chunk, the read features
    (``model.read_gate``) computed along. A chunk's worth is
    -d(summed next-token loss of the rest of its document piece)/d(lam of the
    chunk) (``train.evaluate.update_value``'s measure, one backward pass),
    divided by the scored tokens after the chunk in the piece, in millinats per
    later token: what the update does for each token it reaches, whatever the
    row leaves of the document. Chunks with fewer than ``min_after`` scored
    tokens after them in their piece are left out (their measure is cut short
    by the row's end). The loss is the Huber loss of ``gate.score`` (quadratic
    within ``delta`` millinats, linear beyond: the worth has heavy tails, a
    few chunks worth a hundred times the typical one), plus the same loss of
    both measured from their mean over the chunks of the same piece: a
    budget ranks a document's chunks against each other, and the worth's
    level varies far more from document to document than within one, which a
    plain fit would spend itself on.
    """

    seq_len: int
    chunk: int
    at: float = 0.5
    min_after: int = 128
    delta: float = 1.0
    name: str = "gate"
    validation: str = "value_loss"
    trainable: object = nnx.All(nnx.Param, nnx.PathContains("gate"))

    @property
    def align(self) -> int:
        return self.chunk

    def loss(self, model, batch: Batch):
        B, T = batch.tokens.shape
        n, C = T // self.chunk, self.chunk
        scored = jnp.pad(loss_mask(batch.segment_ids, batch.real), ((0, 0), (1, 0))).astype(jnp.float32)  # [B, T]: token t

        def summed_loss(lam):
            out = model(batch.tokens, batch.positions, Schedule("update"), segment_ids=batch.segment_ids,
                        chunk_lambda=lam, features=True)
            logits = out.logits[:, :-1].astype(jnp.float32)
            nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch.tokens[:, 1:, None], -1)[..., 0]
            return (nll * scored[:, 1:]).sum(), out.features

        grad, features = jax.grad(summed_loss, has_aux=True)(jnp.full((B, n), self.at, jnp.float32))
        piece = batch.segment_ids[:, ::C]  # [B, n] each chunk's piece (pieces start on chunk boundaries)
        later = jnp.arange(T)[None, None] >= (jnp.arange(n)[:, None] + 1) * C  # [1, n, T]
        after = (later & (batch.segment_ids[:, None] == piece[..., None])) * scored[:, None]  # [B, n, T]
        after = after.sum(-1)
        worth = jax.lax.stop_gradient(-1e3 * grad / jnp.maximum(after, 1.0))  # [B, n] millinats per later token
        score = model.gate.score(jax.lax.stop_gradient(features).reshape(B * n, -1)).reshape(B, n)
        kept = (after >= self.min_after).astype(jnp.float32)
        count = jnp.maximum(kept.sum(), 1.0)
        same = (piece[:, :, None] == piece[:, None, :]) * kept[:, None, :]  # [B, n, n] kept chunks of the same piece
        within = lambda a: a - (same * a[:, None, :]).sum(-1) / jnp.maximum(same.sum(-1), 1.0)
        huber = lambda a, b: (optax.losses.huber_loss(a, b, delta=self.delta) * kept).sum() / count
        loss = huber(score, worth) + huber(within(score), within(worth))
        correlation = _correlation(within(score) * kept, within(worth) * kept)
        return loss, {"value_loss": loss, "mean_worth": (worth * kept).sum() / count,
                      "correlation_within_pieces": correlation, "chunks": kept.sum()}

    def tokens_flops(self, model) -> float:
        # A LoRA stage-2 step's work (a forward through the updates and its backward); the gate is negligible.
        return LoRAStage(self.seq_len, self.chunk).tokens_flops(model)


def _correlation(x, y):
    """Pearson correlation of two arrays already centred (and masked where they do not count)."""
    return (x * y).sum() / jnp.sqrt(jnp.square(x).sum() * jnp.square(y).sum() + 1e-12)


def _chunk_losses(logits, batch: Batch, chunk: int):
    """Per chunk: mean next-token loss of its scored tokens [B, n] and how many there are [B, n].

    Token t's loss is charged to t's chunk (the prediction made at t - 1), as the gate's chunks count it.
    """
    mask = loss_mask(batch.segment_ids, batch.real).astype(jnp.float32)  # [B, T-1]: predicting token t+1
    logits = logits[:, :-1].astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, batch.tokens[:, 1:, None], axis=-1)[..., 0]
    pad = lambda a: jnp.pad(a, ((0, 0), (1, 0)))  # token 0 is predicted by nothing
    B, T = batch.tokens.shape
    total = (pad(nll * mask)).reshape(B, T // chunk, chunk).sum(-1)
    count = pad(mask).reshape(B, T // chunk, chunk).sum(-1)
    return total / jnp.maximum(count, 1.0), count
