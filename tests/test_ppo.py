"""PPO-Lagrangian pieces (train/ppo.py): GAE against a direct sum, the clipped objective's gradients,
the PID multiplier's step response, and PPO learning a toy bandit."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.train.ppo import (
    ACTION_STEPS,
    ActorCritic,
    PIDLagrangian,
    PPOBatch,
    PPOConfig,
    clipped_surrogate,
    gae,
    lagrangian_advantage,
    ppo_loss,
    ppo_optimizer,
    ppo_update,
)


def gae_by_definition(rewards, values, dones, last_value, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, the sum stopping at the step that ends the episode."""
    T, N = rewards.shape
    advantages = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            coef = 1.0
            for s in range(t, T):
                next_value = values[s + 1, n] if s + 1 < T else last_value[n]
                delta = rewards[s, n] + gamma * next_value * (1.0 - dones[s, n]) - values[s, n]
                advantages[t, n] += coef * delta
                if dones[s, n]:
                    break
                coef *= gamma * lam
    return advantages


def test_gae_matches_direct_sum_with_an_episode_ending_mid_trace():
    rng = np.random.default_rng(0)
    T, N = 7, 3
    rewards, values, last_value = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=N)
    dones = np.zeros((T, N), bool)
    dones[2, 0] = True  # column 0: an episode ends after step 2, a new one starts at 3
    dones[4, 1] = dones[6, 1] = True  # column 1: ends mid-trace and at the last step (no bootstrap)
    advantages, returns = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(dones), jnp.asarray(last_value), 0.9, 0.8)
    expected = gae_by_definition(rewards, values, dones, last_value, 0.9, 0.8)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, expected + values, rtol=1e-5, atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_monte_carlo_return_minus_value():
    rewards = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])  # [T=4, N=2]
    values = jnp.array([[0.5, 1.0], [0.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
    # Both columns end an episode after step 1; column 0 ends another at the last step, column 1 goes
    # on past the trace and bootstraps from last_value = 10.
    dones = jnp.array([[False, False], [True, True], [False, False], [True, False]])
    last_value = jnp.array([100.0, 10.0])
    advantages, returns = gae(rewards, values, dones, last_value, 1.0, 1.0)
    expected_returns = jnp.array([[3.0, 3.0], [2.0, 2.0], [7.0, 17.0], [4.0, 14.0]])
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-6)
    np.testing.assert_allclose(advantages, expected_returns - values, rtol=1e-6)


@pytest.mark.parametrize(
    "ratio, advantage, gradient",
    [
        (1.1, 2.0, -2.2),  # inside the clip range: d loss / d logp = -ratio * A, so descent raises logp
        (0.9, -2.0, 1.8),  # negative advantage inside: descent lowers logp
        (1.5, 2.0, 0.0),  # beyond 1 + eps with A > 0: the clipped term is the minimum, a constant
        (0.5, -2.0, 0.0),  # below 1 - eps with A < 0: likewise
        (0.5, 2.0, -1.0),  # below 1 - eps with A > 0: unclipped is the minimum, still pushed up
    ],
)
def test_clipped_surrogate_gradient(ratio, advantage, gradient):
    old_logp = jnp.array([-1.3])
    logp = old_logp + math.log(ratio)
    grad = jax.grad(lambda lp: clipped_surrogate(lp, old_logp, jnp.array([advantage]), 0.2)[0])(logp)
    np.testing.assert_allclose(grad, [gradient], rtol=1e-5, atol=1e-7)


def test_lagrangian_advantage_trades_reward_for_cost_and_is_standardised():
    adv_reward, adv_cost = jnp.array([3.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 1.0])
    mixed = np.array([1.0, 0.0, -2.0 / 3.0])  # (A_r - 2 A_c) / (1 + 2)
    np.testing.assert_allclose(
        lagrangian_advantage(adv_reward, adv_cost, 2.0), (mixed - mixed.mean()) / mixed.std(), rtol=1e-5
    )
    no_cost = lagrangian_advantage(adv_reward, adv_cost, 0.0)  # lagrange 0: the reward alone
    np.testing.assert_allclose(no_cost, (np.array([3.0, 0, 0]) - 1.0) / np.std([3.0, 0, 0]), rtol=1e-5)


@nnx.jit
def make_model() -> ActorCritic:
    """The one small model every test uses, initialised by one compiled program (eager, each
    initialiser's ops compile one by one, the larger part of this file's run time)."""
    return ActorCritic(2, hidden=16, rngs=nnx.Rngs(0))


@nnx.jit
def loss_batch(model, features, actions, ratios, adv_reward):
    """A batch whose old log-probabilities give the ratios asked for under ``model``."""
    logits, _, _ = model(features)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[:, None], axis=1)[:, 0]
    zeros = jnp.zeros_like(adv_reward)
    return PPOBatch(features, actions, logp - jnp.log(ratios), adv_reward, zeros, zeros, zeros)


def surrogate_loss_and_grads(model, batch):
    """``ppo_loss`` with the value and entropy terms off (clip_eps 0.2, lagrange 0), and its gradient."""
    return nnx.value_and_grad(lambda m: ppo_loss(m, batch, 0.2, 0.0, 0.0, 0.0), has_aux=True)(model)


@nnx.jit
def descend(model, batch, lr):
    """One plain gradient-descent step on the surrogate; returns the log-probabilities after it [N, A]."""
    _, grads = surrogate_loss_and_grads(model, batch)
    nnx.update(model, jax.tree.map(lambda p, g: p - lr * g, nnx.state(model, nnx.Param), grads))
    return jax.nn.log_softmax(model(batch.features)[0])


def test_ppo_loss_step_raises_logp_of_the_advantaged_action():
    model = make_model()
    features = jnp.tile(jnp.array([[0.3, -1.0]]), (2, 1))  # [2, 2] the same state twice
    actions = jnp.array([1, 3])
    batch = loss_batch(model, features, actions, jnp.ones(2), jnp.array([1.0, -1.0]))
    new_logp = descend(model, batch, 0.1)[0]  # [4]
    assert new_logp[1] > batch.old_logp[0]
    assert new_logp[3] < batch.old_logp[1]


def test_ppo_loss_has_no_surrogate_gradient_beyond_the_clip_range():
    model = make_model()
    features = jnp.array([[0.3, -1.0], [1.0, -0.5]])
    ratios = jnp.array([1.5, 0.5])  # A > 0 above 1 + eps, A < 0 below 1 - eps
    batch = loss_batch(model, features, jnp.array([2, 0]), ratios, jnp.array([1.0, -1.0]))
    (_, metrics), grads = nnx.jit(surrogate_loss_and_grads)(model, batch)
    for g in jax.tree.leaves(grads):
        np.testing.assert_array_equal(g, 0.0)
    assert float(metrics["clip_fraction"]) == 1.0
    r = np.array([1.5, 0.5])
    np.testing.assert_allclose(metrics["approx_kl"], np.mean(r - 1 - np.log(r)), rtol=1e-5)


def test_set_normalisation_standardises_inputs():
    x = jnp.array([[1.0, 5.0], [0.0, 3.0]])
    mean, std = jnp.array([0.5, 4.0]), jnp.array([2.0, 0.5])
    normalised, plain = make_model(), make_model()
    normalised.set_normalisation(mean, std)
    for a, b in zip(normalised(x), plain((x - mean) / std)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        normalised.set_normalisation(jnp.zeros(3), jnp.ones(3))


def pid(**gains) -> PIDLagrangian:
    return PIDLagrangian(**{"kp": 0.0, "ki": 0.0, "kd": 0.0, **gains})


def test_pid_multiplier_rises_while_spending_stays_above_target():
    controller = pid(kp=1.0, ki=0.5, kd=2.0)
    assert [controller.update(0.5, 0.5) for _ in range(3)] == [0.0, 0.0, 0.0]  # on budget
    # The step 0.5 -> 1.0: P = 0.5, I = 0.5 * 0.5, D = 2 * 0.5; then D is gone and I keeps growing.
    steps = [controller.update(1.0, 0.5) for _ in range(4)]
    np.testing.assert_allclose(steps, [1.75, 1.0, 1.25, 1.5])


def test_pid_proportional_and_derivative_answer_the_step_at_once():
    proportional, derivative = pid(kp=2.0), pid(kd=3.0)
    for controller in (proportional, derivative):
        controller.update(0.5, 0.5)
    assert proportional.update(0.75, 0.5) == pytest.approx(0.5)
    assert derivative.update(0.75, 0.5) == pytest.approx(0.75)
    assert derivative.update(0.75, 0.5) == 0.0  # a steady cost has no derivative


def test_pid_falls_back_to_zero_and_never_below():
    controller = pid(kp=1.0, ki=0.5, kd=2.0)
    for _ in range(5):
        controller.update(1.5, 0.5)
    assert controller.integral == pytest.approx(5.0)
    # Spending drops to 0.25 under a 0.5 budget: no derivative on a fall, the integral drains.
    falling = [controller.update(0.25, 0.5) for _ in range(25)]
    assert falling[0] == pytest.approx(-0.25 + 0.5 * 4.75)
    assert all(b <= a for a, b in itertools.pairwise(falling))
    assert min(falling) >= 0.0
    assert falling[-1] == 0.0 and controller.integral == 0.0
    # Well under budget for long, the integral does not bank credit: the next overspend counts in full.
    assert controller.update(1.0, 0.5) == pytest.approx(0.5 + 0.5 * 0.5 + 2.0 * 0.75)


def test_pid_ema_smooths_the_proportional_term_not_the_integral():
    controller = pid(kp=1.0, ki=1.0, ema=0.5)
    controller.update(0.5, 0.5)
    # smoothed cost 0.5 * 0.5 + 0.5 * 1.0 = 0.75: P = 0.25; the integral sees the raw 0.5 over target.
    assert controller.update(1.0, 0.5) == pytest.approx(0.25 + 0.5)


def test_pid_state_round_trips_through_json():
    controller = pid(kp=0.3, ki=0.1, kd=0.7, ema=0.2)
    for cost in (0.4, 0.9, 1.3):
        controller.update(cost, 0.5)
    restored = PIDLagrangian.from_dict(json.loads(json.dumps(controller.to_dict())))
    assert restored == controller
    assert restored.update(1.1, 0.5) == controller.update(1.1, 0.5)


def test_pid_rejects_negative_gains():
    with pytest.raises(ValueError, match="PIDLagrangian.ki"):
        PIDLagrangian(ki=-1.0)


@nnx.jit(static_argnums=3)
def bandit_rollout(model, features, key, config):
    """One-step episodes: the policy's actions, reward 1 for action 2 (UPDATE_2) and 0 otherwise, cost = steps."""
    n = features.shape[0]
    done, last = jnp.ones((1, n), bool), jnp.zeros(n)
    logits, value_reward, value_cost = model(features)
    actions = jax.random.categorical(key, logits)  # [N]
    old_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[:, None], axis=1)[:, 0]
    rewards = (actions == 2).astype(jnp.float32)[None]  # [T=1, N]
    costs = jnp.asarray(ACTION_STEPS, jnp.float32)[actions][None]  # [T=1, N]
    adv_r, ret_r = gae(rewards, value_reward[None], done, last, config.gamma, config.lam)
    adv_c, ret_c = gae(costs, value_cost[None], done, last, config.gamma, config.lam)
    return PPOBatch(features, actions, old_logp, adv_r[0], adv_c[0], ret_r[0], ret_c[0])


def train_bandit(lagrange: float, iterations: int = 5, n: int = 64):
    """PPO on ``bandit_rollout`` from one state; returns the final action probabilities [4] and the model."""
    config = PPOConfig(lr=1e-2, epochs=4, minibatches=4, entropy_coef=0.0)
    model = make_model()
    model.set_normalisation(jnp.array([0.5, 0.0]), jnp.array([2.0, 1.0]))
    optimizer = ppo_optimizer(model, config)
    features = jnp.tile(jnp.array([[1.0, 0.5]]), (n, 1))  # [N, 2] the one state
    key = jax.random.key(0)
    for _ in range(iterations):
        key, sample, shuffle = jax.random.split(key, 3)
        batch = bandit_rollout(model, features, sample, config)
        metrics = ppo_update(model, optimizer, batch, shuffle, lagrange, config)
    assert set(metrics) >= {"loss", "approx_kl", "clip_fraction", "entropy", "grad_norm"}
    return jax.nn.softmax(model(features[:1])[0][0]), model


def test_ppo_update_learns_the_rewarded_action_of_a_bandit():
    start = jax.nn.softmax(make_model()(jnp.array([[1.0, 0.5]]))[0][0])
    probs, model = train_bandit(lagrange=0.0)
    assert float(start[2]) < 0.3
    assert float(probs[2]) > 0.9
    # The feature statistics are buffers, not parameters: the optimiser leaves them alone.
    np.testing.assert_array_equal(model.feature_mean[...], [0.5, 0.0])
    np.testing.assert_array_equal(model.feature_std[...], [2.0, 1.0])


def test_ppo_update_under_a_heavy_multiplier_learns_to_skip():
    probs, _ = train_bandit(lagrange=10.0)  # A ~ (r - 10 c) / 11: UPDATE_2's reward does not pay its cost
    assert float(probs[0]) > 0.9


def test_ppo_update_refuses_a_batch_that_does_not_split_into_minibatches():
    config = PPOConfig(minibatches=4)
    model = make_model()
    rows = jnp.zeros(6)
    batch = PPOBatch(jnp.zeros((6, 2)), rows.astype(jnp.int32), rows, rows, rows, rows, rows)
    with pytest.raises(ValueError, match="minibatches=4"):
        ppo_update(model, ppo_optimizer(model, config), batch, jax.random.key(0), 0.0, config)
