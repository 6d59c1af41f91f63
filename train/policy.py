"""Training the update policy with PPO-Lagrangian on chunk traces (``ponder train policy``).

One iteration:

1. **Rollout.** A batch of training rows (documents packed on chunk
   boundaries, base attention in windows as in stage 2) runs under
   ``Schedule("policy", explore=True)``: at each chunk the policy samples an
   action (SKIP, UPDATE_1, UPDATE_2, UPDATE_4) from the features of the chunk
   before. The same rows also run with every chunk skipped.
2. **Rewards and costs.** A chunk's reward is its CE gain over the skipped
   run (nats/token; subtracting the skipped run, which no action changes,
   removes most of the variance of raw CE between chunks); its cost is the
   gradient steps it took. An episode is a document: the trace ends at each
   document boundary and at the row's end.
3. **PPO.** GAE on rewards and on costs, then clipped-surrogate epochs on the
   Lagrangian advantage (``train.ppo``); the PID controller then moves the
   multiplier from the measured mean cost per chunk against the budget.

The policy, its feature statistics and the controller's state are saved with
the run (``final/`` is a checkpoint that ``ponder serve --schedule policy``
loads). The TTT layer and the base stay frozen.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponder.model import checkpoint
from ponder.model.gating import N_FEATURES, Schedule
from ponder.model.policy import ACTION_STEPS, ActorCritic
from ponder.model.ttt_lm import TTTTransformerLM
from ponder.train.corpus import TokenFile
from ponder.train.data import Batch, DataState, Packer
from ponder.train.ppo import PIDLagrangian, PPOBatch, PPOConfig, gae, ppo_optimizer, ppo_update
from ponder.train.stages import TTTStage, _chunk_losses
from ponder.train.trainer import RunLog


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Attributes:
    iterations: PPO iterations (one rollout batch each).
    batch_size, seq_len, window: rollout rows, tokens per row, base attention window.
    budget: the target mean cost per chunk (gradient steps; UPDATE_1 on every chunk costs 1).
    hidden: width of the actor and critic trunks.
    seed: data order and action sampling.
    save_every: iterations between exports of ``final/``.
    """

    iterations: int = 200
    batch_size: int = 4
    seq_len: int = 2048
    window: int = 1024
    budget: float = 0.5
    hidden: int = 64
    seed: int = 0
    save_every: int = 25


def attach_policy(model: TTTTransformerLM, hidden: int, seed: int) -> TTTTransformerLM:
    """``model`` with a fresh policy network (its config records the width, so checkpoints rebuild it)."""
    model.config = dataclasses.replace(model.config, policy_hidden=hidden)
    model.policy = nnx.data(ActorCritic(N_FEATURES, len(ACTION_STEPS), hidden, rngs=nnx.Rngs(seed)))
    return model


@nnx.jit(static_argnums=(2, 3))
def rollout(model, batch: Batch, stage: TTTStage, seed: int, target):
    """Per chunk of each row: features, action index, reward, cost, whether its episode ends after it, and
    whether it counts (has a scored token)."""
    positions, attention = stage.attention(batch)
    run = lambda schedule: model(batch.tokens, positions, schedule, segment_ids=batch.segment_ids,
                                 attention_ids=attention, target=target)
    acted = run(Schedule("policy", explore=True, seed=seed))
    skipped = run(Schedule("skip"))
    ce, weight = _chunk_losses(acted.logits, batch, stage.chunk)
    skip_ce, _ = _chunk_losses(skipped.logits, batch, stage.chunk)
    steps = acted.chunk_steps  # [B, n]
    action = jnp.searchsorted(jnp.asarray(ACTION_STEPS), steps)
    C = stage.chunk
    # An episode (a document) ends after a chunk when the next one opens another document, and at the row's end.
    ends = jnp.pad(batch.segment_ids[:, C::C] != batch.segment_ids[:, :-C:C], ((0, 0), (0, 1)), constant_values=True)
    return acted.chunk_features, action, skip_ce - ce, steps.astype(jnp.float32), ends, weight > 0


