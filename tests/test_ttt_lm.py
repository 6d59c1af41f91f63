"""The TTT language model on top of the frozen base."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.gating import N_FEATURES, GateConfig, Schedule
from ponder.model.ttt import TTTConfig
from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=256, n_embd=64, n_layer=2, n_head=2)
CONFIG = TTTLMConfig(base=BASE, ttt=TTTConfig(width=64, n_head=4), n_ttt_layers=2, gate=GateConfig(chunk=16),
                     policy_hidden=16)
FIXED = Schedule("fixed", value=1.5)


def _batch(T=48):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, T)))
    return tokens, jnp.broadcast_to(jnp.arange(T), (2, T))


def test_fresh_ttt_model_predicts_exactly_like_the_base():
    model = TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))
    tokens, positions = _batch()
    out = model(tokens, positions, FIXED)
    base_logits, _, _ = model.base(tokens, positions)
    assert np.array_equal(np.asarray(out.logits), np.asarray(base_logits))
    assert len(out.state.ttt) == 2 and int(out.state.count[0]) == 48


def test_base_is_frozen_and_ttt_is_trained():
    model = TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))
    tokens, positions = _batch()

    def loss(model):
        logits = model(tokens, positions, FIXED).logits
        return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), tokens[:, 1:, None], -1).mean()

    grads = nnx.grad(loss)(model)
    base_grads = nnx.to_pure_dict(nnx.state(grads.base))
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(base_grads))
    # The zero output projection is the first thing to learn.
    assert np.asarray(grads.ttt[0].wo.kernel[...]).any()



def _perturb(module, scale, seed):
    """Adds Gaussian noise to every parameter of ``module`` in place."""
    leaves, treedef = jax.tree.flatten(nnx.state(module))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def _trained_looking(model):
    """Random (non-zero) TTT parameters, so the TTT path changes the logits."""
    _perturb(model.ttt, 0.1, seed=7)
    for layer in model.ttt:  # every tau_i > 0: tau_{K-1} = 0 would zero the end-of-mini-batch update
        layer.tau_offset[...] = jnp.abs(layer.tau_offset[...])
    return model


def _close(got, want, tol=1e-5):
    """Every leaf of two pytrees within ``tol``."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() <= tol


def _decode(model, tokens, positions, schedule, cache=None, state=None):
    """Feeds ``tokens`` [B, T] one step at a time; returns logits [B, T, V], lam and steps per token
    (``{"lam": [B, T], "steps": [B, T]}``), cache, state."""
    from ponder.model.gpt2 import KVCache

    B = tokens.shape[0]
    cache = KVCache.init(model.config.base, B) if cache is None else cache
    state = model.init_state(B, schedule) if state is None else state
    step = nnx.jit(lambda model, *args: model.step(*args, schedule))
    logits, lams, steps = [], [], []
    for t in range(tokens.shape[1]):
        out, cache, state = step(model, tokens[:, t], positions[:, t], cache, state)
        logits.append(np.asarray(out))
        lams.append(np.asarray(state.lam))
        steps.append(np.asarray(state.steps))
    return np.stack(logits, 1), {"lam": np.stack(lams, 1), "steps": np.stack(steps, 1)}, cache, state


@pytest.mark.parametrize("schedule", [
    FIXED, Schedule("learned"), Schedule("threshold", rate=0.5, initial_threshold=9.0, gain=2.0),
    Schedule("learned_budget", rate=0.5), Schedule("random_learned", rate=0.5, seed=1), Schedule("update", steps=2),
    Schedule("policy", rate=0.5), Schedule("policy", explore=True, seed=1),
])
def test_token_by_token_decoding_equals_full_forward(schedule):
    """Every offset inside mini-batches and chunks; lam per chunk and the gating history too."""
    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    tokens, positions = _batch(64)
    out = model(tokens, positions, schedule)
    base_logits, _, _ = model.base(tokens, positions)
    assert not np.allclose(np.asarray(out.logits), np.asarray(base_logits))  # the TTT path is live
    logits, per_token, _, state = _decode(model, tokens, positions, schedule)
    assert np.abs(logits - np.asarray(out.logits)).max() <= 1e-5
    C = CONFIG.gate.chunk
    assert np.abs(per_token["lam"][:, ::C] - np.asarray(out.chunk_lambda)).max() <= 1e-6
    np.testing.assert_array_equal(per_token["steps"][:, ::C], out.chunk_steps)
    _close((state.ttt, state.history), (out.state.ttt, out.state.history))
    if schedule.kind == "update":
        assert (np.asarray(out.chunk_steps) == schedule.steps).all()
    elif schedule.kind == "policy":  # some chunks skip, others take the policy's steps
        assert 0 in np.asarray(out.chunk_steps) and np.asarray(out.chunk_steps).max() > 0
    elif schedule.kind != "fixed":
        assert len(np.unique(np.asarray(out.chunk_lambda))) > 1  # the schedule really varies lam


