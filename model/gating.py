"""Gating: how strongly (lam) the TTT layer learns on each chunk (docs/design.md, "Gating").

The document is cut into chunks of C tokens (a multiple of the mini-batch
size K). The gate scale ``lam_c`` of chunk c multiplies the learning rates of
every mini-batch in that chunk, and is computed only from what came before
chunk c: the features of chunk c-1 and a running history. ``lam_c`` below a
threshold skips the update computation of chunk c (the fast weights are only
applied).

Features of a chunk (``N_FEATURES`` per row, ``FEATURES`` names them): the
base model's cross-entropy and predictive entropy on the chunk's tokens, the
TTT reconstruction loss before and after the chunk's update, the chunk's
position, how new its tokens are to the document, what was spent so far
against the budget, and exponential moving averages of these (an EMA reads
its own previous value from the previous chunk's features). A gate saved
with the first six only (``GateConfig.features = 6``) reads those.

``Schedule`` names where lam comes from: the learned gating network, or one
of the fixed baselines (SKIP, UPDATE_k, FIXED_lam, RANDOM at a rate, and a
training-free threshold gate on the reconstruction loss whose threshold an
EMA controller steers toward a target update rate). ``learned_budget`` puts
the learned gate under a compute budget (``budget_choice``). Every budgeted
schedule reads its target rate from the document's state (``GateHistory.target``,
set from ``Schedule.rate`` at a document start), so a server can give each
session its own.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

FEATURES = (
    "ce", "entropy", "recon_before", "recon_after", "log_position", "ce_ema",  # the first six: GateConfig.features = 6
    "surprise", "nll_std", "nll_max", "entropy_ema", "recon_drop", "recon_drop_ema", "recon_before_ema",
    "recon_before_ema_fast", "recon_after_ema", "recon_log_ratio", "ce_ema_fast", "entropy_ema_fast",
    "calibration_gap", "calibration_gap_ema", "diversity", "diversity_ema", "novelty", "novelty_ema",
    "novelty_ema_fast", "vocabulary_growth", "updated", "lam", "rate_ema", "target", "budget_left",
    "log_chunks_since_update",
)
N_FEATURES = len(FEATURES)
SCHEDULES = ("learned", "skip", "update", "fixed", "random", "random_learned", "threshold", "learned_budget", "policy")
BUDGET_WINDOW = 16  # learned_budget ranks a chunk's score among this many previous chunks' scores
DEBT_CHUNKS = 4.0  # ... and pays back a shortfall (or excess) against the target over about this many chunks


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Attributes:
    chunk: tokens per gating decision (a multiple of the TTT mini-batch).
    lambda_max: upper end of lam.
    threshold: lam below this skips the chunk's update.
    hidden: width of the gating MLP.
    ema: decay of the slow EMAs (difficulty, ...) and of the threshold gate's rate EMA.
    features: how many of ``FEATURES`` the gate reads (the first ones).
    output: how the gate's last unit a becomes lam. ``"value"``: a is the
      predicted CE gain (nats/token) of updating the next chunk rather than
      skipping it, trained by regression on measured gains
      (``train.stages.ValueGateStage``); lam = 1 where a > 0, and under a
      budget the chunks with the highest a update. ``"clip"``: lam =
      clip(a, 0, lambda_max), exactly 0 for a <= 0, trained with a compute
      penalty gamma * mean(lam); in practice it shrank lam on every chunk
      instead of skipping some (checkpoints/README.md). ``"sigmoid"``: lam =
      lambda_max * sigmoid(a), which never reaches 0; kept for checkpoints
      made with it (their config.json has no ``output``).
    """

    chunk: int = 64
    lambda_max: float = 4.0
    threshold: float = 0.05
    hidden: int = 16
    ema: float = 0.9
    features: int = N_FEATURES
    output: str = "value"

    def __post_init__(self):
        if self.output not in ("value", "clip", "sigmoid"):
            raise ValueError(f"gate output must be 'value', 'clip' or 'sigmoid', got {self.output!r}")
        if not 1 <= self.features <= N_FEATURES:
            raise ValueError(f"gate features must be in [1, {N_FEATURES}], got {self.features!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Where lam comes from.

    Attributes:
      kind: one of ``SCHEDULES``. ``random_learned``: the learned gate's lam on
        a random share of the chunks (which chunks at random, how strongly
        learned: the control that tells the gate's choice of chunks from its
        step size). ``learned_budget``: the learned gate under a budget
        (``budget_choice``): a chunk updates when its score ranks high
        enough among the document's recent chunks, the bar moving with what
        was spent so far. ``policy``: the update policy (``model.policy``):
        under the same budget rule, ranked by its log-odds of updating, an
        updated chunk taking the steps of its likeliest UPDATE_k; with
        ``explore``, an action sampled from it per chunk (training rollouts).
      value: lam of ``fixed``.
      rate: the target update rate of a new document (``GateHistory.target``):
        the rate of ``random`` / ``random_learned``, the target of
        ``threshold`` / ``learned_budget``.
      seed: seed of ``random`` / ``random_learned``.
      gain: step of the threshold gate's controller (log-threshold per chunk).
      initial_threshold: starting threshold of ``threshold`` (on the
        reconstruction loss).
      steps: gradient steps per mini-batch (k of UPDATE_k).
      explore: ``policy`` samples its actions (seeded by ``seed``) instead of following the budget rule.
    """

    kind: str = "learned"
    value: float = 1.0
    rate: float = 0.5
    seed: int = 0
    gain: float = 0.5
    initial_threshold: float = 1.0
    steps: int = 1
    explore: bool = False

    @property
    def reads_history(self) -> bool:
        """Whether lam depends on the gate's features (else they are not computed: they cost a base LM head)."""
        return self.kind in ("learned", "random_learned", "threshold", "learned_budget", "policy")

    @property
    def max_steps(self) -> int:
        """The most gradient steps per mini-batch a chunk may take (compile-time)."""
        return 4 if self.kind == "policy" else self.steps

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
    """A small MLP: chunk features [B, N_FEATURES] -> its output unit [B] (``score``) -> lam [B] (``__call__``).

    The output layer starts at zero with a bias giving lam = 1, so an untrained
    gate behaves like UPDATE_1.
    """

    def __init__(self, config: GateConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.hidden = nnx.Linear(config.features, config.hidden, rngs=rngs)
        # The output unit's start, giving lam = 1 (for sigmoid: sigmoid(start) * lambda_max = 1).
        start = math.log(1.0 / (config.lambda_max - 1.0)) if config.output == "sigmoid" else 1.0
        self.out = nnx.Linear(
            config.hidden, 1, kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.constant(start), rngs=rngs
        )

    def score(self, features):
        """The output unit a [B]: what the gate ranks chunks by (for ``"value"``, the predicted gain)."""
        h = jax.nn.gelu(self.hidden(features[:, : self.config.features]), approximate=True)  # [B, hidden]
        return self.out(h)[:, 0]

    def __call__(self, features):
        return self.lam(self.score(features))

    def lam(self, a):
        """lam from the output unit."""
        if self.config.output == "value":
            return (a > 0).astype(a.dtype)
        if self.config.output == "clip":
            return jnp.clip(a, 0.0, self.config.lambda_max)
        return self.config.lambda_max * jax.nn.sigmoid(a)


def budget_choice(score, scores, chunk, used, target):
    """Whether a chunk updates under a budget: its score against the document's recent ones.

    The chunk updates when its score beats at least ``1 - t`` of the (at most
    ``BUDGET_WINDOW``) previous chunks' scores, where the target rate ``t``
    is raised (lowered) by the shortfall (excess) of updates so far, paid back
    over ``DEBT_CHUNKS`` chunks. Ranking among recent chunks makes the rule
    indifferent to the scores' scale and drift; the debt keeps a long
    document's realised rate on target. A document's first chunk updates
    when the target is above 0. Everything here is known before the chunk.

    Args:
      score: [B] the chunk's score; scores: [B, BUDGET_WINDOW] previous scores
        (a ring indexed by chunk number); chunk: [B] the chunk's number in the
        document; used: [B] chunks updated so far; target: [B] target rate.

    Returns:
      [B] bool.
    """
    seen = jnp.minimum(chunk, BUDGET_WINDOW)  # [B] valid entries of the ring
    valid = jnp.arange(BUDGET_WINDOW)[None] < seen[:, None]  # [B, W]
    below = ((scores < score[:, None]) + 0.5 * (scores == score[:, None])) * valid
    rank = below.sum(-1) / jnp.maximum(seen, 1)  # [B] share of recent scores below this one
    wanted = jnp.clip(target + (target * chunk - used) / DEBT_CHUNKS, 0.0, 1.0)
    return jnp.where(chunk == 0, target > 0, (rank >= 1.0 - wanted) & (wanted > 0))


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ChunkStats:
    """What the base model and the chunk's tokens say about one closed chunk, per row ([B] each).

    ce, entropy: mean cross-entropy and predictive entropy over the scored
    tokens; nll_std, nll_max: spread and peak of the token losses; diversity:
    distinct tokens / tokens; novelty: share of the chunk's tokens not seen
    earlier in the document.
    """

    ce: jax.Array
    entropy: jax.Array
    nll_std: jax.Array
    nll_max: jax.Array
    diversity: jax.Array
    novelty: jax.Array


def chunk_stats(nll, entropy, scored, tokens, seen):
    """The chunk's ``ChunkStats`` and the document's seen-token set after it.

    Args:
      nll, entropy: [B, C] per token (``token_stats``); scored: [B, C] bool,
        False for a document's first token (nothing predicts it); tokens:
        [B, C]; seen: [B, V] bool, the tokens of the document before the chunk.

    Returns:
      ``(ChunkStats, seen)``.
    """
    weight = scored.astype(nll.dtype)
    count = jnp.maximum(weight.sum(-1), 1.0)
    mean = lambda a: (a * weight).sum(-1) / count
    ce = mean(nll)
    std = jnp.sqrt(jnp.maximum(mean(jnp.square(nll - ce[:, None])), 0.0))
    ordered = jnp.sort(tokens, axis=-1)
    diversity = (1.0 + (ordered[:, 1:] != ordered[:, :-1]).sum(-1, dtype=nll.dtype)) / tokens.shape[1]
    novelty = 1.0 - jnp.take_along_axis(seen, tokens, axis=-1).mean(-1)
    rows = jnp.arange(tokens.shape[0])[:, None]
    stats = ChunkStats(ce, mean(entropy), std, jnp.where(scored, nll, 0.0).max(-1), diversity, novelty)
    return stats, seen.at[rows, tokens].set(True)


def chunk_features(previous, stats: ChunkStats, recon, position, updated, lam, ema: float, budget):
    """The features of a closed chunk [B, N_FEATURES] (``FEATURES``), given the previous chunk's.

    Args:
      previous: [B, N_FEATURES] the features of the chunk before (zeros at a
        document start); their EMA entries are carried on.
      stats: the chunk's ``ChunkStats``; recon: ``(before, after)`` [B] the
        first TTT layer's reconstruction loss at the weights before and after
        the chunk; position: [B] tokens of the document after the chunk;
        updated: [B] bool; lam: [B] the chunk's lam; ema: the slow EMA's decay.
      budget: ``(rate_ema, target, used, chunks, vocabulary)`` [B] each: the
        EMA of the update rate, the target rate, chunks updated and chunks
        closed so far (this one included), and distinct tokens seen so far.
    """
    index = {name: i for i, name in enumerate(FEATURES)}
    before, after = recon
    rate_ema, target, used, chunks, vocabulary = budget
    updated = updated.astype(jnp.float32)
    slow = lambda name, x: ema * previous[:, index[name]] + (1 - ema) * x
    fast = lambda name, x: 0.5 * previous[:, index[name]] + 0.5 * x
    since = jnp.where(updated > 0, 0.0, jnp.expm1(previous[:, index["log_chunks_since_update"]]) + 1.0)
    gap = stats.ce - stats.entropy
    values = {
        "ce": stats.ce, "entropy": stats.entropy, "recon_before": before, "recon_after": after,
        "log_position": jnp.log1p(position), "ce_ema": slow("ce_ema", stats.ce),
        "surprise": stats.ce - previous[:, index["ce_ema"]], "nll_std": stats.nll_std, "nll_max": stats.nll_max,
        "entropy_ema": slow("entropy_ema", stats.entropy), "recon_drop": before - after,
        "recon_drop_ema": slow("recon_drop_ema", before - after), "recon_before_ema": slow("recon_before_ema", before),
        "recon_before_ema_fast": fast("recon_before_ema_fast", before), "recon_after_ema": slow("recon_after_ema", after),
        "recon_log_ratio": jnp.log(after + 1e-6) - jnp.log(before + 1e-6), "ce_ema_fast": fast("ce_ema_fast", stats.ce),
        "entropy_ema_fast": fast("entropy_ema_fast", stats.entropy), "calibration_gap": gap,
        "calibration_gap_ema": slow("calibration_gap_ema", gap), "diversity": stats.diversity,
        "diversity_ema": slow("diversity_ema", stats.diversity), "novelty": stats.novelty,
        "novelty_ema": slow("novelty_ema", stats.novelty), "novelty_ema_fast": fast("novelty_ema_fast", stats.novelty),
        "vocabulary_growth": vocabulary / jnp.maximum(position, 1.0), "updated": updated, "lam": lam, "rate_ema": rate_ema,
        "target": target, "budget_left": target - used / jnp.maximum(chunks, 1.0),
        "log_chunks_since_update": jnp.log1p(since),
    }
    return jnp.stack([values[name] for name in FEATURES], axis=-1)