def train_policy(model: TTTTransformerLM, corpus_dir, run_dir, config: PolicyConfig, ppo: PPOConfig = PPOConfig(),
                 tokenizer=None, log_every: int = 1) -> Path:
    """Trains a fresh ``model.policy`` in place; exports ``run_dir/final``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    attach_policy(model, config.hidden, config.seed)
    stage = TTTStage(seq_len=config.seq_len, chunk=model.config.gate.chunk, window=config.window)
    packer = Packer(TokenFile(corpus_dir, "train"), config.batch_size, config.seq_len, align=stage.align,
                    seed=config.seed, pad_id=model.config.eot_id or 0)
    optimizer = ppo_optimizer(model.policy, ppo)
    pid = PIDLagrangian()
    log = RunLog(run_dir / "log.jsonl")
    (run_dir / "policy_config.json").write_text(json.dumps(
        {"policy": dataclasses.asdict(config), "ppo": dataclasses.asdict(ppo), "corpus": str(corpus_dir)}, indent=2) + "\n")
    data_state, key = DataState(), jax.random.key(config.seed)
    target = jnp.full((config.batch_size,), config.budget, jnp.float32)
    export = lambda: checkpoint.save(run_dir / "final", model, tokenizer, overwrite=True)
    for iteration in range(1, config.iterations + 1):
        batch, data_state = packer.next(data_state)
        batch = Batch(*map(jnp.asarray, batch))
        features, action, reward, cost, ends, valid = rollout(model, batch, stage, config.seed * 100_003 + iteration, target)
        if iteration == 1:  # the features' scale, fixed from the first rollout
            flat = np.asarray(features).reshape(-1, N_FEATURES)
            # A floor on the spread: a feature constant here (the target rate) must not blow up where it differs.
            model.policy.set_normalisation(flat.mean(0), flat.std(0), min_std=0.1)
        B, n = action.shape
        _, value_r, value_c = model.policy(features.reshape(B * n, -1))
        value_r, value_c = value_r.reshape(B, n), value_c.reshape(B, n)
        # Time-major traces for GAE.
        tm = lambda a: jnp.where(valid, a, 0.0).T
        adv_r, ret_r = gae(tm(reward), value_r.T, ends.T, jnp.zeros((B,)), ppo.gamma, ppo.lam)
        adv_c, ret_c = gae(tm(cost), value_c.T, ends.T, jnp.zeros((B,)), ppo.gamma, ppo.lam)
        flat = lambda a: a.T.reshape(-1)  # time-major [n, B] -> [B * n], rows as the features are
        logits, _, _ = model.policy(features.reshape(B * n, -1))
        logp = jax.nn.log_softmax(logits)[jnp.arange(B * n), action.reshape(-1)]
        keep = np.flatnonzero(np.asarray(valid).reshape(-1))
        keep = keep[: len(keep) // ppo.minibatches * ppo.minibatches]  # whole minibatches
        data = PPOBatch(
            features=features.reshape(B * n, -1)[keep], actions=action.reshape(-1)[keep], old_logp=logp[keep],
            adv_reward=flat(adv_r)[keep], adv_cost=flat(adv_c)[keep], ret_reward=flat(ret_r)[keep], ret_cost=flat(ret_c)[keep],
        )
        key, update_key = jax.random.split(key)
        measured = float(np.asarray(cost)[np.asarray(valid)].mean())
        metrics = ppo_update(model.policy, optimizer, data, update_key, pid.lagrange, ppo)
        lagrange = pid.update(measured, config.budget)
        if iteration % log_every == 0 or iteration == config.iterations:
            actions = np.bincount(np.asarray(action)[np.asarray(valid)], minlength=len(ACTION_STEPS))
            log.write(iteration=iteration, cost=measured, budget=config.budget, lagrange=lagrange,
                      gain=float(np.asarray(reward)[np.asarray(valid)].mean()),
                      actions=(actions / max(actions.sum(), 1)).round(3).tolist(), **metrics)
        if iteration % config.save_every == 0:
            export()
            (run_dir / "pid.json").write_text(json.dumps({"iteration": iteration, **pid.to_dict()}) + "\n")
    final = export()
    (run_dir / "pid.json").write_text(json.dumps({"iteration": config.iterations, **pid.to_dict()}) + "\n")
    return final
