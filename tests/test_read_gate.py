"""LoRA's read gate (model.read_gate): lam of a chunk's update chosen from the chunk just read.

Decoding chooses what the full forward chooses, the gate's sign means
update or skip, a budget holds its rate per row, and a checkpoint without a
gate refuses the schedules that need one.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.gating import Schedule
from ponder.model.gpt2 import KVCache
from ponder.model.lora import LoRAConfig, LoRALM, LoRALMConfig
from ponder.model.read_gate import READ_FEATURES

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=512, n_embd=64, n_layer=2, n_head=2)
C = 8


def gated_model(bias=0.0, seed=1, gate=True):
    """A LoRA model whose gate has random output weights (a score that varies from chunk to chunk) plus ``bias``."""
    config = LoRALMConfig(BASE, LoRAConfig(layers=1, rank=4, chunk=C, lr=2.0, clip=0.5), eot_id=None,
                          gate=LoRALMConfig.read_gate(C) if gate else None)
    model = LoRALM(config, rngs=nnx.Rngs(0))
    if gate:
        model.gate.out.kernel[...] = jax.random.normal(jax.random.key(seed), model.gate.out.kernel.shape)
        model.gate.out.bias[...] = jnp.full(model.gate.out.bias.shape, bias)
    return model


def text(B, T, seed=3):
    """Rows of a repeating random text with a new stretch in the middle (so chunks differ in how new they are)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        pattern = rng.integers(1, BASE.vocab_size, 20)
        row = np.resize(pattern, T)
        row[T // 3: T // 2] = rng.integers(1, BASE.vocab_size, T // 2 - T // 3)
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T))


def forward(model, tokens, positions, schedule, features=False, **kwargs):
    return nnx.jit(lambda m, t, p, kw: m(t, p, schedule, features=features, **kw))(model, tokens, positions, kwargs)


def decode(model, tokens, positions, schedule, state=None):
    step = nnx.jit(lambda m, t, p, c, s: m.step(t, p, c, s, schedule))
    B = tokens.shape[0]
    cache, state, logits, lams = KVCache.init(BASE, B), state or model.init_state(B, schedule), [], []
    for t in range(tokens.shape[1]):
        out, cache, state = step(model, tokens[:, t], positions[:, t], cache, state)
        logits.append(out)
        if t % C == C - 1:
            lams.append(state.lam)
    return jnp.stack(logits, 1), jnp.stack(lams, 1), state


@pytest.mark.parametrize("kind", ["learned", "learned_budget"])
def test_decoding_chooses_and_predicts_what_the_full_forward_does(kind):
    model = gated_model()
    tokens, positions = text(2, 12 * C)
    # The score's median along UPDATE_1 moved to 0, so that ``learned`` both updates and skips.
    features = forward(model, tokens, positions, Schedule("update"), features=True).features
    model.gate.out.bias[...] -= jnp.median(model.gate.score(features.reshape(-1, len(READ_FEATURES))))
    schedule = Schedule(kind, rate=0.5)
    full = forward(model, tokens, positions, schedule)
    lam = np.asarray(full.chunk_lambda)
    assert 0 < lam.sum() < lam.size  # some chunks update and some skip: the choice is exercised
    logits, lams, state = decode(model, tokens, positions, schedule)
    np.testing.assert_array_equal(lams, lam)
    np.testing.assert_allclose(logits, full.logits, atol=2e-4)
    for a, b in zip(jax.tree.leaves(state.read), jax.tree.leaves(full.state.read)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert full.features.shape == (2, 12, len(READ_FEATURES)) and bool(jnp.all(jnp.isfinite(full.features)))


def test_the_gates_sign_is_update_or_skip():
    """``learned`` updates where the score is above 0: a gate far below is SKIP, far above is UPDATE_1."""
    tokens, positions = text(1, 6 * C)
    low, high = gated_model(bias=-1e3), gated_model(bias=1e3)
    for model, same in ((low, Schedule("skip")), (high, Schedule("update"))):
        got = forward(model, tokens, positions, Schedule("learned"))
        np.testing.assert_allclose(got.logits, forward(model, tokens, positions, same).logits, atol=1e-5)
        np.testing.assert_array_equal(got.chunk_lambda, forward(model, tokens, positions, same).chunk_lambda)


def test_a_budget_holds_each_rows_rate():
    model = gated_model()
    tokens, positions = text(3, 32 * C)
    schedule = Schedule("learned_budget")
    state = LoRALM.with_target(model.init_state(3, schedule), jnp.asarray([0.0, 0.25, 1.0]))
    lam = np.asarray(forward(model, tokens, positions, schedule, state=state).chunk_lambda)
    assert lam[0].sum() == 0 and lam[2].sum() == 32
    assert abs(lam[1].mean() - 0.25) <= 2 / 32
    # A document boundary keeps the row's budget: it belongs to the session.
    reset = model.reset(state, jnp.asarray([True, True, False]))
    np.testing.assert_array_equal(reset.read.target, [0.0, 0.25, 1.0])


def test_features_start_afresh_with_each_packed_document():
    model = gated_model()
    a, _ = text(1, 4 * C, seed=4)
    b, _ = text(1, 4 * C, seed=5)
    positions = jnp.tile(jnp.arange(4 * C), 2)[None]
    segments = jnp.repeat(jnp.arange(2), 4 * C)[None]
    schedule = Schedule("learned_budget")
    packed = forward(model, jnp.concatenate([a, b], 1), positions, schedule, segment_ids=segments)
    alone = forward(model, b, positions[:, :4 * C], schedule)
    np.testing.assert_allclose(packed.features[:, 4:], alone.features, atol=1e-5)
    np.testing.assert_array_equal(packed.chunk_lambda[:, 4:], alone.chunk_lambda)


def test_a_checkpoint_without_a_gate_refuses_the_learned_schedules():
    model = gated_model(gate=False)
    tokens, positions = text(1, 2 * C)
    with pytest.raises(ValueError, match="needs a gate.*ponder train gate"):
        forward(model, tokens, positions, Schedule("learned"))
    assert forward(model, tokens, positions, Schedule("update"), features=True).features.shape == (1, 2, len(READ_FEATURES))