def test_prefill_then_decode_then_prefill_equals_one_forward():
    """A session's path: whole chunks, a few tokens, then whole chunks again from the state."""
    from ponder.model.gpt2 import KVCache

    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    tokens, positions = _batch(64)
    full = model(tokens, positions)
    first = model(tokens[:, :16], positions[:, :16], cache=KVCache.init(BASE, 2))
    assert np.abs(np.asarray(first.logits) - np.asarray(full.logits[:, :16])).max() <= 1e-5
    logits, _, cache, state = _decode(model, tokens[:, 16:32], positions[:, 16:32], Schedule(), first.cache, first.state)
    assert np.abs(logits - np.asarray(full.logits[:, 16:32])).max() <= 1e-5
    rest = model(tokens[:, 32:], positions[:, 32:], state=state, cache=cache)
    assert np.abs(np.asarray(rest.logits) - np.asarray(full.logits[:, 32:])).max() <= 1e-5
    assert np.abs(np.asarray(rest.chunk_lambda) - np.asarray(full.chunk_lambda[:, 2:])).max() <= 1e-6
    _close((rest.state.ttt, rest.state.history), (full.state.ttt, full.state.history))


def test_decode_skip_does_no_update_work():
    """A skipped chunk's decode step traces no gradient: fewer matmuls than an updating one."""
    model = _trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0)))
    layer, state, x = model.ttt[0], model.ttt[0].init_state(2), jnp.ones((2, 64))
    lam = jnp.ones((2,))
    skip = str(jax.make_jaxpr(lambda x: layer.step(state, x, lam, update=False))(x))
    update = str(jax.make_jaxpr(lambda x: layer.step(state, x, lam, update=True))(x))
    assert skip.count("dot_general") < update.count("dot_general")
    y_skip, _ = layer.step(state, x, lam, update=False)
    y_zero, _ = layer.step(state, x, jnp.zeros((2,)), update=True)
    assert np.abs(np.asarray(y_skip) - np.asarray(y_zero)).max() <= 1e-6


def _with_random_gate(model):
    """A gate whose scores straddle 0, so a value gate updates some chunks and skips others."""
    _perturb(model.gate, 0.1, seed=3)
    model.gate.out.bias[...] = jnp.zeros_like(model.gate.out.bias[...])
    head = model.policy.policy_head.kernel  # and a policy that does not start uniform
    head[...] = jax.random.normal(jax.random.key(5), head.shape)
    return model


def test_learned_gate_is_causal():
    """Changing tokens at positions >= t changes no logit before t and no lam (nor the features it came
    from) of a chunk starting at or before t."""
    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    tokens, positions = _batch()
    tokens = jnp.concatenate([tokens, tokens[:, :16]], axis=1)  # 64 tokens: 4 chunks
    positions = jnp.broadcast_to(jnp.arange(64), tokens.shape)
    forward = nnx.jit(lambda model, t: model(t, positions))
    base = forward(model, tokens)
    assert len(np.unique(np.asarray(base.chunk_lambda))) == 2  # the gate really varies: some chunks skip
    assert len(np.unique(np.asarray(base.chunk_features[:, 1:, 0]))) > 2  # ... and so do its features
    for t in (5, 16, 33):
        changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % 512)
        out = forward(model, changed)
        assert np.array_equal(np.asarray(out.logits[:, :t]), np.asarray(base.logits[:, :t])), t
        decided = t // CONFIG.gate.chunk + 1  # chunks 0..t//C start at or before t
        assert np.array_equal(np.asarray(out.chunk_lambda[:, :decided]), np.asarray(base.chunk_lambda[:, :decided]))
        np.testing.assert_array_equal(out.chunk_features[:, :decided], base.chunk_features[:, :decided])
        assert not np.allclose(np.asarray(out.logits[:, t:]), np.asarray(base.logits[:, t:]))


