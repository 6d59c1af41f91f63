"""The fast-weight math of the TTT layer (docs/design.md, "TTT layer"): pure functions on one head's arrays.

``model.ttt.TTTLayer`` maps them over rows and heads: the dual form of a
whole mini-batch (``dual_minibatch``), one token in primal form
(``primal_token``), the weights a mini-batch leaves (``minibatch_update``,
``settle``), and the input pieces (``causal_conv``, ``rope``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def settle(W0, b0, W1, b1, max_norm):
    """The fast weights a mini-batch leaves behind, made safe.

    The change ``(W1 - W0, b1 - b0)`` of each head (all fast layers together)
    is scaled down to Frobenius norm ``max_norm`` (if set), and a non-finite
    result is refused: the head keeps ``W0, b0``. Outputs inside the
    mini-batch are not affected; this only guards the state carried forward.

    Args:
      W0, W1: tuples of [..., in, out]; b0, b1: tuples of [..., out].

    Returns:
      ``(W, b, refused [...] int32)``.
    """
    dW = [w1 - w0 for w0, w1 in zip(W0, W1)]
    db = [c1 - c0 for c0, c1 in zip(b0, b1)]
    if max_norm is not None:
        norm = jnp.sqrt(sum(jnp.sum(w**2, axis=(-2, -1)) for w in dW) + sum(jnp.sum(c**2, axis=-1) for c in db))
        shrink = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))  # [...]
        dW, db = [w * shrink[..., None, None] for w in dW], [c * shrink[..., None] for c in db]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w), axis=(-2, -1)) for w in dW]
                               + [jnp.all(jnp.isfinite(c), axis=-1) for c in db]), axis=0)
    W = tuple(jnp.where(finite[..., None, None], w0 + w, w0) for w0, w in zip(W0, dW))
    b = tuple(jnp.where(finite[..., None], c0 + c, c0) for c0, c in zip(b0, db))
    return W, b, (~finite).astype(jnp.int32)


def select_rows(rows, new, old):
    """``new`` where ``rows`` [B] is True, else ``old``; both with a leading batch axis."""
    return jnp.where(rows.reshape(-1, *([1] * (old.ndim - 1))), new, old)


def causal_conv(x, kernel, bias, history=None):
    """Depthwise causal convolution: ``out[t] = bias + sum_k kernel[k] * x[t - (W-1) + k]``.

    Args:
      x: [B, T, C]; kernel: [W, C]; bias: [C].
      history: [B, W-1, C] inputs before ``x`` (zeros at a document start).

    Returns:
      ``(out [B, T, C], new_history [B, W-1, C])``; output t depends on inputs
      t-W+1 .. t only.
    """
    W = kernel.shape[0]
    B, T, C = x.shape
    if history is None:
        history = jnp.zeros((B, W - 1, C), x.dtype)
    padded = jnp.concatenate([history, x], axis=1)  # [B, T + W - 1, C]
    out = bias + sum(kernel[k] * padded[:, k : k + T] for k in range(W))
    return out, padded[:, T:]


def rope(x, positions, theta: float):
    """Rotates interleaved pairs (x[2m], x[2m+1]) by ``positions * theta^(-2m/d)``.

    Args:
      x: [..., T, d]; positions: [T] (or broadcastable to x[..., 0]).
    """
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [d/2]
    angles = positions[..., None] * freqs  # [..., T, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)  # [..., T, d/2, 2]
    return rotated.reshape(x.shape)


def head_ln(z, scale, bias, eps):
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) / jnp.sqrt(var + eps) * scale + bias


def gelu(z):
    return jax.nn.gelu(z, approximate=True)


# --- One head's fast network. X: [K, d]; W, b: tuples over fast layers.


def fast_apply(X, W, b):
    """Pre-LayerNorm output of the fast network at fixed weights. [K, d]"""
    for layer, (w, c) in enumerate(zip(W, b)):
        X = (gelu(X) if layer else X) @ w + c
    return X


def fast_grads(XK, target, W, b, ln_scale, ln_bias, eps):
    """Per-token gradients of the reconstruction loss at fixed weights.

    Returns:
      ``(inputs, G)``: per fast layer, its input for each key [K, in] and
      ``g_j = dl_j/dZ_j`` at its pre-activation [K, out] (each token's loss
      depends on its own row only, so one backward pass gives all K).
    """
    inputs, Zs, X = [], [], XK
    for layer, (w, c) in enumerate(zip(W, b)):
        X = gelu(Zs[-1]) if layer else X
        inputs.append(X)
        Zs.append(X @ w + c)

    def loss(offsets):  # Z_l + offset_l: the gradient w.r.t. the offset is dl/dZ_l
        Z = Zs[0] + offsets[0]
        for layer in range(1, len(W)):
            Z = gelu(Z) @ W[layer] + b[layer] + offsets[layer]
        return 0.5 * jnp.sum((head_ln(Z, ln_scale, ln_bias, eps) - target) ** 2)

    return inputs, jax.grad(loss)([jnp.zeros_like(Z) for Z in Zs])


def dual_minibatch(XQ, XK, target, sigma, tau, lam, W0, b0, ln_scale, ln_bias, base_lr, eps):
    """One mini-batch of one head in dual form.

    Args:
      XQ, XK, target: [K, d]; sigma, tau: [K]; lam: scalar gate scale.
      W0, b0: tuples of fast weights at the mini-batch start.

    Returns:
      ``(out [K, d], W1, b1)``: outputs ``XQ + LN(Zbar)`` and the weights after the mini-batch.
    """
    K, d = XQ.shape
    inputs, G = fast_grads(XK, target, W0, b0, ln_scale, ln_bias, eps)
    tril = jnp.tril(jnp.ones((K, K), XQ.dtype))
    eta = (base_lr * lam / d) * tau[:, None] * sigma[None, :] * tril  # [K, K]
    Zbar = None
    for w, c, X, g in zip(W0, b0, inputs, G):
        Xbar = XQ if Zbar is None else gelu(Zbar)  # the query's input to this layer
        Zbar = Xbar @ w + c - (eta * (Xbar @ X.T)) @ g - eta @ g  # [K, out]
    out = XQ + head_ln(Zbar, ln_scale, ln_bias, eps)
    W1, b1 = _end_weights(W0, b0, inputs, G, eta[-1])
    return out, W1, b1


def minibatch_update(XK, target, sigma, tau, lam, W0, b0, ln_scale, ln_bias, base_lr, eps):
    """One gradient step of one head over a whole mini-batch: ``dual_minibatch``'s end weights, no outputs.

    An extra step (``steps > 1``) of both the dual and the primal path.

    Args:
      XK, target: [K, d]; sigma, tau: [K]; lam: scalar gate scale.
      W0, b0: tuples of fast weights the step starts from.

    Returns:
      ``(W1, b1)``.
    """
    d = XK.shape[-1]
    inputs, G = fast_grads(XK, target, W0, b0, ln_scale, ln_bias, eps)
    eta_last = (base_lr * lam / d) * tau[-1] * sigma  # [K]: the last row of eta
    return _end_weights(W0, b0, inputs, G, eta_last)


def _end_weights(W0, b0, inputs, G, eta_last):
    """``W0 - sum_j eta_{K-1,j} X_j^T g_j`` per fast layer (and likewise b): a mini-batch's end weights."""
    W1 = tuple(w - (eta_last[:, None] * X).T @ g for w, X, g in zip(W0, inputs, G))
    b1 = tuple(c - eta_last @ g for c, g in zip(b0, G))
    return W1, b1


