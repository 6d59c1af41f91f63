"""PPO-Lagrangian for the update policy: which chunks the TTT layer learns on, and how hard.

The policy reads a causal feature vector of a chunk ([n_features] floats, computed
only from what came before the chunk) and picks one of four actions, the gradient
steps the TTT layer takes per mini-batch of the chunk (``ACTION_STEPS``)::

    SKIP = 0 steps, UPDATE_1 = 1, UPDATE_2 = 2, UPDATE_4 = 4

An episode is a document and a step is a chunk. The reward of a chunk is what its
tokens' cross-entropy says (``train.policy`` uses the gain over skipping every
chunk, in nats/token); its cost is the steps taken (UPDATE_1 costs 1). The budget
is a ceiling on the mean cost per chunk.

The pieces, all pure except ``ppo_update`` (which updates model and optimiser in
place, as ``train.trainer``'s step does):

- ``ActorCritic`` (``model.policy``, where the model that serves it finds it):
  policy logits and two critics, one for the reward and one for the cost, as
  PPO-Lagrangian needs an advantage for each.
- ``gae``: generalised advantage estimation over a time-major [T, N] trace, a
  reverse ``lax.scan``; run once on rewards and once on costs.
- ``ppo_loss``: the clipped surrogate on the Lagrangian advantage
  ``(A_r - lagrange * A_c) / (1 + lagrange)``, both critics' value losses and an
  entropy bonus.
- ``PIDLagrangian``: the multiplier, set between PPO iterations from the measured
  mean cost by a PID controller (Stooke et al. 2020, "Responsive Safety in
  Reinforcement Learning by PID Lagrangian Methods"): the integral alone is
  gradient ascent on the multiplier, which overshoots the budget and oscillates;
  the proportional and derivative terms react within one iteration.
- ``ppo_update``: minibatched epochs of Adam steps, jitted over the split model
  with one ``lax.scan`` over all minibatches.

Rollouts (running the TTT model with the policy's actions) live elsewhere; this
module sees only their [N]-row batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ponder.model.policy import ACTION_STEPS, ActorCritic


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Attributes:
    gamma, lam: discount and GAE lambda (``gae``).
    clip_eps: the surrogate's clip range, ratios outside [1 - clip_eps, 1 + clip_eps] give no gradient.
    value_coef: weight of the two critics' value losses. entropy_coef: weight of the entropy bonus.
    lr: Adam learning rate. max_grad_norm: global gradient-norm clip.
    epochs: passes over a batch per ``ppo_update``. minibatches: minibatches per pass (must divide the batch).
    """

    gamma: float = 0.99
    lam: float = 0.95
    clip_eps: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    lr: float = 3e-4
    max_grad_norm: float = 0.5
    epochs: int = 4
    minibatches: int = 4

    def __post_init__(self):
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"PPOConfig.clip_eps must be in (0, 1), got {self.clip_eps!r}")
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"PPOConfig.epochs and minibatches must be >= 1, got {self.epochs!r}, {self.minibatches!r}")


