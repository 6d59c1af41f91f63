"""The test-time-training layer (TTT-Linear), in dual and primal form.

A TTT layer holds *fast weights* ``W, b`` per head that take a gradient step
on a self-supervised reconstruction loss as the sequence streams in
(DESIGN.md §2). Per head, with mini-batches of K tokens:

* ``xqk = x Wq`` (one shared projection); ``XQ = convQ(xqk)``,
  ``XK = convK(xqk)`` are depthwise causal convolutions of width 4 (output i
  sees inputs i-3..i); ``XV = x Wv``. RoPE rotates XQ and XK with position
  ``p mod K``.
* Target ``XV - XK``; fast network ``f(z) = LN_h(z W + b)``; per-token loss
  ``l_j = 0.5 |f(XK_j) - (XV_j - XK_j)|^2``; ``g_j = dl_j/dZ_j`` at the
  mini-batch-start weights ``W0, b0``.
* Learning rates ``eta_ij = base_lr * lam * tau_i * sigma_j / d`` for j <= i,
  ``sigma_j = sigmoid(theta_h . x_j + beta_h)``, ``tau_i = max(0, 1/(i+1) + ell_i)``.
* Token i sees ``W_i = W0 - sum_{j<=i} eta_ij XK_j^T g_j`` and
  ``b_i = b0 - sum_{j<=i} eta_ij g_j``; output ``XQ_i + LN_h(XQ_i W_i + b_i)``.

Because ``eta_ij`` factorises into ``tau_i * sigma_j``, the primal form keeps
one running sum ``sum_j sigma_j XK_j^T g_j`` per mini-batch (the decode
state); the dual form computes all K outputs of a mini-batch with matmuls:
``Zbar = XQ W0 + b0 - (eta * tril(XQ XK^T)) G - eta G``. Both are here; the
primal form is the reference the tests hold the dual form to.

Not yet built (issue 3): TTT-MLP, the gating network and its schedules,
incremental decode state, document resets, the TTT language model, update
clipping and non-finite refusal. Sequences must be a whole number of
mini-batches for now.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Shape and hyper-parameters of one TTT-Linear layer.

    Attributes:
      width: model width D the layer reads and writes.
      n_head: fast-weight heads H; head dim d = width / n_head.
      mini_batch: K, tokens per fast-weight update.
      conv_width: taps of the causal Q/K convolutions.
      base_lr: base learning rate of the fast weights.
      rope_theta: RoPE base.
      ln_eps: epsilon of the per-head LayerNorm inside the fast network.
    """

    width: int = 256
    n_head: int = 4
    mini_batch: int = 16
    conv_width: int = 4
    base_lr: float = 1.0
    rope_theta: float = 10000.0
    ln_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.n_head:
            raise ValueError(f"TTTConfig.width ({self.width}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"TTTConfig head dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_head


def causal_conv(x, kernel, bias):
    """Depthwise causal convolution: ``out[t] = bias + sum_k kernel[k] * x[t - (W-1) + k]``.

    Args:
      x: [B, T, C]; kernel: [W, C]; bias: [C].

    Returns:
      [B, T, C]; output t depends on inputs t-W+1 .. t only (zeros before the start).
    """
    W = kernel.shape[0]
    padded = jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0)))  # [B, T + W - 1, C]
    T = x.shape[1]
    return bias + sum(kernel[k] * padded[:, k : k + T] for k in range(W))


def rope(x, positions, theta: float):
    """Rotates interleaved pairs (x[2m], x[2m+1]) by ``positions * theta^(-2m/d)``.

    Args:
      x: [..., T, d]; positions: [T] (or broadcastable to x[..., 0]).
    """
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2) / d)  # [d/2]
    angles = positions[..., None] * freqs  # [..., T, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)  # [..., T, d/2, 2]
    return rotated.reshape(x.shape)


def _head_ln(z, scale, bias, eps):
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) / jnp.sqrt(var + eps) * scale + bias