def primal_token(XQ, XK, target, sigma, coef, W0, b0, sum_W, sum_b, ln_scale, ln_bias, eps):
    """One token of one head in primal form.

    Args:
      XQ, XK, target: [d]; sigma: scalar; coef: ``base_lr * lam * tau_i / d``.
      W0, b0: weights at the mini-batch start; sum_W, sum_b: running sums
        ``sum_{j<i} sigma_j grad_j`` of this mini-batch.

    Returns:
      ``(out [d], W_i, b_i, sum_W, sum_b)``: the output, the weights token i
      sees, and the running sums including token i.
    """
    inputs, G = fast_grads(XK[None], target[None], W0, b0, ln_scale, ln_bias, eps)
    sum_W = tuple(s + sigma * X.T @ g for s, X, g in zip(sum_W, inputs, G))  # X^T g: the outer product
    sum_b = tuple(s + sigma * g[0] for s, g in zip(sum_b, G))
    W_i = tuple(w - coef * s for w, s in zip(W0, sum_W))
    b_i = tuple(c - coef * s for c, s in zip(b0, sum_b))
    out = XQ + head_ln(fast_apply(XQ[None], W_i, b_i)[0], ln_scale, ln_bias, eps)
    return out, W_i, b_i, sum_W, sum_b


def over_rows_and_heads(fn, in_axes):
    """vmap ``fn`` over heads, then over rows; ``in_axes`` gives, per argument, whether it has a row axis."""
    per_head = jax.vmap(fn)
    return jax.vmap(per_head, in_axes=tuple(0 if batched else None for batched in in_axes))
