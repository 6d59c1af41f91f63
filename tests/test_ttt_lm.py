"""The TTT language model on top of the frozen base."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import GPTConfig
from model.ttt import TTTConfig
from model.ttt_lm import TTTLMConfig, TTTTransformerLM

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=64, n_embd=64, n_layer=2, n_head=2)
CONFIG = TTTLMConfig(base=BASE, ttt=TTTConfig(width=64, n_head=4), n_ttt_layers=2)


def _batch():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 48)))
    return tokens, jnp.broadcast_to(jnp.arange(48), (2, 48)), jnp.full((2, 3), 1.5)


def test_fresh_ttt_model_predicts_exactly_like_the_base():
    model = TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))
    tokens, positions, lam = _batch()
    logits, states = model(tokens, positions, lam)
    base_logits, _, _ = model.base(tokens, positions)
    assert np.array_equal(np.asarray(logits), np.asarray(base_logits))
    assert len(states) == 2 and int(states[0].count[0]) == 48


def test_base_is_frozen_and_ttt_is_trained():
    model = TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))
    tokens, positions, lam = _batch()

    def loss(model):
        logits, _ = model(tokens, positions, lam)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), tokens[:, 1:, None], -1).mean()

    grads = nnx.grad(loss)(model)
    base_grads = nnx.to_pure_dict(nnx.state(grads.base))
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(base_grads))
    # The zero output projection is the first thing to learn.
    assert np.asarray(grads.ttt[0].wo.kernel[...]).any()