def test_skip_equals_zero_learning_rate_and_does_no_update_work():
    model = _trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0)))
    tokens, positions = _batch()
    skipped = model(tokens, positions, Schedule("skip"))
    assert not np.asarray(skipped.chunk_updated).any() and not np.asarray(skipped.ttt_flops).any()
    # The same slow weights with eta = 0 (base_lr 0), through the update path.
    frozen_config = dataclasses.replace(CONFIG, ttt=dataclasses.replace(CONFIG.ttt, base_lr=0.0))
    eta_zero = TTTTransformerLM(frozen_config, rngs=nnx.Rngs(0))
    nnx.update(eta_zero, nnx.state(model))
    updated = eta_zero(tokens, positions, Schedule("update"))
    assert np.asarray(updated.chunk_updated).all()
    assert np.abs(np.asarray(updated.logits) - np.asarray(skipped.logits)).max() <= 1e-5
    per_chunk = model.ttt[0].update_flops(CONFIG.gate.chunk) * CONFIG.n_ttt_layers
    assert np.array_equal(np.asarray(updated.ttt_flops), [3 * per_chunk] * 2)
    # The skip branch traces no mini-batch scan and no gradient: no update work is in it.
    layer, x = model.ttt[0], jnp.ones((2, 16, 64))
    skip_jaxpr = str(jax.make_jaxpr(lambda x: layer.chunk(x, jnp.ones((2, 1)), update=False))(x))
    update_jaxpr = str(jax.make_jaxpr(lambda x: layer.chunk(x, jnp.ones((2, 1)), update=True))(x))
    assert "scan" in update_jaxpr and "scan" not in skip_jaxpr
    assert skip_jaxpr.count("dot_general") < update_jaxpr.count("dot_general")


def test_fixed_schedules():
    model = _trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0)))
    tokens, positions = _batch()
    tokens = jnp.tile(tokens, (1, 4))  # 192 tokens, 12 chunks
    positions = jnp.broadcast_to(jnp.arange(192), tokens.shape)
    random = model(tokens, positions, Schedule("random", rate=0.5, seed=1))
    updated = np.asarray(random.chunk_updated)
    assert 0 < updated.mean() < 1 and set(np.unique(np.asarray(random.chunk_lambda))) <= {0.0, 1.0}
    assert np.array_equal(np.asarray(random.ttt_flops), updated.sum(1) * model.ttt[0].update_flops(16) * 2)
    fixed = model(tokens, positions, Schedule("fixed", value=2.5))
    assert np.allclose(np.asarray(fixed.chunk_lambda), 2.5)
    tiny = model(tokens, positions, Schedule("fixed", value=0.01))  # below the 0.05 threshold: skipped
    assert not np.asarray(tiny.chunk_updated).any()
    given = model(tokens, positions, chunk_lambda=fixed.chunk_lambda)  # lam chosen outside (ORACLE)
    assert np.array_equal(np.asarray(given.logits), np.asarray(fixed.logits))
    # UPDATE_2: a second step on each mini-batch moves only the weights carried forward.
    one, two = model(tokens, positions, Schedule("update")), model(tokens, positions, Schedule("update", steps=2))
    K = CONFIG.ttt.mini_batch
    assert np.abs(np.asarray(one.logits[:, :K]) - np.asarray(two.logits[:, :K])).max() <= 1e-6  # both see W0
    assert not np.allclose(np.asarray(one.logits[:, K:]), np.asarray(two.logits[:, K:]), atol=1e-4)
    assert (np.asarray(two.ttt_flops) > np.asarray(one.ttt_flops)).all()
    gated = model(tokens, positions, Schedule("threshold", rate=0.5))
    assert np.asarray(gated.chunk_updated)[:, 0].all()  # the first chunk always updates


