"""Gating: how strongly (lam) the TTT layer learns on each chunk (DESIGN.md §3).

The document is cut into chunks of C tokens (a multiple of the mini-batch
size K). The gate scale ``lam_c`` of chunk c multiplies the learning rates of
every mini-batch in that chunk, and is computed only from what came before
chunk c: features of chunk c-1 and a running history. ``lam_c`` below a
threshold skips the update computation of chunk c (the fast weights are only
applied).

Features of a chunk (``N_FEATURES`` per row): the base model's mean
cross-entropy and predictive entropy on the chunk's tokens, the TTT
reconstruction loss before and after the chunk's update, log(1 + position),
and an EMA of the cross-entropy (difficulty so far).

``Schedule`` names where lam comes from: the learned gating network, or one
of the fixed baselines (SKIP, UPDATE_1, FIXED_lam, RANDOM at a rate, and a
training-free threshold gate on the reconstruction loss whose threshold an
EMA controller steers toward a target update rate).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

N_FEATURES = 6
SCHEDULES = ("learned", "skip", "update", "fixed", "random", "threshold")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Attributes:
    chunk: tokens per gating decision (a multiple of the TTT mini-batch).
    lambda_max: upper end of lam.
    threshold: lam below this skips the chunk's update.
    hidden: width of the gating MLP.
    ema: decay of the difficulty EMA and of the threshold gate's rate EMA.
    """

    chunk: int = 64
    lambda_max: float = 4.0
    threshold: float = 0.05
    hidden: int = 16
    ema: float = 0.9


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Where lam comes from.

    Attributes:
      kind: one of ``SCHEDULES``.
      value: lam of ``fixed``.
      rate: update rate of ``random`` and target rate of ``threshold``.
      seed: seed of ``random``.
      gain: step of the threshold controller (log-threshold per chunk).
      initial_threshold: starting reconstruction-loss threshold of ``threshold``.
    """

    kind: str = "learned"
    value: float = 1.0
    rate: float = 0.5
    seed: int = 0
    gain: float = 0.5
    initial_threshold: float = 1.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"schedule rate must be in [0, 1], got {self.rate!r}")


class GatingNetwork(nnx.Module):
    """A small MLP: chunk features [B, N_FEATURES] -> lam [B] in [0, lambda_max].

    The output layer starts at zero with a bias giving lam = 1, so an untrained
    gate behaves like UPDATE_1.
    """

    def __init__(self, config: GateConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.hidden = nnx.Linear(N_FEATURES, config.hidden, rngs=rngs)
        start = math.log(1.0 / (config.lambda_max - 1.0))  # sigmoid(start) * lambda_max = 1
        self.out = nnx.Linear(
            config.hidden, 1, kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.constant(start), rngs=rngs
        )

    def __call__(self, features):
        h = jax.nn.gelu(self.hidden(features), approximate=True)  # [B, hidden]
        return self.config.lambda_max * jax.nn.sigmoid(self.out(h)[:, 0])  # [B]


def chunk_token_stats(base_logits, tokens, chunk: int):
    """Per chunk: mean base cross-entropy and predictive entropy of the chunk's tokens.

    Token t is predicted by the logits at t-1, which depend on tokens before t
    only, so both statistics of chunk c use tokens of chunks <= c. The very
    first token has no prediction and is left out.

    Args:
      base_logits: [B, T, V]; tokens: [B, T].

    Returns:
      ``(ce, entropy)``, each [B, T / chunk].
    """
    B, T, V = base_logits.shape
    logp = jax.nn.log_softmax(base_logits[:, :-1], axis=-1)  # [B, T-1, V]: predicts tokens 1..T-1
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, T-1]
    pad = lambda a: jnp.concatenate([jnp.zeros((B, 1), a.dtype), a], axis=1)  # align to the predicted token
    valid = pad(jnp.ones((B, T - 1)))
    per_chunk = lambda a: (pad(a) * valid).reshape(B, -1, chunk).sum(-1) / valid.reshape(B, -1, chunk).sum(-1)
    return per_chunk(nll), per_chunk(entropy)
