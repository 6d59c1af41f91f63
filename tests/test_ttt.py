"""TTT-Linear: an independent NumPy reference, dual = primal, convolution causality, RoPE."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.fast_weights import causal_conv, rope
from ponder.model.ttt import TTTConfig, TTTLayer

CONFIG = TTTConfig(width=32, n_head=4, mini_batch=16)


def _randomised_layer(config=CONFIG, seed=0) -> TTTLayer:
    """A layer whose every slow parameter is random, so no term can hide behind an init value."""
    layer = TTTLayer(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(layer)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    # Keep every tau_i > 0: tau_{K-1} = 0 would zero the end-of-mini-batch update.
    layer.tau_offset[...] = jnp.abs(layer.tau_offset[...])
    return layer


# --- An independent reference in float64 NumPy: loops, no JAX, hand-written LN backward.


def _ln(z, scale, bias, eps):
    mu = z.mean()
    var = ((z - mu) ** 2).mean()
    return (z - mu) / math.sqrt(var + eps) * scale + bias


def _ln_loss_grad(z, target, scale, bias, eps):
    """d/dz of 0.5 * |LN(z) - target|^2."""
    d = z.size
    mu = z.mean()
    rstd = 1.0 / math.sqrt(((z - mu) ** 2).mean() + eps)
    zhat = (z - mu) * rstd
    g_hat = (zhat * scale + bias - target) * scale
    return rstd * (g_hat - g_hat.sum() / d - zhat * (g_hat * zhat).sum() / d)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def numpy_ttt_linear(p, x, lam, config: TTTConfig):
    """TTT-Linear forward for one sequence x [T, D] with gate scales lam [T / K]."""
    T, D = x.shape
    H, d, K = config.n_head, config.head_dim, config.mini_batch
    xqk = x @ p["wq"]["kernel"]
    xv = x @ p["wv"]["kernel"]

    def conv(kernel, bias):
        W = kernel.shape[0]
        out = np.tile(bias, (T, 1))
        for t in range(T):
            for k in range(W):
                src = t - (W - 1) + k
                if src >= 0:
                    out[t] += kernel[k] * xqk[src]
        return out

    def rotate(v, pos):
        out = v.copy()
        for m in range(d // 2):
            angle = pos * config.rope_theta ** (-2 * m / d)
            a, b = v[2 * m], v[2 * m + 1]
            out[2 * m], out[2 * m + 1] = a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)
        return out

    xq_all, xk_all = conv(p["conv_q"], p["conv_q_bias"]), conv(p["conv_k"], p["conv_k_bias"])
    sigma_all = 1 / (1 + np.exp(-(x @ p["lr_proj"]["kernel"] + p["lr_proj"]["bias"])))  # [T, H]
    tau = np.maximum(0.0, 1.0 / (np.arange(K) + 1.0) + p["tau_offset"])
    heads_out = np.zeros((T, D))
    for h in range(H):
        cols = slice(h * d, (h + 1) * d)
        W, b = p["W0"][0][h].copy(), p["b0"][0][h].copy()
        scale, bias = p["ttt_ln_scale"][h], p["ttt_ln_bias"][h]
        for start in range(0, T, K):
            W_start, b_start = W.copy(), b.copy()
            step = config.base_lr * lam[start // K] / d
            sum_W, sum_b = np.zeros_like(W), np.zeros_like(b)
            for i in range(K):
                t = start + i
                xq, xk = rotate(xq_all[t, cols], i), rotate(xk_all[t, cols], i)
                target = xv[t, cols] - xk
                g = _ln_loss_grad(xk @ W_start + b_start, target, scale, bias, config.ln_eps)
                sum_W += sigma_all[t, h] * np.outer(xk, g)
                sum_b += sigma_all[t, h] * g
                W_i, b_i = W_start - step * tau[i] * sum_W, b_start - step * tau[i] * sum_b
                heads_out[t, cols] = xq + _ln(xq @ W_i + b_i, scale, bias, config.ln_eps)
            W, b = W_i, b_i
    normed = np.stack([_ln(row, p["post_norm"]["scale"], p["post_norm"]["bias"], 1e-6) for row in heads_out])
    gated = _gelu_tanh(x @ p["wg"]["kernel"]) * normed
    return gated @ p["wo"]["kernel"], (W, b)


def _params64(layer):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(layer)))


def _inputs(T, B=2, seed=0, config=CONFIG):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, config.width)).astype(np.float32)
    lam = rng.uniform(0.0, 4.0, size=(B, T // config.mini_batch)).astype(np.float32)
    return x, lam


@pytest.mark.parametrize("T", [16, 48])
def test_layer_matches_numpy_reference(T):
    layer = _randomised_layer()
    x, lam = _inputs(T)
    y, state = layer(jnp.asarray(x), jnp.asarray(lam))
    W, b = state.W[0], state.b[0]
    params = _params64(layer)
    for row in range(x.shape[0]):
        expected, (W_ref, b_ref) = numpy_ttt_linear(params, x[row].astype(np.float64), lam[row], CONFIG)
        assert np.abs(np.asarray(y[row]) - expected).max() <= 1e-5
        # Last head's final fast weights (the reference loops heads; it returns the last one).
        assert np.abs(np.asarray(W[row, -1]) - W_ref).max() <= 1e-5
        assert np.abs(np.asarray(b[row, -1]) - b_ref).max() <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("seed", range(3))
def test_dual_form_equals_primal_form(kind, seed):
    rng = np.random.default_rng(seed)
    config = TTTConfig(width=int(rng.choice([32, 64])), n_head=int(rng.choice([2, 4])), kind=kind, mini_batch=16)
    layer = _randomised_layer(config, seed)
    T = 16 * int(rng.integers(1, 6))
    x, lam = _inputs(T, seed=seed, config=config)
    dual, dual_state = layer(jnp.asarray(x), jnp.asarray(lam))
    lam_tokens = jnp.asarray(_lam_per_token(lam, config.mini_batch))
    primal, primal_state = layer.extend(layer.init_state(x.shape[0]), jnp.asarray(x), lam_tokens)
    assert np.abs(np.asarray(dual) - np.asarray(primal)).max() <= 1e-5
    assert len(dual_state.W) == (1 if kind == "linear" else 2)
    for got, want in zip(jax.tree.leaves((dual_state.W, dual_state.b)), jax.tree.leaves((primal_state.W, primal_state.b))):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
    # The update is live: the fast weights moved.
    assert np.abs(np.asarray(dual_state.W[-1]) - np.asarray(layer.W0[-1][...])).max() > 1e-3


def test_causal_conv_sees_exactly_the_last_four_inputs():
    x = jax.random.normal(jax.random.key(0), (1, 20, 3))
    kernel, bias = jax.random.normal(jax.random.key(1), (4, 3)), jnp.ones(3)
    base, _ = causal_conv(x, kernel, bias)
    t = 10
    bumped, _ = causal_conv(x.at[0, t].add(1.0), kernel, bias)
    changed = np.where(np.abs(np.asarray(bumped - base)).max(-1)[0] > 0)[0]
    assert list(changed) == [10, 11, 12, 13]  # outputs t..t+3 see input t, including output t itself
    # Before the start counts as zeros: output 0 is bias + last tap * x[0].
    assert np.allclose(base[0, 0], bias + kernel[-1] * x[0, 0], atol=1e-6)


def test_rope_position_restarts_every_mini_batch():
    K, d = CONFIG.mini_batch, 8
    v = jax.random.normal(jax.random.key(2), (d,))
    x = jnp.tile(v, (3 * K, 1))  # the same vector at every position
    rotated = rope(x, jnp.arange(3 * K) % K, 10000.0)
    assert np.allclose(rotated[:K], rotated[K : 2 * K]) and np.allclose(rotated[:K], rotated[2 * K :])
    assert np.allclose(rotated[0], v)  # position 0 is the identity
    # Interleaved pairs rotate by position * theta^(-2m/d): pair 0 at position 1 turns by 1 radian.
    a, b = v[0], v[1]
    assert np.allclose(rotated[1, :2], [a * np.cos(1) - b * np.sin(1), a * np.sin(1) + b * np.cos(1)], atol=1e-6)
    assert np.allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(v), atol=1e-5)


def test_layer_is_causal():
    layer = _randomised_layer()
    x, lam = _inputs(64, B=1)
    base, _ = layer(jnp.asarray(x), jnp.asarray(lam))
    t = 37
    x2 = x.copy()
    x2[0, t:] += np.random.default_rng(9).normal(size=x2[0, t:].shape)
    bumped, _ = layer(jnp.asarray(x2), jnp.asarray(lam))
    assert np.array_equal(np.asarray(base[0, :t]), np.asarray(bumped[0, :t]))
    assert not np.allclose(base[0, t], bumped[0, t])


def test_zero_initialised_output_projection_outputs_zero():
    layer = TTTLayer(CONFIG, rngs=nnx.Rngs(0))
    x, lam = _inputs(32)
    y, _ = layer(jnp.asarray(x), jnp.asarray(lam))
    assert not np.asarray(y).any()


def test_lambda_zero_leaves_fast_weights_unchanged():
    layer = _randomised_layer()
    x, _ = _inputs(32)
    _, state = layer(jnp.asarray(x), jnp.zeros((2, 2)))
    W, b = state.W[0], state.b[0]
    assert np.array_equal(np.asarray(W[0]), np.asarray(layer.W0[0][...]))
    assert np.array_equal(np.asarray(b[0]), np.asarray(layer.b0[0][...]))


def _lam_per_token(lam, K):
    return np.repeat(lam, K, axis=1)


@pytest.mark.parametrize("splits", [[0, 64], [0, 1, 2, 15, 16, 17, 40, 64], [0, 13, 14, 33, 47, 48, 64]])
def test_incremental_decoding_equals_full_forward(splits):
    """Token-by-token from any offset, in pieces of any length, equals the dual form."""
    layer = _randomised_layer()
    x, lam = _inputs(64)
    full, final = layer(jnp.asarray(x), jnp.asarray(lam))
    lam_tokens = _lam_per_token(lam, CONFIG.mini_batch)
    state = layer.init_state(2)
    for start, end in zip(splits[:-1], splits[1:]):
        y, state = layer.extend(state, jnp.asarray(x[:, start:end]), jnp.asarray(lam_tokens[:, start:end]))
        assert np.abs(np.asarray(y) - np.asarray(full[:, start:end])).max() <= 1e-5, (start, end)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(final)):
        assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() <= 1e-5


def test_decoding_continues_from_a_dual_prefill():
    layer = _randomised_layer()
    x, lam = _inputs(64)
    full, _ = layer(jnp.asarray(x), jnp.asarray(lam))
    _, state = layer(jnp.asarray(x[:, :32]), jnp.asarray(lam[:, :2]))  # dual prefill of two mini-batches
    lam_tokens = _lam_per_token(lam, CONFIG.mini_batch)
    for t in range(32, 64):
        y, state = layer.step(state, jnp.asarray(x[:, t]), jnp.asarray(lam_tokens[:, t]))
        assert np.abs(np.asarray(y) - np.asarray(full[:, t])).max() <= 1e-5, t


def test_update_clip_caps_each_heads_change_in_both_forms():
    config = dataclasses.replace(CONFIG, max_update_norm=0.05)
    layer = _randomised_layer(config)
    x, lam = _inputs(32)
    dual, dual_state = layer(jnp.asarray(x), jnp.asarray(lam))
    lam_tokens = _lam_per_token(lam, config.mini_batch)
    primal, primal_state = layer.extend(layer.init_state(2), jnp.asarray(x), jnp.asarray(lam_tokens))
    assert np.abs(np.asarray(dual) - np.asarray(primal)).max() <= 1e-5
    assert np.abs(np.asarray(dual_state.W[0]) - np.asarray(primal_state.W[0])).max() <= 1e-6
    # After the first mini-batch each head moved by exactly the cap (the raw steps are far larger).
    _, first = layer(jnp.asarray(x[:, :16]), jnp.asarray(lam[:, :1]))
    moved = np.sqrt(
        ((np.asarray(first.W[0]) - np.asarray(layer.W0[0][...])) ** 2).sum((-2, -1))
        + ((np.asarray(first.b[0]) - np.asarray(layer.b0[0][...])) ** 2).sum(-1)
    )
    assert np.allclose(moved, 0.05, rtol=1e-4)


def test_non_finite_updates_are_refused_and_counted():
    layer = _randomised_layer()
    x, lam = _inputs(32)
    x[0, 20] = np.inf  # poisons row 0's second mini-batch
    _, state = layer(jnp.asarray(x), jnp.asarray(lam))
    _, clean = layer(jnp.asarray(x[:, :16]), jnp.asarray(lam[:, :1]))
    assert int(state.refused[0]) > 0 and int(state.refused[1]) == 0
    assert np.isfinite(np.asarray(state.W[0])).all()
    # Row 0 kept the weights from before the poisoned mini-batch (up to rounding: the two calls are
    # different XLA programs), while row 1's second mini-batch moved its weights by far more.
    assert np.abs(np.asarray(state.W[0][0]) - np.asarray(clean.W[0][0])).max() <= 1e-5
    assert np.abs(np.asarray(state.W[0][1]) - np.asarray(clean.W[0][1])).max() > 1e-3


def test_reset_returns_rows_to_the_document_start():
    layer = _randomised_layer()
    x, lam = _inputs(32)
    _, state = layer(jnp.asarray(x), jnp.asarray(lam))
    state = layer.reset(state, jnp.asarray([True, False]))
    fresh = layer.init_state(2)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(fresh)):
        assert np.array_equal(np.asarray(got[0]), np.asarray(want[0]))
    # Document B after a reset gives what it gives on its own.
    lam_tokens = _lam_per_token(lam, CONFIG.mini_batch)
    after, _ = layer.extend(state, jnp.asarray(x[:, :16]), jnp.asarray(lam_tokens[:, :16]))
    alone, _ = layer(jnp.asarray(x[:, :16]), jnp.asarray(lam[:, :1]))
    assert np.abs(np.asarray(after[0]) - np.asarray(alone[0])).max() <= 1e-5


# --- Extra gradient steps per row (UPDATE_k, and a policy choosing k per row).

ROW_STEPS = [1, 2, 4]


def test_chunk_row_steps_equal_each_row_alone():
    """One batch with row_steps [1, 2, 4] gives each row what steps=1 / 2 / 4 gives it alone."""
    layer = _randomised_layer()
    x, lam = _inputs(48, B=3)
    y, state, _ = layer.chunk(jnp.asarray(x), jnp.asarray(lam), steps=4, row_steps=jnp.asarray(ROW_STEPS))
    carried = lambda state, row: [a[row] for a in jax.tree.leaves((state.W, state.b, state.refused))]
    for row, k in enumerate(ROW_STEPS):
        y_alone, alone, _ = layer.chunk(jnp.asarray(x[row : row + 1]), jnp.asarray(lam[row : row + 1]), steps=k)
        assert np.abs(np.asarray(y[row]) - np.asarray(y_alone[0])).max() <= 1e-5, k
        for got, want in zip(carried(state, row), carried(alone, 0)):
            assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() <= 1e-5, k
    # The extra steps are live: each row's weights differ from the others'.
    W = np.asarray(state.W[0])
    assert np.abs(W[0] - W[1]).max() > 1e-3 and np.abs(W[1] - W[2]).max() > 1e-3
    # The first mini-batch's outputs cannot see the extra steps; later ones do.
    y_one, _, _ = layer.chunk(jnp.asarray(x), jnp.asarray(lam))
    assert np.abs(np.asarray(y[:, :16]) - np.asarray(y_one[:, :16])).max() <= 1e-5
    assert not np.allclose(np.asarray(y[2, 16:]), np.asarray(y_one[2, 16:]), atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("prefill,splits", [(0, [0, 48]), (16, [16, 21, 37, 48])])
def test_decoding_with_row_steps_equals_chunk(kind, prefill, splits):
    """Token-by-token decoding with row_steps carries the weights chunk carries, from a document
    start or after a dual prefill, in pieces that start and end inside mini-batches."""
    config = dataclasses.replace(CONFIG, kind=kind)
    layer = _randomised_layer(config)
    x, lam = _inputs(48, B=3, config=config)
    row_steps = jnp.asarray(ROW_STEPS)
    full, final, _ = layer.chunk(jnp.asarray(x), jnp.asarray(lam), steps=4, row_steps=row_steps)
    K = config.mini_batch
    state = layer.init_state(3)
    if prefill:
        _, state, _ = layer.chunk(jnp.asarray(x[:, :prefill]), jnp.asarray(lam[:, : prefill // K]), state, steps=4, row_steps=row_steps)
    lam_tokens = _lam_per_token(lam, K)
    for start, end in zip(splits[:-1], splits[1:]):
        y, state = layer.extend(
            state, jnp.asarray(x[:, start:end]), jnp.asarray(lam_tokens[:, start:end]), steps=4, row_steps=row_steps
        )
        assert np.abs(np.asarray(y) - np.asarray(full[:, start:end])).max() <= 1e-5, (start, end)
    # Every leaf, the mini-batch buffers included: decoding leaves the state the full forward leaves.
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(final), strict=True):
        assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() <= 1e-5
    # The extra steps are live: one step per row would carry other weights.
    _, one_step = layer.extend(layer.init_state(3), jnp.asarray(x), jnp.asarray(lam_tokens))
    assert np.abs(np.asarray(one_step.W[0][2]) - np.asarray(state.W[0][2])).max() > 1e-3


def test_decode_with_one_step_traces_no_extra_step_work():
    """steps=1 (the default) buffers nothing and traces what it traced before row_steps existed."""
    layer, x, lam = _randomised_layer(), jnp.ones((2, CONFIG.width)), jnp.ones((2,))
    state = layer.init_state(2)
    one = str(jax.make_jaxpr(lambda x: layer.step(state, x, lam))(x))
    assert one == str(jax.make_jaxpr(lambda x: layer.step(state, x, lam, steps=1, row_steps=jnp.asarray([1, 1])))(x))
    assert "cond" not in one and "scatter" not in one
    assert "cond" in str(jax.make_jaxpr(lambda x: layer.step(state, x, lam, steps=2))(x))
    _, after = layer.step(state, x, lam)
    for name in ("minibatch_XK", "minibatch_target", "minibatch_sigma"):
        assert not np.asarray(getattr(after, name)).any()