def test_learned_gate_under_a_budget():
    """learned_budget: the chunks the gate scores highest among recent ones, as many as the target rate allows."""
    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    tokens, positions = _batch()
    tokens = jnp.tile(tokens, (1, 4))  # 192 tokens, 12 chunks
    positions = jnp.broadcast_to(jnp.arange(192), tokens.shape)
    everything = model(tokens, positions, Schedule("learned_budget", rate=1.0))
    assert np.asarray(everything.chunk_updated).all() and (np.asarray(everything.chunk_lambda) == 1.0).all()
    assert not np.asarray(model(tokens, positions, Schedule("learned_budget", rate=0.0)).chunk_updated).any()
    half = model(tokens, positions, Schedule("learned_budget", rate=0.5))
    updated = np.asarray(half.chunk_updated)
    assert updated[:, 0].all() and 0.3 < updated.mean() < 0.7
    # The chunks it takes are the ones the gate scores higher.
    scores = np.asarray(model.gate.score(half.chunk_features.reshape(-1, half.chunk_features.shape[-1])))
    scores, taken = scores.reshape(updated.shape)[:, 1:], updated[:, 1:]
    assert scores[taken].mean() > scores[~taken].mean()
    # A per-row budget in the state overrides the schedule's rate.
    state = model.with_target(model.init_state(2, Schedule("learned_budget")), jnp.array([0.0, 1.0]))
    rows = np.asarray(model(tokens, positions, Schedule("learned_budget"), state=state).chunk_updated)
    assert not rows[0].any() and rows[1].all()
    # random_learned at rate 1 is the learned gate; below 1 it updates only where RANDOM's coin says so.
    learned = model(tokens, positions, Schedule("learned"))
    assert np.array_equal(np.asarray(model(tokens, positions, Schedule("random_learned", rate=1.0)).logits),
                          np.asarray(learned.logits))
    coin = np.asarray(model(tokens, positions, Schedule("random", rate=0.5, seed=2)).chunk_updated)
    mixed = np.asarray(model(tokens, positions, Schedule("random_learned", rate=0.5, seed=2)).chunk_updated)
    assert not (mixed & ~coin).any() and not (mixed & ~np.asarray(learned.chunk_updated)).any()


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("kind", ["learned_budget", "threshold"])
def test_budget_holds_the_update_rate_over_a_long_document(kind, rate):
    """Realised update rate within 5 points of the target over 128 chunks, read window by window."""
    from ponder.model.document import run_document

    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    document = np.random.default_rng(4).integers(0, BASE.vocab_size, 128 * CONFIG.gate.chunk).astype(np.int32)
    run = run_document(model, document, Schedule(kind, rate=rate, initial_threshold=1.0), window=BASE.n_positions)
    assert abs(run.chunk_updated.mean() - rate) <= 0.05


def test_end_of_document_token_resets_the_decode_state():
    """Document B decodes the same after document A in the same state as on its own."""

    eot = 0
    config = dataclasses.replace(CONFIG, eot_id=eot)
    model = _trained_looking(TTTTransformerLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(4)
    doc_a = [eot, *rng.integers(1, 512, 20).tolist()]
    doc_b = [eot, *rng.integers(1, 512, 20).tolist()]
    def decode(model, docs):
        tokens = jnp.asarray([sum(docs, [])])
        positions = jnp.asarray([[p for doc in docs for p in range(len(doc))]])  # restart with every document
        logits, _, _, state = _decode(model, tokens, positions, FIXED)
        return logits[0], state.ttt

    after_a, states_after = decode(model, [doc_a, doc_b])
    alone, states_alone = decode(model, [doc_b])
    assert np.abs(after_a[len(doc_a) :] - alone).max() <= 1e-5
    assert np.abs(np.asarray(states_after[0].W[0]) - np.asarray(states_alone[0].W[0])).max() <= 1e-5
    # The same weights without a boundary token id: A's fast weights carry over into B.
    no_boundary = TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))
    nnx.update(no_boundary, nnx.state(model))
    carried, _ = decode(no_boundary, [doc_a, doc_b])
    assert np.abs(carried[: len(doc_a)] - after_a[: len(doc_a)]).max() <= 1e-5
    assert not np.allclose(carried[len(doc_a) :], alone, atol=1e-3)


