"""The test-time-training layer (TTT-Linear and TTT-MLP), in dual and primal form.

A TTT layer holds *fast weights* per head that take a gradient step on a
self-supervised reconstruction loss as the sequence streams in (docs/design.md,
"TTT layer"). Per head, with mini-batches of K tokens:

* ``xqk = x Wq`` (one shared projection); ``XQ = convQ(xqk)``,
  ``XK = convK(xqk)`` are depthwise causal convolutions of width 4 (output i
  sees inputs i-3..i); ``XV = x Wv``. RoPE rotates XQ and XK with position
  ``p mod K``.
* Target ``XV - XK``; fast network ``f(z) = LN_h(z W + b)`` (TTT-Linear) or
  ``LN_h(gelu(z W1 + b1) W2 + b2)`` (TTT-MLP); per-token loss
  ``l_j = 0.5 |f(XK_j) - (XV_j - XK_j)|^2``; all gradients of a mini-batch
  are taken at its start weights.
* Learning rates ``eta_ij = base_lr * lam * tau_i * sigma_j / d`` for j <= i,
  ``sigma_j = sigmoid(theta_h . x_j + beta_h)``, ``tau_i = max(0, 1/(i+1) + ell_i)``.
* Token i sees every fast layer at ``W_i = W0 - sum_{j<=i} eta_ij X_j^T g_j``
  (``X_j`` the layer's input for key j, ``g_j`` the loss gradient at its
  pre-activation); output ``XQ_i + f_{W_i}(XQ_i)`` (residual inside).

Because ``eta_ij`` factorises into ``tau_i * sigma_j``, the primal form keeps
one running sum ``sum_j sigma_j grad_j`` per mini-batch (the decode state,
``TTTLayer.step``); the dual form computes all K outputs of a mini-batch
with matmuls, layer by layer:
``Zbar = Xbar W0 + b0 - (eta * tril(Xbar X^T)) G - eta G``, where ``Xbar`` is
the query's input to that layer (XQ, then gelu of the previous Zbar). The
tests hold the dual form to the primal one.

Incremental decoding: ``TTTState`` holds the fast weights at the current
mini-batch start, the running sums, the convolution history and the token
count; ``step`` advances it by one token (primal form) and ``extend`` by any
number, from any offset. ``__call__`` / ``chunk`` (dual form) run whole
mini-batches from a state on a mini-batch boundary.

Extra steps (UPDATE_k, and a policy choosing k per row): after its first
step, a mini-batch can take k - 1 more gradient steps over all its tokens
(``minibatch_update``, dual form in both paths). They refine only the weights
carried forward, since outputs inside a mini-batch may not see its later
tokens. ``steps`` (static) is the most any row takes and ``row_steps`` [B]
each row's own. The decode path buffers the mini-batch's keys, targets and
sigmas in the state and takes the extra steps at its last token; with
``steps = 1`` none of this code is traced.

Stability: ``settle`` clips each mini-batch's fast-weight change per head
and refuses non-finite updates (counted in the state). ``reset`` returns rows
of a state to the start of a document.

``chunk(update=False)`` and ``step(update=False)`` only apply the fast
weights: the real skip the gate (``model.gating``, ``model.ttt_lm``) takes for
chunks it does not update.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ponder.model.fast_weights import (
    causal_conv,
    dual_minibatch,
    fast_apply,
    gelu,
    head_ln,
    minibatch_update,
    over_rows_and_heads,
    primal_token,
    rope,
    select_rows,
    settle,
)

KINDS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Shape and hyper-parameters of one TTT layer.

    Attributes:
      width: model width D the layer reads and writes.
      n_head: fast-weight heads H; head dim d = width / n_head.
      kind: ``linear`` (one fast layer d -> d) or ``mlp`` (d -> mlp_ratio*d
        -> d with GELU between).
      mlp_ratio: hidden width of the TTT-MLP fast network, in head dims.
      mini_batch: K, tokens per fast-weight update.
      conv_width: taps of the causal Q/K convolutions.
      base_lr: base learning rate of the fast weights.
      rope_theta: RoPE base.
      ln_eps: epsilon of the per-head LayerNorm inside the fast network.
      max_update_norm: cap on the Frobenius norm of one mini-batch's change of
        a head's fast weights (all fast layers, W and b together); None = no cap.
    """

    width: int = 256
    n_head: int = 4
    kind: str = "linear"
    mlp_ratio: int = 4
    mini_batch: int = 16
    conv_width: int = 4
    base_lr: float = 1.0
    rope_theta: float = 10000.0
    ln_eps: float = 1e-6
    max_update_norm: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TTTConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.width % self.n_head:
            raise ValueError(f"TTTConfig.width ({self.width}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"TTTConfig head dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_head

    @property
    def fast_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each fast layer of one head."""
        d = self.head_dim
        return [(d, d)] if self.kind == "linear" else [(d, self.mlp_ratio * d), (self.mlp_ratio * d, d)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TTTState:
    """Fast-weight state of one TTT layer for B sequences: a cache like the KV cache.

    Attributes:
      W: per fast layer [B, H, in, out]; b: per fast layer [B, H, out]: fast
        weights at the current mini-batch start.
      sum_W, sum_b: the same shapes: running ``sum_j sigma_j grad_j`` over the
        current mini-batch so far.
      conv_history: [B, W-1, D]: last inputs of the Q/K convolutions.
      count: [B] tokens seen in the document.
      refused: [B] mini-batch updates refused (per head) for being non-finite.
      minibatch_XK, minibatch_target: [B, H, K, d]; minibatch_sigma: [B, H, K]:
        the current mini-batch's keys, targets and sigmas so far (on a
        boundary, the last mini-batch's), which its extra steps revisit.
        Written only by calls with ``steps > 1``.
    """

    W: tuple
    b: tuple
    sum_W: tuple
    sum_b: tuple
    conv_history: jax.Array
    count: jax.Array
    refused: jax.Array
    minibatch_XK: jax.Array
    minibatch_target: jax.Array
    minibatch_sigma: jax.Array


class TTTLayer(nnx.Module):
    """A TTT layer: slow parameters here, fast weights threaded through as ``TTTState``."""

    def __init__(self, config: TTTConfig, *, rngs: nnx.Rngs):
        self.config = config
        D, H, K = config.width, config.n_head, config.mini_batch
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
        # Initial fast weights of a document: slow parameters, learned in stage 2.
        self.W0 = nnx.List([nnx.Param(normal(rngs.params(), (H, n_in, n_out))) for n_in, n_out in config.fast_shapes])
        self.b0 = nnx.List([nnx.Param(jnp.zeros((H, n_out))) for _, n_out in config.fast_shapes])
        self.ttt_ln_scale = nnx.Param(jnp.ones((H, config.head_dim)))
        self.ttt_ln_bias = nnx.Param(jnp.zeros((H, config.head_dim)))
        self.post_norm = nnx.LayerNorm(D, epsilon=1e-6, rngs=rngs)
        self.wg = nnx.Linear(D, D, use_bias=False, kernel_init=normal, rngs=rngs)
        self.wo = nnx.Linear(D, D, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def initial_fast_weights(self):
        """``(W, b)``: tuples of the per-head initial fast weights [H, in, out] / [H, out]."""
        return tuple(w[...] for w in self.W0), tuple(c[...] for c in self.b0)

    def init_state(self, batch_size: int) -> TTTState:
        """The state at a document start: trained initial fast weights, nothing seen."""
        c = self.config
        B, H, K, d = batch_size, c.n_head, c.mini_batch, c.head_dim
        W0, b0 = self.initial_fast_weights()
        W = tuple(jnp.broadcast_to(w, (B, *w.shape)) for w in W0)
        b = tuple(jnp.broadcast_to(v, (B, *v.shape)) for v in b0)
        history = jnp.zeros((B, c.conv_width - 1, c.width), jnp.float32)
        # Distinct buffers everywhere: states may be donated.
        count, refused = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32)
        zeros = lambda arrays: tuple(jnp.zeros_like(a) for a in arrays)
        return TTTState(
            W, b, zeros(W), zeros(b), history, count, refused,
            minibatch_XK=jnp.zeros((B, H, K, d), jnp.float32),
            minibatch_target=jnp.zeros((B, H, K, d), jnp.float32),
            minibatch_sigma=jnp.zeros((B, H, K), jnp.float32),
        )

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
        return self.wo(gelu(self.wg(x)) * out)

    def tau(self):
        K = self.config.mini_batch
        return jnp.maximum(0.0, 1.0 / jnp.arange(1, K + 1, dtype=jnp.float32) + self.tau_offset[...])  # [K]

    def _apply(self, X, W, b):
        """Fast network with its residual at fixed weights: X [B, H, T, d] -> [B, H, T, d]."""
        apply = over_rows_and_heads(fast_apply, (True, True, True))
        ln = lambda z: head_ln(z, self.ttt_ln_scale[...][:, None], self.ttt_ln_bias[...][:, None], self.config.ln_eps)
        return X + ln(apply(X, W, b))

    def recon_loss(self, XK, target, W, b):
        """Mean per-token reconstruction loss at fixed weights, per row. [B]"""
        apply = over_rows_and_heads(fast_apply, (True, True, True))
        c = self.config
        Z = head_ln(apply(XK, W, b), self.ttt_ln_scale[...][:, None], self.ttt_ln_bias[...][:, None], c.ln_eps)
        return 0.5 * jnp.mean(jnp.sum((Z - target) ** 2, -1), axis=(1, 2))

    def _extra_steps(self, XK, target, sigma, lam, W, b, steps: int, row_steps):
        """Gradient steps 2 .. ``steps`` over one mini-batch, from the weights ``W, b`` after its first.

        Args:
          XK, target: [B, H, K, d]; sigma: [B, H, K]; lam: [B].
          row_steps: [B] steps each row takes: step i changes only rows with
            ``row_steps > i``.

        Returns:
          ``(W, b)`` before settling (the caller settles against the mini-batch start).
        """
        c, tau = self.config, self.tau()

        def one_head(XK, target, sigma, lam, W, b, scale, bias):
            return minibatch_update(XK, target, sigma, tau, lam, W, b, scale, bias, c.base_lr, c.ln_eps)

        update = over_rows_and_heads(one_head, (True, True, True, True, True, True, False, False))
        lam_heads = jnp.broadcast_to(lam[:, None], sigma.shape[:2])  # [B, H]
        for extra in range(1, steps):
            W_next, b_next = update(XK, target, sigma, lam_heads, W, b, self.ttt_ln_scale[...], self.ttt_ln_bias[...])
            more = row_steps > extra  # [B]
            W = tuple(select_rows(more, new, old) for new, old in zip(W_next, W))
            b = tuple(select_rows(more, new, old) for new, old in zip(b_next, b))
        return W, b

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

    def chunk(self, x, lam, state: TTTState | None = None, *, update: bool = True, steps: int = 1, row_steps=None):
        """``__call__`` plus the reconstruction loss before and after, for gating features.

        With ``update=False`` the fast weights are only applied (a skipped
        chunk): no gradients, no K x K products, the same outputs as ``lam = 0``.
        ``steps > 1`` (UPDATE_k) takes up to k - 1 more gradient steps on each
        mini-batch before moving on; they refine the weights carried forward
        only, since outputs inside a mini-batch may not see its later tokens.
        ``step`` with the same ``steps`` and ``row_steps`` carries the same weights.

        Args:
          x, lam, state: as for ``__call__``.
          update: False for a skipped chunk.
          steps: the most gradient steps any row takes per mini-batch (static).
          row_steps: [B] int, each row's steps, at most ``steps``; None = every
            row takes ``steps``.

        Returns:
          ``(y [B, T, D], TTTState, (loss_before [B], loss_after [B]))``: mean
          per-token reconstruction loss at the weights before and after.
        """
        c = self.config
        B, T, D = x.shape
        K, H = c.mini_batch, c.n_head
        if T % K:
            raise ValueError(f"sequence length {T} is not a multiple of the mini-batch size {K}")
        n = T // K
        state = self.init_state(B) if state is None else state
        XQ, XK, target, sigma, history = self.heads(x, state.conv_history, state.count)
        if steps > 1:  # leave the last mini-batch in the buffers, as decoding does
            row_steps = jnp.full((B,), steps, jnp.int32) if row_steps is None else row_steps
            state = dataclasses.replace(
                state, minibatch_XK=XK[:, :, -K:], minibatch_target=target[:, :, -K:], minibatch_sigma=sigma[:, :, -K:]
            )
        if not update:
            new_state = dataclasses.replace(state, conv_history=history, count=state.count + T)
            loss = self.recon_loss(XK, target, state.W, state.b)
            return self._output(x, self._apply(XQ, state.W, state.b)), new_state, (loss, loss)

        as_minibatches = lambda a: a.reshape(B, H, n, K, *a.shape[3:]).swapaxes(1, 2)  # [B, n, H, K, ...]
        tau, ln_scale, ln_bias = self.tau(), self.ttt_ln_scale[...], self.ttt_ln_bias[...]

        def one_head(XQ, XK, target, sigma, lam, W, b, scale, bias):
            return dual_minibatch(XQ, XK, target, sigma, tau, lam, W, b, scale, bias, c.base_lr, c.ln_eps)

        all_heads = jax.vmap(one_head, in_axes=(0, 0, 0, 0, None, 0, 0, 0, 0))  # over H
        all_rows = jax.vmap(all_heads, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None))  # over B

        @jax.checkpoint  # rematerialise each mini-batch in the backward pass
        def scan_step(carry, inputs):
            W0, b0, refused = carry
            out, W1, b1 = all_rows(*inputs, W0, b0, ln_scale, ln_bias)  # out [B, H, K, d]
            if steps > 1:
                _, XK_mb, target_mb, sigma_mb, lam_mb = inputs
                W1, b1 = self._extra_steps(XK_mb, target_mb, sigma_mb, lam_mb, W1, b1, steps, row_steps)
            W, b, refused_now = settle(W0, b0, W1, b1, c.max_update_norm)
            return (W, b, refused + refused_now.sum(-1, dtype=refused.dtype)), out

        inputs = tuple(as_minibatches(a).swapaxes(0, 1) for a in (XQ, XK, target, sigma))  # leading [n]
        carry = (state.W, state.b, state.refused)
        (W, b, refused), out = jax.lax.scan(scan_step, carry, inputs + (lam.T,))  # out [n, B, H, K, d]
        heads_out = out.transpose(1, 2, 0, 3, 4).reshape(B, H, T, -1)  # [B, H, T, d]
        new_state = dataclasses.replace(state, W=W, b=b, conv_history=history, count=state.count + T, refused=refused)
        losses = (self.recon_loss(XK, target, state.W, state.b), self.recon_loss(XK, target, W, b))
        return self._output(x, heads_out), new_state, losses

    def update_flops(self, tokens: int, steps: int = 1) -> int:
        """Matmul FLOPs that updating the fast weights adds to applying them, for ``tokens`` tokens.

        Per head, mini-batch of K and fast layer (in -> out): the keys'
        forward at W0 (2K in out), the backward into the layer below (2K in
        out, all but the first layer), the K x K products of the dual form
        (Xbar X^T: 2K^2 in; (eta*A) G and eta G: 4K^2 out) and the
        end-of-mini-batch update (2K in out). LayerNorm backward and
        elementwise work are left out. Applying the fast weights to the
        queries is paid by skipped chunks too. Each extra step (``steps > 1``)
        costs the gradients and the end-of-mini-batch update again.
        """
        c = self.config
        K = c.mini_batch
        gradients = sum((6 if layer else 4) * K * n_in * n_out for layer, (n_in, n_out) in enumerate(c.fast_shapes))
        products = sum(2 * K * K * n_in + 4 * K * K * n_out for n_in, n_out in c.fast_shapes)
        return c.n_head * (tokens // K) * (steps * gradients + products)

    def step(self, state: TTTState, x, lam, *, update: bool = True, steps: int = 1, row_steps=None):
        """One token per row in primal form: the decode path.

        At a mini-batch's last token, rows with ``row_steps > 1`` take their
        extra steps over the buffered mini-batch (dual form, as ``chunk``
        does), so the weights carried forward equal ``chunk``'s.

        Args:
          state: the rows' TTT state; x: [B, D]; lam: [B] gate scale of the
            mini-batch this token belongs to (the same for all its tokens).
          update: False only applies the fast weights (a skipped chunk): the
            same result as ``lam = 0``, without the gradients.
          steps: the most gradient steps any row takes per mini-batch (static);
            1 traces no buffering and no extra steps.
          row_steps: [B] int, each row's steps, at most ``steps``; None = every
            row takes ``steps``.

        Returns:
          ``(y [B, D], new_state)``.
        """
        c = self.config
        K, d = c.mini_batch, c.head_dim
        XQ, XK, target, sigma, history = self.heads(x[:, None], state.conv_history, state.count)  # [B, H, 1, ...]
        i = state.count % K  # [B] position inside the mini-batch
        if steps > 1:  # buffer the token for its mini-batch's extra steps
            rows = jnp.arange(x.shape[0])
            put = lambda buffer, new: buffer.at[rows, :, i].set(new[:, :, 0])  # slot i of [B, H, K, ...]
            state = dataclasses.replace(
                state,
                minibatch_XK=put(state.minibatch_XK, XK),
                minibatch_target=put(state.minibatch_target, target),
                minibatch_sigma=put(state.minibatch_sigma, sigma),
            )
        if not update:  # the running sums stay as they are: lam = 0 for the whole mini-batch
            heads_out = self._apply(XQ, state.W, state.b)  # [B, H, 1, d]
            new_state = dataclasses.replace(state, conv_history=history, count=state.count + 1)
            return self._output(x[:, None], heads_out)[:, 0], new_state
        XQ, XK, target, sigma = XQ[:, :, 0], XK[:, :, 0], target[:, :, 0], sigma[:, :, 0]  # [B, H, d], [B, H]
        coef = (c.base_lr / d) * lam * self.tau()[i]  # [B]
        token = over_rows_and_heads(
            lambda *args: primal_token(*args, c.ln_eps),
            (True, True, True, True, True, True, True, True, True, False, False),
        )
        coef_heads = jnp.broadcast_to(coef[:, None], sigma.shape)  # [B, H]
        heads_out, W_i, b_i, sum_W, sum_b = token(
            XQ, XK, target, sigma, coef_heads, state.W, state.b, state.sum_W, state.sum_b,
            self.ttt_ln_scale[...], self.ttt_ln_bias[...],
        )  # heads_out [B, H, d]
        # When the mini-batch closes, its end weights (settled) become the next start.
        end = i == K - 1  # [B]
        if steps > 1:
            row_steps = jnp.full_like(state.count, steps) if row_steps is None else row_steps
            extra = lambda: self._extra_steps(
                state.minibatch_XK, state.minibatch_target, state.minibatch_sigma, lam, W_i, b_i, steps, row_steps
            )
            # Most tokens close no mini-batch that wants extra steps: skip their work.
            W_i, b_i = jax.lax.cond(jnp.any(end & (row_steps > 1)), extra, lambda: (W_i, b_i))
        W_end, b_end, refused = settle(state.W, state.b, W_i, b_i, c.max_update_norm)
        at_end = lambda new, old: select_rows(end, new, old)
        new_state = dataclasses.replace(
            state,
            W=jax.tree.map(at_end, W_end, state.W),
            b=jax.tree.map(at_end, b_end, state.b),
            sum_W=jax.tree.map(lambda s: at_end(jnp.zeros_like(s), s), sum_W),
            sum_b=jax.tree.map(lambda s: at_end(jnp.zeros_like(s), s), sum_b),
            conv_history=history,
            count=state.count + 1,
            refused=state.refused + jnp.where(end, refused.sum(-1, dtype=state.refused.dtype), 0),
        )
        return self._output(x[:, None], heads_out[:, :, None])[:, 0], new_state

    def extend(self, state: TTTState, x, lam, *, steps: int = 1, row_steps=None):
        """Feeds T tokens per row token by token (any length, any starting offset).

        Args:
          x: [B, T, D]; lam: [B, T] gate scale of each token's mini-batch.
          steps, row_steps: as for ``step``.

        Returns:
          ``(y [B, T, D], new_state)``.
        """

        def one(state, inputs):
            y, state = self.step(state, *inputs, steps=steps, row_steps=row_steps)
            return state, y

        state, y = jax.lax.scan(one, state, (x.swapaxes(0, 1), lam.T))
        return y.swapaxes(0, 1), state
