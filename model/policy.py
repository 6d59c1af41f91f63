"""The update policy: an actor-critic over {SKIP, UPDATE_1, UPDATE_2, UPDATE_4} (docs/design.md, "Gating").

``Schedule("policy")`` asks it, at each chunk, what to do with the chunk from
the features of the chunk before (``model.gating.FEATURES``): the actor's
logits rank the chunks for the budget and pick how many gradient steps an
updated chunk takes. ``train.ppo`` trains it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTION_STEPS = (0, 1, 2, 4)  # SKIP, UPDATE_1, UPDATE_2, UPDATE_4: gradient steps per mini-batch, and so the cost


class FeatureStat(nnx.Variable):
    """A fixed statistic of the input features: saved with the model, never trained (not an ``nnx.Param``)."""


class ActorCritic(nnx.Module):
    """Features [N, n_features] -> (logits [N, n_actions], value_reward [N], value_cost [N]).

    Two trunks: one for the policy, one shared by the two critics. The policy has
    its own so that the value losses, whose scale follows the returns (nats summed
    over a document's chunks), do not shape the features the policy reads; separate
    actor and critic networks are the better default for PPO on small inputs
    (Andrychowicz et al. 2021, "What Matters in On-Policy RL"). The two critics
    predict two functions of the same state from the same signals (difficulty,
    position), so they share a trunk and differ in their last layer.

    Features are standardised inside the model by ``feature_mean`` and
    ``feature_std`` (identity until ``set_normalisation``), so a checkpoint carries
    the statistics it was trained with.
    """

    def __init__(self, n_features: int, n_actions: int = 4, hidden: int = 64, *, rngs: nnx.Rngs):
        self.feature_mean = FeatureStat(jnp.zeros((n_features,)))
        self.feature_std = FeatureStat(jnp.ones((n_features,)))
        # Orthogonal init as in the usual PPO set-up; a 0.01-scaled policy head starts the
        # policy near uniform, so early rollouts try every action.
        init = nnx.initializers.orthogonal
        linear = lambda n_in, n_out, scale: nnx.Linear(n_in, n_out, kernel_init=init(scale), rngs=rngs)
        self.policy_fc1 = linear(n_features, hidden, np.sqrt(2.0))
        self.policy_fc2 = linear(hidden, hidden, np.sqrt(2.0))
        self.policy_head = linear(hidden, n_actions, 0.01)
        self.value_fc1 = linear(n_features, hidden, np.sqrt(2.0))
        self.value_fc2 = linear(hidden, hidden, np.sqrt(2.0))
        self.value_head = linear(hidden, 2, 1.0)  # [reward, cost]

    def set_normalisation(self, mean, std, min_std: float = 1e-6) -> None:
        """Standardise inputs as ``(features - mean) / std`` from now on.

        Args:
          mean, std: [n_features] statistics of the training features; a std below
            ``min_std`` (a constant feature) is raised to it.
        """
        mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
        shape = self.feature_mean[...].shape
        if mean.shape != shape or std.shape != shape:
            raise ValueError(f"set_normalisation wants mean and std of shape {shape}, got {mean.shape} and {std.shape}")
        self.feature_mean[...] = mean
        self.feature_std[...] = jnp.maximum(std, min_std)

    def __call__(self, features):
        x = (features - self.feature_mean[...]) / self.feature_std[...]  # [N, n_features]
        h = jnp.tanh(self.policy_fc2(jnp.tanh(self.policy_fc1(x))))  # [N, hidden]
        logits = self.policy_head(h)  # [N, n_actions]
        v = jnp.tanh(self.value_fc2(jnp.tanh(self.value_fc1(x))))  # [N, hidden]
        values = self.value_head(v)  # [N, 2]
        return logits, values[:, 0], values[:, 1]