def test_packed_documents_do_not_see_each_other():
    """Document B's logits and lam are the same after document A in one packed row as on their own."""
    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(5)
    doc_a, doc_b = rng.integers(0, 512, 32), rng.integers(0, 512, 48)  # whole chunks of 16
    packed = jnp.asarray(np.concatenate([doc_a, doc_b]))[None]
    positions = jnp.asarray(np.concatenate([np.arange(32), np.arange(48)]))[None]
    segments = jnp.asarray(np.repeat([0, 1], [32, 48]))[None]
    together = model(packed, positions, segment_ids=segments)
    alone = model(jnp.asarray(doc_b)[None], jnp.arange(48)[None])
    assert np.abs(np.asarray(together.logits[:, 32:]) - np.asarray(alone.logits)).max() <= 1e-5
    assert np.abs(np.asarray(together.chunk_lambda[:, 2:]) - np.asarray(alone.chunk_lambda)).max() <= 1e-6
    for got, want in zip(jax.tree.leaves(together.state), jax.tree.leaves(alone.state)):
        assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() <= 1e-5
    # Without segment ids, A's context does reach B.
    unsegmented = model(packed, positions)
    assert not np.allclose(np.asarray(unsegmented.logits[:, 32:]), np.asarray(alone.logits), atol=1e-3)


@pytest.mark.parametrize("schedule", [FIXED, Schedule("learned"), Schedule("policy", rate=0.5)])
def test_extend_equals_token_by_token_decoding(schedule):
    """extend (base in one call, TTT scanned) from mid-chunk offsets, with right-padded rows."""

    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    tokens, positions = _batch(64)
    start, T = 10, 32  # from inside a chunk, across a chunk boundary
    want, _, _, want_state = _decode(model, tokens[:, : start + 25], positions[:, : start + 25], schedule)
    _, _, cache, state = _decode(model, tokens[:, :start], positions[:, :start], schedule)
    length = jnp.asarray([25, 25])
    extend = nnx.jit(lambda model, *args: model.extend(*args, schedule))
    logits, _, state = extend(model, tokens[:, start : start + T], positions[:, start : start + T], length, cache, state)
    assert np.abs(np.asarray(logits) - want[:, -1]).max() <= 1e-5
    _close((state.ttt, state.history, state.lam), (want_state.ttt, want_state.history, want_state.lam))


@pytest.mark.parametrize("output", ["value", "clip", "sigmoid"])
def test_gate_output_starts_at_one_and_stays_in_range(output):
    from ponder.model.gating import GatingNetwork

    config = GateConfig(output=output)
    gate = GatingNetwork(config, rngs=nnx.Rngs(0))
    features = jax.random.normal(jax.random.key(0), (64, N_FEATURES)) * 3
    np.testing.assert_allclose(gate(features), 1.0, rtol=1e-6)  # untrained: UPDATE_1
    gate.out.kernel[...] = jax.random.normal(jax.random.key(1), gate.out.kernel.shape) * 10
    lam = np.asarray(gate(features))
    assert lam.min() >= 0 and lam.max() <= config.lambda_max
    if output == "value":  # update where the predicted gain is positive
        assert set(np.unique(lam)) == {0.0, 1.0}
    elif output == "clip":  # a rectified output reaches exactly 0 (a real skip) and the top of the range
        assert (lam == 0).any() and (lam == config.lambda_max).any()
    else:
        assert (lam > 0).all()


def test_config_saved_before_the_gate_output_field_reads_as_sigmoid():
    saved = CONFIG.to_dict()
    assert saved["gate"].pop("output") == "value" and saved["gate"].pop("features") == N_FEATURES
    old = TTTLMConfig.from_dict(BASE, saved).gate
    assert old.output == "sigmoid" and old.features == 6  # what gates read before those fields existed
    assert TTTLMConfig.from_dict(BASE, CONFIG.to_dict()) == CONFIG
    with pytest.raises(ValueError, match="gate output must be 'value', 'clip' or 'sigmoid'"):
        GateConfig(output="relu")


def test_forward_and_decoding_under_x64():
    """With ``jax_enable_x64`` on, every counter and float of the state keeps its 32-bit dtype: scan carries
    and cond branches agree (a refusal count summed to int64 broke the chunk scan), and decoding still equals
    the full forward."""
    model = _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))
    schedule = Schedule("policy", explore=True, seed=1)  # skipped chunks, and per-row extra steps
    tokens, positions = _batch(32)
    with jax.enable_x64(True):
        out = model(tokens, positions, schedule)
        logits, _, _, state = _decode(model, tokens, positions, schedule)
    assert np.abs(logits - np.asarray(out.logits)).max() <= 1e-5
    for tree in (out.state, state):
        dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)}
        assert dtypes <= {np.dtype(np.float32), np.dtype(np.int32), np.dtype(bool)}, dtypes
    assert 0 in np.asarray(out.chunk_steps) and np.asarray(out.chunk_steps).max() > 1