def _token_grads(XK, target, W0, b0, ln_scale, ln_bias, eps):
    """g_j = dl_j/dZ_j at W0 for every token (each loss depends on its own row only). [K, d]"""
    Z = XK @ W0 + b0  # [K, d]
    loss = lambda Z: 0.5 * jnp.sum((_head_ln(Z, ln_scale, ln_bias, eps) - target) ** 2)
    return jax.grad(loss)(Z)


def dual_minibatch(XQ, XK, target, sigma, tau, lam, W0, b0, ln_scale, ln_bias, base_lr, eps):
    """One mini-batch of one head in dual form.

    Args:
      XQ, XK, target: [K, d]; sigma, tau: [K]; lam: scalar gate scale.
      W0: [d, d]; b0: [d]: fast weights at the mini-batch start.

    Returns:
      ``(out [K, d], W1, b1)``: outputs ``XQ + LN(Zbar)`` and the weights after the mini-batch.
    """
    K, d = XQ.shape
    G = _token_grads(XK, target, W0, b0, ln_scale, ln_bias, eps)  # [K, d]
    tril = jnp.tril(jnp.ones((K, K), XQ.dtype))
    eta = (base_lr * lam / d) * tau[:, None] * sigma[None, :] * tril  # [K, K]
    Zbar = XQ @ W0 + b0 - (eta * (XQ @ XK.T)) @ G - eta @ G  # [K, d]
    out = XQ + _head_ln(Zbar, ln_scale, ln_bias, eps)
    W1 = W0 - (eta[-1][:, None] * XK).T @ G
    b1 = b0 - eta[-1] @ G
    return out, W1, b1


def primal_minibatch(XQ, XK, target, sigma, tau, lam, W0, b0, ln_scale, ln_bias, base_lr, eps):
    """The same mini-batch token by token with running gradient sums (the decode path)."""
    K, d = XQ.shape
    G = _token_grads(XK, target, W0, b0, ln_scale, ln_bias, eps)  # [K, d], each row at W0
    scale = base_lr * lam / d

    def step(sums, j):
        sum_W, sum_b = sums
        sum_W = sum_W + sigma[j] * jnp.outer(XK[j], G[j])  # [d, d]
        sum_b = sum_b + sigma[j] * G[j]
        W_j = W0 - scale * tau[j] * sum_W
        b_j = b0 - scale * tau[j] * sum_b
        out = XQ[j] + _head_ln(XQ[j] @ W_j + b_j, ln_scale, ln_bias, eps)
        return (sum_W, sum_b), out

    (sum_W, sum_b), out = jax.lax.scan(step, (jnp.zeros_like(W0), jnp.zeros_like(b0)), jnp.arange(K))
    return out, W0 - scale * tau[-1] * sum_W, b0 - scale * tau[-1] * sum_b


