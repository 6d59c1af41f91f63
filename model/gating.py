"""Gating: how strongly (lam) the TTT layer learns on each chunk (docs/design.md, "Gating").

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
of the fixed baselines (SKIP, UPDATE_k, FIXED_lam, RANDOM at a rate, and a
training-free threshold gate on the reconstruction loss whose threshold an
EMA controller steers toward a target update rate). ``learned_budget`` puts
the learned gate under such a controller: a compute budget.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

N_FEATURES = 6
SCHEDULES = ("learned", "skip", "update", "fixed", "random", "random_learned", "threshold", "learned_budget")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Attributes:
    chunk: tokens per gating decision (a multiple of the TTT mini-batch).
    lambda_max: upper end of lam.
    threshold: lam below this skips the chunk's update.
    hidden: width of the gating MLP.
    ema: decay of the difficulty EMA and of the threshold gate's rate EMA.
    output: how the gate's last unit a becomes lam. ``"clip"``: lam =
      clip(a, 0, lambda_max), exactly 0 for a <= 0, so a real skip is within
      reach of the compute penalty gamma * mean(lam) (an L1 penalty on a
      rectified output, as in the lasso). Within reach, not reached: the
      bundled checkpoint's gate shrank lam on every chunk instead
      (checkpoints/README.md). ``"sigmoid"``: lam = lambda_max *
      sigmoid(a), which never reaches 0: trained with the penalty, it lowers
      lam on every chunk alike and skips none (a stage-2 run measured mean
      lam 1 -> 0.53 with 100% of chunks still updated); kept for checkpoints
      made with it (their config.json has no ``output``).
    """

    chunk: int = 64
    lambda_max: float = 4.0
    threshold: float = 0.05
    hidden: int = 16
    ema: float = 0.9
    output: str = "clip"

    def __post_init__(self):
        if self.output not in ("clip", "sigmoid"):
            raise ValueError(f"gate output must be 'clip' or 'sigmoid', got {self.output!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Where lam comes from.

    Attributes:
      kind: one of ``SCHEDULES``. ``random_learned``: the learned gate's lam on
        a random ``rate`` share of the chunks (which chunks at random, how
        strongly learned: the control that tells the gate's choice of chunks
        from its step size). ``learned_budget``: the learned gate's lam on the
        chunks where it reaches a threshold that an EMA controller steers
        toward an update rate of ``rate`` (as ``threshold`` steers its
        reconstruction-loss threshold); a document's first chunk always
        updates. A fixed threshold on lam cannot hold a rate: a skipped chunk
        changes the features of the next, which lowers its lam (a gate
        trained with every chunk updated, the one bundled before 2026-12-01's
        retraining, updated 76% of chunks at a threshold of 0.359 and under
        50% at 0.375).
      value: lam of ``fixed``.
      rate: update rate of ``random`` / ``random_learned``, target rate of
        ``threshold`` / ``learned_budget``.
      seed: seed of ``random`` / ``random_learned``.
      gain: step of the threshold controller (log-threshold per chunk).
      initial_threshold: starting threshold of ``threshold`` (on the
        reconstruction loss) and ``learned_budget`` (on lam).
      steps: gradient steps per mini-batch (k of UPDATE_k; full forwards only).
    """

    kind: str = "learned"
    value: float = 1.0
    rate: float = 0.5
    seed: int = 0
    gain: float = 0.5
    initial_threshold: float = 1.0
    steps: int = 1

    @property
    def reads_history(self) -> bool:
        """Whether lam depends on the gate's features (else they are not computed: they cost a base LM head)."""
        return self.kind in ("learned", "random_learned", "threshold", "learned_budget")

    @property
    def uses_gate(self) -> bool:
        """Whether lam comes from the gating network (so training it can change anything)."""
        return self.kind in ("learned", "random_learned", "learned_budget")

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"schedule rate must be in [0, 1], got {self.rate!r}")
        if self.steps < 1:
            raise ValueError(f"schedule steps must be >= 1, got {self.steps!r}")


class GatingNetwork(nnx.Module):
    """A small MLP: chunk features [B, N_FEATURES] -> lam [B] in [0, lambda_max] (``GateConfig.output``).

    The output layer starts at zero with a bias giving lam = 1, so an untrained
    gate behaves like UPDATE_1.
    """

    def __init__(self, config: GateConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.hidden = nnx.Linear(N_FEATURES, config.hidden, rngs=rngs)
        # The output unit's start, giving lam = 1 (for sigmoid: sigmoid(start) * lambda_max = 1).
        start = 1.0 if config.output == "clip" else math.log(1.0 / (config.lambda_max - 1.0))
        self.out = nnx.Linear(
            config.hidden, 1, kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.constant(start), rngs=rngs
        )

    def __call__(self, features):
        h = jax.nn.gelu(self.hidden(features), approximate=True)  # [B, hidden]
        a = self.out(h)[:, 0]  # [B]
        if self.config.output == "clip":
            return jnp.clip(a, 0.0, self.config.lambda_max)
        return self.config.lambda_max * jax.nn.sigmoid(a)


def token_stats(logits, tokens):
    """Per token: cross-entropy of ``tokens`` under ``logits`` and the predictive entropy.

    Args:
      logits: [B, T, V], position t predicting ``tokens[:, t]``; tokens: [B, T].

    Returns:
      ``(nll, entropy)``, each [B, T].
    """
    # This runs over [B, T, V] on every prefill. entropy = log Z - sum(p z); XLA on
    # CPU runs the sum(p z) reduction ~10x faster as a dot than as multiply-and-sum.
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    p = jnp.exp(logits - log_z[..., None])  # [B, T, V]
    entropy = log_z - jnp.einsum("btv,btv->bt", p, logits)
    nll = log_z - jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return nll, entropy


def chunk_stats(nll, entropy, scored):
    """Mean cross-entropy and entropy over the scored tokens of a chunk.

    Args:
      nll, entropy: [B, C] per token (``token_stats``); scored: [B, C] bool,
        False for a document's first token (nothing predicts it).

    Returns:
      ``(ce, entropy)``, each [B].
    """
    weight = scored.astype(nll.dtype)
    count = jnp.maximum(weight.sum(-1), 1.0)
    return (nll * weight).sum(-1) / count, (entropy * weight).sum(-1) / count