@jax.jit
def gae(rewards, values, dones, last_value, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over a time-major trace.

    Args:
      rewards: [T, N] per-step reward (or cost). values: [T, N] the critic's V(s_t).
      dones: [T, N] bool, True where the episode ends after step t: no bootstrap
        from step t + 1, and the recursion restarts there.
      last_value: [N] V of the state after the last step (used where the episode goes on).
      gamma, lam: discount and GAE lambda.

    Returns:
      (advantages [T, N], returns [T, N]), returns = advantages + values (the critic's target).
    """
    not_done = 1.0 - jnp.asarray(dones, jnp.float32)  # [T, N]
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)  # [T, N] V(s_{t+1})
    deltas = rewards + gamma * next_values * not_done - values  # [T, N] TD errors

    def back(next_advantage, step):
        delta, keep = step  # [N], [N]
        advantage = delta + gamma * lam * keep * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros_like(last_value), (deltas, not_done), reverse=True)  # [T, N]
    return advantages, advantages + values


class PPOBatch(NamedTuple):
    """One PPO batch, flattened over time and documents to N rows.

    Attributes:
      features: [N, n_features]. actions: [N] int32 indices into ``ACTION_STEPS``.
      old_logp: [N] log-probability of the action under the rollout policy.
      adv_reward, adv_cost: [N] advantages from ``gae`` on rewards and on costs.
      ret_reward, ret_cost: [N] the two critics' targets.
    """

    features: jax.Array
    actions: jax.Array
    old_logp: jax.Array
    adv_reward: jax.Array
    adv_cost: jax.Array
    ret_reward: jax.Array
    ret_cost: jax.Array


def lagrangian_advantage(adv_reward, adv_cost, lagrange):
    """The policy's advantage [N]: ``(A_r - lagrange * A_c) / (1 + lagrange)``, standardised over the batch.

    Dividing by 1 + lagrange keeps the advantage's scale as the multiplier grows
    (Stooke et al. 2020); standardising makes the step size independent of both.
    """
    advantage = (adv_reward - lagrange * adv_cost) / (1.0 + lagrange)  # [N]
    return (advantage - advantage.mean()) / (advantage.std() + 1e-8)


def clipped_surrogate(logp, old_logp, advantages, clip_eps: float):
    """PPO's clipped objective as a loss (to minimise): ``-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))``.

    Args:
      logp, old_logp: [N] log-probabilities of the taken actions now and at rollout.
      advantages: [N]. clip_eps: the clip range.

    Returns:
      (loss, ratio [N]) with ratio = exp(logp - old_logp).
    """
    ratio = jnp.exp(logp - old_logp)  # [N]
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -jnp.minimum(unclipped, clipped).mean(), ratio


def ppo_loss(model: ActorCritic, batch: PPOBatch, clip_eps: float, value_coef: float, entropy_coef: float, lagrange):
    """The PPO-Lagrangian loss of ``model`` on ``batch``.

    Args:
      model: the actor-critic. batch: a ``PPOBatch``.
      clip_eps: surrogate clip range. value_coef: weight of the two value losses.
      entropy_coef: weight of the entropy bonus. lagrange: the multiplier (>= 0) on the cost advantage.

    Returns:
      (loss, metrics) with metrics ``policy_loss``, ``value_loss_reward``,
      ``value_loss_cost``, ``entropy``, ``approx_kl`` (the estimator
      E[(r - 1) - log r] of KL(old || new), never negative) and ``clip_fraction``
      (share of rows whose ratio is outside the clip range).
    """
    logits, value_reward, value_cost = model(batch.features)  # [N, A], [N], [N]
    log_probs = jax.nn.log_softmax(logits)  # [N, A]
    logp = jnp.take_along_axis(log_probs, batch.actions[:, None], axis=1)[:, 0]  # [N]
    advantages = lagrangian_advantage(batch.adv_reward, batch.adv_cost, lagrange)
    policy_loss, ratio = clipped_surrogate(logp, batch.old_logp, advantages, clip_eps)
    value_loss_reward = 0.5 * jnp.mean((value_reward - batch.ret_reward) ** 2)
    value_loss_cost = 0.5 * jnp.mean((value_cost - batch.ret_cost) ** 2)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1).mean()
    loss = policy_loss + value_coef * (value_loss_reward + value_loss_cost) - entropy_coef * entropy
    log_ratio = logp - batch.old_logp
    metrics = {
        "policy_loss": policy_loss,
        "value_loss_reward": value_loss_reward,
        "value_loss_cost": value_loss_cost,
        "entropy": entropy,
        "approx_kl": jnp.mean(jnp.expm1(log_ratio) - log_ratio),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)),
    }
    return loss, metrics


def ppo_optimizer(model: ActorCritic, config: PPOConfig) -> nnx.Optimizer:
    """Adam after a global gradient-norm clip, on the model's ``nnx.Param`` s (not the feature statistics)."""
    return nnx.Optimizer(model, _transform(config.lr, config.max_grad_norm), wrt=nnx.Param)


@functools.cache
def _transform(lr: float, max_grad_norm: float) -> optax.GradientTransformation:
    # One transform per setting: the optimiser's graphdef, a static argument of the jitted update,
    # holds it, and a new (unequal) one for each new optimiser would recompile the update.
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(lr))


def ppo_update(model: ActorCritic, optimizer: nnx.Optimizer, batch: PPOBatch, key, lagrange, config: PPOConfig) -> dict:
    """``config.epochs`` passes over ``batch`` in ``config.minibatches`` shuffled minibatches, one Adam step each.

    Updates ``model`` and ``optimizer`` in place.

    Args:
      model, optimizer: the actor-critic and its ``ppo_optimizer``.
      batch: a ``PPOBatch`` of N rows, N a multiple of ``config.minibatches``.
      key: PRNG key for the shuffles. lagrange: the multiplier (a float; traced, so a new value does not recompile).
      config: the ``PPOConfig``.

    Returns:
      The ``ppo_loss`` metrics, plus ``loss`` and ``grad_norm`` (before clipping), averaged over all steps, as floats.
    """
    n = batch.actions.shape[0]
    if n % config.minibatches:
        raise ValueError(f"ppo_update: batch of {n} rows does not split into PPOConfig.minibatches={config.minibatches}")
    graphdef, state = nnx.split((model, optimizer))
    state, metrics = _ppo_update(graphdef, state, batch, key, jnp.float32(lagrange), config)
    nnx.update((model, optimizer), state)
    return {name: float(value) for name, value in metrics.items()}


@functools.partial(jax.jit, static_argnums=(0, 5))
def _ppo_update(graphdef, state, batch: PPOBatch, key, lagrange, config: PPOConfig):
    n = batch.actions.shape[0]
    keys = jax.random.split(key, config.epochs)
    order = jax.vmap(lambda k: jax.random.permutation(k, n))(keys)  # [epochs, N]
    order = order.reshape(config.epochs * config.minibatches, n // config.minibatches)  # [steps, N / minibatches]

    def step(state, rows):
        model, optimizer = nnx.merge(graphdef, state)
        minibatch = jax.tree.map(lambda x: x[rows], batch)

        def loss_fn(model):
            return ppo_loss(model, minibatch, config.clip_eps, config.value_coef, config.entropy_coef, lagrange)

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}

    state, metrics = jax.lax.scan(step, state, order)  # metrics: each [steps]
    return state, jax.tree.map(jnp.mean, metrics)


@dataclasses.dataclass
class PIDLagrangian:
    """The Lagrange multiplier as a PID controller on the measured cost (Stooke et al. 2020, Algorithm 2).

    Each PPO iteration, with the cost J (mean steps per chunk of the last rollouts)
    and the budget d::

        J~ = ema * J~ + (1 - ema) * J      (J~ = J on the first call; ema = 0: no smoothing)
        I  = max(0, I + (J - d))           the integral: never negative, so it cannot bank credit
        D  = max(0, J~ - J~_prev)          the derivative, only on a rise in spending (0 on the first call)
        lagrange = max(0, kp * (J~ - d) + ki * I + kd * D)

    The integral term alone is the usual gradient ascent on the multiplier (ki =
    its learning rate); the proportional and derivative terms answer within one
    iteration, which damps the overshoot. A plain dataclass of floats: ``to_dict``
    and ``from_dict`` carry it through a JSON checkpoint.

    Attributes:
      kp, ki, kd: the gains (>= 0). ema: smoothing of the measured cost for the P and D terms, in [0, 1).
      integral, smoothed_cost, lagrange: the state (``smoothed_cost`` None before the first update).
    """

    kp: float = 0.1
    ki: float = 0.01
    kd: float = 0.0
    ema: float = 0.0
    integral: float = 0.0
    smoothed_cost: float | None = None
    lagrange: float = 0.0

    def __post_init__(self):
        for name in ("kp", "ki", "kd"):
            if getattr(self, name) < 0:
                raise ValueError(f"PIDLagrangian.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"PIDLagrangian.ema must be in [0, 1), got {self.ema!r}")

    def update(self, measured_cost: float, target: float) -> float:
        """Takes one iteration's measured mean cost and the budget; returns the new multiplier (>= 0)."""
        measured_cost, target = float(measured_cost), float(target)
        previous = self.smoothed_cost
        smoothed = measured_cost if previous is None else self.ema * previous + (1.0 - self.ema) * measured_cost
        rise = 0.0 if previous is None else max(0.0, smoothed - previous)
        self.integral = max(0.0, self.integral + measured_cost - target)
        self.smoothed_cost = smoothed
        self.lagrange = max(0.0, self.kp * (smoothed - target) + self.ki * self.integral + self.kd * rise)
        return self.lagrange

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> PIDLagrangian:
        return cls(**state)
