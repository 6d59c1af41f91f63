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
state, ``TTTLinear.step``); the dual form computes all K outputs of a
mini-batch with matmuls: ``Zbar = XQ W0 + b0 - (eta * tril(XQ XK^T)) G - eta G``.
The tests hold the dual form to the primal one.

Incremental decoding: ``TTTState`` holds the fast weights at the current
mini-batch start, the running sums, the convolution history and the token
count; ``step`` advances it by one token (primal form) and ``extend`` by any
number, from any offset. ``__call__`` (dual form) runs whole mini-batches from
a document start and returns the state to continue from.

Stability: ``settle`` clips each mini-batch's fast-weight change per head
and refuses non-finite updates (counted in the state). ``reset`` returns rows
of a state to the start of a document.

``chunk(update=False)`` only applies the fast weights: the real skip the
gate (``model.gating``, ``model.ttt_lm``) takes for chunks it does not update.

Not yet built (issue 3): TTT-MLP, document resets inside packed sequences
(segment ids), a skip in the per-token decode step; the dual form needs a
whole number of mini-batches.
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
      max_update_norm: cap on the Frobenius norm of one mini-batch's change of
        a head's fast weights (W and b together); None = no cap.
    """

    width: int = 256
    n_head: int = 4
    mini_batch: int = 16
    conv_width: int = 4
    base_lr: float = 1.0
    rope_theta: float = 10000.0
    ln_eps: float = 1e-6
    max_update_norm: float | None = None

    def __post_init__(self):
        if self.width % self.n_head:
            raise ValueError(f"TTTConfig.width ({self.width}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"TTTConfig head dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_head


@dataclasses.dataclass
class TTTState:
    """Fast-weight state of one TTT layer for B sequences: a cache like the KV cache.

    Attributes:
      W: [B, H, d, d], b: [B, H, d]: fast weights at the current mini-batch start.
      sum_W: [B, H, d, d], sum_b: [B, H, d]: running ``sum_j sigma_j XK_j^T g_j``
        (and ``sum_j sigma_j g_j``) over the current mini-batch so far.
      conv_history: [B, W-1, D]: last inputs of the Q/K convolutions.
      count: [B] tokens seen in the document.
      refused: [B] mini-batch updates refused (per head) for being non-finite.
    """

    W: jax.Array
    b: jax.Array
    sum_W: jax.Array
    sum_b: jax.Array
    conv_history: jax.Array
    count: jax.Array
    refused: jax.Array


jax.tree_util.register_dataclass(
    TTTState, data_fields=["W", "b", "sum_W", "sum_b", "conv_history", "count", "refused"], meta_fields=[]
)


def settle(W0, b0, W1, b1, max_norm):
    """The fast weights a mini-batch leaves behind, made safe.

    The change ``(W1 - W0, b1 - b0)`` of each head is scaled down to Frobenius
    norm ``max_norm`` (if set), and a non-finite result is refused: the head
    keeps ``W0, b0``. Outputs inside the mini-batch are not affected; this only
    guards the state carried forward.

    Args:
      W0, W1: [..., d, d]; b0, b1: [..., d].

    Returns:
      ``(W, b, refused [...] int32)``.
    """
    dW, db = W1 - W0, b1 - b0
    if max_norm is not None:
        norm = jnp.sqrt(jnp.sum(dW**2, axis=(-2, -1)) + jnp.sum(db**2, axis=-1))  # [...]
        shrink = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
        dW, db = dW * shrink[..., None, None], db * shrink[..., None]
    finite = jnp.all(jnp.isfinite(dW), axis=(-2, -1)) & jnp.all(jnp.isfinite(db), axis=-1)
    W = jnp.where(finite[..., None, None], W0 + dW, W0)
    b = jnp.where(finite[..., None], b0 + db, b0)
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

    def init_state(self, batch_size: int) -> TTTState:
        """The state at a document start: trained initial fast weights, nothing seen."""
        c = self.config
        B, H, d = batch_size, c.n_head, c.head_dim
        W = jnp.broadcast_to(self.W0[...], (B, H, d, d))
        b = jnp.broadcast_to(self.b0[...], (B, H, d))
        history = jnp.zeros((B, c.conv_width - 1, c.width), W.dtype)
        count, refused = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32)  # distinct: states may be donated
        return TTTState(W, b, jnp.zeros_like(W), jnp.zeros_like(b), history, count, refused)

    def reset(self, state: TTTState, rows) -> TTTState:
        """Document boundary: rows where ``rows`` [B] is True go back to the start-of-document state."""
        fresh = self.init_state(state.count.shape[0])
        return jax.tree.map(lambda new, old: select_rows(rows, new, old), fresh, state)

    def heads(self, x, history, count):
        """Per-head inputs of the fast network.

        Args:
          x: [B, T, D]; history: [B, W-1, D] conv inputs before x; count: [B]
            document position of x[:, 0].

        Returns:
          ``(XQ, XK, target [B, H, T, d], sigma [B, H, T], new_history)``.
        """
        c = self.config
        B, T, D = x.shape
        xqk = self.wq(x)  # [B, T, D]
        split = lambda a: a.reshape(B, T, c.n_head, c.head_dim).transpose(0, 2, 1, 3)  # [B, H, T, d]
        xq, new_history = causal_conv(xqk, self.conv_q[...], self.conv_q_bias[...], history)
        xk, _ = causal_conv(xqk, self.conv_k[...], self.conv_k_bias[...], history)
        positions = ((count[:, None] + jnp.arange(T)[None, :]) % c.mini_batch)[:, None]  # [B, 1, T]
        XQ, XK = rope(split(xq), positions, c.rope_theta), rope(split(xk), positions, c.rope_theta)
        XV = split(self.wv(x))
        sigma = jax.nn.sigmoid(self.lr_proj(x)).transpose(0, 2, 1)  # [B, H, T]
        return XQ, XK, XV - XK, sigma, new_history

    def _output(self, x, heads_out):
        """Heads [B, H, T, d] -> [B, T, D]: concatenate, LayerNorm, GELU gate, output projection."""
        B, H, T, d = heads_out.shape
        out = self.post_norm(heads_out.transpose(0, 2, 1, 3).reshape(B, T, H * d))  # [B, T, D]
        return self.wo(jax.nn.gelu(self.wg(x), approximate=True) * out)

    def tau(self):
        K = self.config.mini_batch
        return jnp.maximum(0.0, 1.0 / (jnp.arange(K) + 1.0) + self.tau_offset[...])  # [K]

    def __call__(self, x, lam, state: TTTState | None = None):
        """Runs the layer over whole mini-batches (dual form).

        Args:
          x: [B, T, D] with T a multiple of the mini-batch size.
          lam: [B, T / K] gate scale of each mini-batch.
          state: where to start (a document start when None); its token count
            must sit on a mini-batch boundary.

        Returns:
          ``(y [B, T, D], TTTState)``: outputs, and the state after the last
          token (from which ``step`` / ``extend`` / another call continue).
        """
        y, state, _ = self.chunk(x, lam, state)
        return y, state

    def chunk(self, x, lam, state: TTTState | None = None, *, update: bool = True):
        """``__call__`` plus the reconstruction loss before and after, for gating features.

        With ``update=False`` the fast weights are only applied (a skipped
        chunk): no gradients, no K x K products, the same outputs as ``lam = 0``.

        Returns:
          ``(y [B, T, D], TTTState, (loss_before [B], loss_after [B]))``: mean
          per-token reconstruction loss at the weights before and after.
        """
        c = self.config
        B, T, D = x.shape
        K, H, d = c.mini_batch, c.n_head, c.head_dim
        if T % K:
            raise ValueError(f"sequence length {T} is not a multiple of the mini-batch size {K}")
        n = T // K
        state = self.init_state(B) if state is None else state
        XQ, XK, target, sigma, history = self.heads(x, state.conv_history, state.count)
        ln_scale, ln_bias = self.ttt_ln_scale[...], self.ttt_ln_bias[...]
        ln = lambda z: _head_ln(z, ln_scale[:, None], ln_bias[:, None], c.ln_eps)  # over [B, H, T, d]
        fast = lambda X, W, b: jnp.einsum("bhti,bhij->bhtj", X, W) + b[:, :, None]  # [B, H, T, d]
        recon = lambda W, b: 0.5 * jnp.mean(jnp.sum((ln(fast(XK, W, b)) - target) ** 2, -1), axis=(1, 2))  # [B]
        if not update:
            heads_out = XQ + ln(fast(XQ, state.W, state.b))  # [B, H, T, d]
            new_state = dataclasses.replace(state, conv_history=history, count=state.count + T)
            loss = recon(state.W, state.b)
            return self._output(x, heads_out), new_state, (loss, loss)

        as_minibatches = lambda a: a.reshape(B, H, n, K, *a.shape[3:]).swapaxes(1, 2)  # [B, n, H, K, ...]
        tau = self.tau()
        def one_head(XQ, XK, target, sigma, lam, W, b, scale, bias):
            return dual_minibatch(XQ, XK, target, sigma, tau, lam, W, b, scale, bias, c.base_lr, c.ln_eps)

        all_heads = jax.vmap(one_head, in_axes=(0, 0, 0, 0, None, 0, 0, 0, 0))  # over H
        all_rows = jax.vmap(all_heads, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None))  # over B

        @jax.checkpoint  # rematerialise each mini-batch in the backward pass
        def scan_step(carry, inputs):
            W0, b0, refused = carry
            out, W1, b1 = all_rows(*inputs, W0, b0, ln_scale, ln_bias)  # out [B, H, K, d]
            W, b, refused_now = settle(W0, b0, W1, b1, c.max_update_norm)
            return (W, b, refused + refused_now.sum(-1)), out

        inputs = tuple(as_minibatches(a).swapaxes(0, 1) for a in (XQ, XK, target, sigma))  # leading [n]
        carry = (state.W, state.b, state.refused)
        (W, b, refused), out = jax.lax.scan(scan_step, carry, inputs + (lam.T,))  # out [n, B, H, K, d]
        heads_out = out.transpose(1, 2, 0, 3, 4).reshape(B, H, T, d)  # [B, H, T, d]
        new_state = TTTState(W, b, state.sum_W, state.sum_b, history, state.count + T, refused)
        return self._output(x, heads_out), new_state, (recon(state.W, state.b), recon(W, b))

    def update_flops(self, tokens: int) -> int:
        """Matmul FLOPs that updating the fast weights adds to applying them, for ``tokens`` tokens.

        Per head and mini-batch of K: gradients at W0 (XK W0, 2Kd^2), the K x K
        products of the dual form (XQ XK^T, (eta*A) G, eta G: 6K^2 d) and the
        end-of-mini-batch update (2Kd^2). LayerNorm backward and elementwise
        work are left out. Applying (XQ W0) is paid by skipped chunks too.
        """
        c = self.config
        K, d = c.mini_batch, c.head_dim
        return c.n_head * (tokens // K) * (4 * K * d * d + 6 * K * K * d)

    def step(self, state: TTTState, x, lam):
        """One token per row in primal form: the decode path.

        Args:
          state: the rows' TTT state; x: [B, D]; lam: [B] gate scale of the
            mini-batch this token belongs to.

        Returns:
          ``(y [B, D], new_state)``.
        """
        c = self.config
        K, d = c.mini_batch, c.head_dim
        XQ, XK, target, sigma, history = self.heads(x[:, None], state.conv_history, state.count)
        XQ, XK, target, sigma = XQ[:, :, 0], XK[:, :, 0], target[:, :, 0], sigma[:, :, 0]  # [B, H, d], [B, H]
        ln = lambda z: _head_ln(z, self.ttt_ln_scale[...], self.ttt_ln_bias[...], c.ln_eps)
        # Gradient of this token's loss at the mini-batch-start weights.
        Z = jnp.einsum("bhi,bhij->bhj", XK, state.W) + state.b  # [B, H, d]
        g = jax.grad(lambda Z: 0.5 * jnp.sum((ln(Z) - target) ** 2))(Z)  # [B, H, d]
        sum_W = state.sum_W + sigma[..., None, None] * XK[..., :, None] * g[..., None, :]
        sum_b = state.sum_b + sigma[..., None] * g
        i = state.count % K  # [B] position inside the mini-batch
        coef = (c.base_lr / d) * lam * self.tau()[i]  # [B]
        W_i = state.W - coef[:, None, None, None] * sum_W
        b_i = state.b - coef[:, None, None] * sum_b
        heads_out = XQ + ln(jnp.einsum("bhi,bhij->bhj", XQ, W_i) + b_i)  # [B, H, d]
        # When the mini-batch closes, its end weights (settled) become the next start.
        end = i == K - 1  # [B]
        W_end, b_end, refused = settle(state.W, state.b, W_i, b_i, c.max_update_norm)
        new_state = TTTState(
            W=jnp.where(end[:, None, None, None], W_end, state.W),
            b=jnp.where(end[:, None, None], b_end, state.b),
            sum_W=jnp.where(end[:, None, None, None], 0.0, sum_W),
            sum_b=jnp.where(end[:, None, None], 0.0, sum_b),
            conv_history=history,
            count=state.count + 1,
            refused=state.refused + jnp.where(end, refused.sum(-1), 0),
        )
        return self._output(x[:, None], heads_out[:, :, None])[:, 0], new_state

    def extend(self, state: TTTState, x, lam):
        """Feeds T tokens per row token by token (any length, any starting offset).

        Args:
          x: [B, T, D]; lam: [B, T] gate scale of each token's mini-batch.

        Returns:
          ``(y [B, T, D], new_state)``.
        """

        def one(state, inputs):
            y, state = self.step(state, *inputs)
            return state, y

        state, y = jax.lax.scan(one, state, (x.swapaxes(0, 1), lam.T))
        return y.swapaxes(0, 1), state