class TTTLinear(nnx.Module):
    """TTT-Linear: slow parameters here, fast weights threaded through ``__call__``."""

    def __init__(self, config: TTTConfig, *, rngs: nnx.Rngs):
        self.config = config
        D, H, d, K = config.width, config.n_head, config.head_dim, config.mini_batch
        normal = nnx.initializers.normal(0.02)
        self.wq = nnx.Linear(D, D, use_bias=False, kernel_init=normal, rngs=rngs)
        self.wv = nnx.Linear(D, D, use_bias=False, kernel_init=normal, rngs=rngs)
        # Convolutions start as the identity (last tap 1), so XQ = XK = xqk at init.
        identity = jnp.zeros((config.conv_width, D)).at[-1].set(1.0)
        self.conv_q = nnx.Param(identity)
        self.conv_q_bias = nnx.Param(jnp.zeros((D,)))
        self.conv_k = nnx.Param(identity)
        self.conv_k_bias = nnx.Param(jnp.zeros((D,)))
        self.lr_proj = nnx.Linear(D, H, kernel_init=normal, rngs=rngs)  # theta_h, beta_h
        self.tau_offset = nnx.Param(jnp.zeros((K,)))  # ell_i
        self.W0 = nnx.Param(normal(rngs.params(), (H, d, d)))
        self.b0 = nnx.Param(jnp.zeros((H, d)))
        self.ttt_ln_scale = nnx.Param(jnp.ones((H, d)))
        self.ttt_ln_bias = nnx.Param(jnp.zeros((H, d)))
        self.post_norm = nnx.LayerNorm(D, epsilon=1e-6, rngs=rngs)
        self.wg = nnx.Linear(D, D, use_bias=False, kernel_init=normal, rngs=rngs)
        self.wo = nnx.Linear(D, D, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def heads(self, x):
        """Per-head XQ, XK, target and sigma for x [B, T, D] -> [B, H, T, d] x3, [B, H, T]."""
        c = self.config
        B, T, D = x.shape
        xqk = self.wq(x)  # [B, T, D]
        split = lambda a: a.reshape(B, T, c.n_head, c.head_dim).transpose(0, 2, 1, 3)  # [B, H, T, d]
        XQ = split(causal_conv(xqk, self.conv_q[...], self.conv_q_bias[...]))
        XK = split(causal_conv(xqk, self.conv_k[...], self.conv_k_bias[...]))
        XV = split(self.wv(x))
        positions = jnp.arange(T) % c.mini_batch  # RoPE position restarts each mini-batch
        XQ, XK = rope(XQ, positions, c.rope_theta), rope(XK, positions, c.rope_theta)
        sigma = jax.nn.sigmoid(self.lr_proj(x)).transpose(0, 2, 1)  # [B, H, T]
        return XQ, XK, XV - XK, sigma

    def tau(self):
        K = self.config.mini_batch
        return jnp.maximum(0.0, 1.0 / (jnp.arange(K) + 1.0) + self.tau_offset[...])  # [K]

    def __call__(self, x, lam, *, primal: bool = False):
        """Runs the layer over whole mini-batches, fast weights starting from W0, b0.

        Args:
          x: [B, T, D] with T a multiple of the mini-batch size.
          lam: [B, T / K] gate scale of each mini-batch.
          primal: use the token-by-token primal form instead of the dual form.

        Returns:
          ``(y [B, T, D], (W [B, H, d, d], b [B, H, d]))``: outputs and final fast weights.
        """
        c = self.config
        B, T, D = x.shape
        K, H, d = c.mini_batch, c.n_head, c.head_dim
        if T % K:
            raise ValueError(f"sequence length {T} is not a multiple of the mini-batch size {K}")
        n = T // K
        XQ, XK, target, sigma = self.heads(x)
        as_minibatches = lambda a: a.reshape(B, H, n, K, *a.shape[3:]).swapaxes(1, 2)  # [B, n, H, K, ...]
        XQ, XK, target, sigma = map(as_minibatches, (XQ, XK, target, sigma))
        tau, ln_scale, ln_bias = self.tau(), self.ttt_ln_scale[...], self.ttt_ln_bias[...]
        minibatch = primal_minibatch if primal else dual_minibatch

        def one_head(XQ, XK, target, sigma, lam, W, b, scale, bias):
            return minibatch(XQ, XK, target, sigma, tau, lam, W, b, scale, bias, c.base_lr, c.ln_eps)

        all_heads = jax.vmap(one_head, in_axes=(0, 0, 0, 0, None, 0, 0, 0, 0))  # over H
        all_rows = jax.vmap(all_heads, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None))  # over B

        @jax.checkpoint  # rematerialise each mini-batch in the backward pass
        def scan_step(fast, inputs):
            W, b = fast
            out, W, b = all_rows(*inputs, W, b, ln_scale, ln_bias)  # out [B, H, K, d]
            return (W, b), out

        fast = (jnp.broadcast_to(self.W0[...], (B, H, d, d)), jnp.broadcast_to(self.b0[...], (B, H, d)))
        inputs = tuple(a.swapaxes(0, 1) for a in (XQ, XK, target, sigma)) + (lam.T,)  # leading [n] to scan over
        fast, out = jax.lax.scan(scan_step, fast, inputs)  # out [n, B, H, K, d]
        out = out.transpose(1, 0, 3, 2, 4).reshape(B, T, D)  # [B, T, D]: heads concatenated
        out = self.post_norm(out)
        out = jax.nn.gelu(self.wg(x), approximate=True) * out
        return self.wo(out), fast
