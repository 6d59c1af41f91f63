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



def _trained_looking(model):
    """Random (non-zero) TTT parameters, so the TTT path changes the logits."""
    ttt_state = nnx.state(model.ttt)
    leaves, treedef = jax.tree.flatten(ttt_state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model.ttt, jax.tree.unflatten(treedef, noisy))
    return model


def test_token_by_token_decoding_equals_full_forward():
    from model.gpt2 import KVCache

    model = _trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0)))
    tokens, positions, lam = _batch()
    full, final_states = model(tokens, positions, lam)
    base_logits, _, _ = model.base(tokens, positions)
    assert not np.allclose(np.asarray(full), np.asarray(base_logits))  # the TTT path is live
    cache, states = KVCache.init(BASE, 2), model.init_states(2)
    lam_tokens = jnp.repeat(lam, CONFIG.ttt.mini_batch, axis=1)
    step = nnx.jit(lambda model, *args: model.step(*args))
    for t in range(tokens.shape[1]):  # every offset inside three mini-batches
        logits, cache, states = step(model, tokens[:, t], positions[:, t], cache, states, lam_tokens[:, t])
        assert np.abs(np.asarray(logits) - np.asarray(full[:, t])).max() <= 1e-5, t
    assert np.abs(np.asarray(states[1].W) - np.asarray(final_states[1].W)).max() <= 1e-5
