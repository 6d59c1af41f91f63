"""Reduced-precision weight storage for serving (``ponder serve --weights bfloat16|int8``).

A decode step reads every weight once, so the bytes a token costs are the
base's parameters; storing them in fewer bits is what makes decoding faster
on a machine whose memory, not arithmetic, sets the pace.

- ``bfloat16``: the blocks' kernels and the token table are stored in
  bfloat16; products take bfloat16 inputs and accumulate in float32.
- ``int8``: each kernel column (each token-table row) is stored as int8
  with one float32 scale, ``max |w| / 127`` (symmetric, per output). A
  product quantizes its input rows the same way at run time (one scale per
  token) and multiplies int8 by int8 into int32, then applies both scales.

Why the inputs are quantized too rather than the weights widened inside the
product: XLA fuses a widening ``convert`` of the weights into the product
and emits the pair as its own loop, which on CPU was 10x slower than the
float32 product (12 GPT-2 MLP products, one row: 40 ms against 3.3 ms),
while an int8 x int8 product runs on the CPU library's integer kernels and
on a GPU's integer tensor cores. For the same reason a single row is padded
to two: XLA:CPU runs a one-row product of these types as a plain loop (34
ms for those 12 products), two rows through the library (2.8 ms).

Everything else stays float32: LayerNorms, biases, position embeddings, the
TTT layer and its gate, and every fast weight. Fast weights that replace a
base kernel (In-Place TTT's ``W_down``) keep that kernel as it was. Gradients
through a quantized product (LoRA's updates back-propagate through the
blocks and the head) are those of the dequantized layer, computed with the
same int8 product on the transposed weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHTS = ("float32", "bfloat16", "int8")
_INT8_MAX = 127.0


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    return weights


def _scales(a, axis: int):
    """Symmetric int8 scales of ``a`` along ``axis`` (kept): ``max |a| / 127``, 1 where all zero."""
    scale = jnp.max(jnp.abs(a), axis=axis, keepdims=True) / _INT8_MAX
    return jnp.where(scale > 0, scale, 1.0)


def quantize_int8(a, axis: int):
    """``(int8 values, float32 scales)`` of ``a`` with one scale per slice along ``axis``."""
    a = a.astype(jnp.float32)
    scale = _scales(a, axis)
    return jnp.round(a / scale).astype(jnp.int8), scale


def _int8_rows_dot(x, w, w_scale, contract: int):
    """[M, K] float rows times an int8 matrix; ``w`` is [K, N] (``contract`` 0) or [N, K] (1); -> [M, N] f32."""
    xq, x_scale = quantize_int8(x, axis=1)  # [M, K], [M, 1]
    y = jax.lax.dot_general(xq, w, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.int32)
    return y.astype(jnp.float32) * x_scale * w_scale.reshape(1, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _int8_product(x, w, w_scale, contract: int):
    return _int8_rows_dot(x, w, w_scale, contract)


def _int8_product_fwd(x, w, w_scale, contract):
    return _int8_rows_dot(x, w, w_scale, contract), (w, w_scale)


def _int8_product_bwd(contract, saved, dy):
    # y = x (w * scale), the scale along w's output dimension, so dx = (dy * scale) w^T: the same
    # int8 product, contracting w's other dimension.
    w, w_scale = saved
    dx = _int8_rows_dot(dy * w_scale.reshape(1, -1), w, jnp.ones((w.shape[contract],)), 1 - contract)
    return dx, np.zeros(w.shape, jax.dtypes.float0), jnp.zeros_like(w_scale)


_int8_product.defvjp(_int8_product_fwd, _int8_product_bwd)


def product(x, w, w_scale=None, *, transposed: bool = False):
    """``x`` [..., K] times a stored matrix: [K, N], or [N, K] when ``transposed``; -> [..., N] float32.

    ``w`` is bfloat16, or int8 with its scales in ``w_scale`` [N]. One row is
    computed as two (see the module docstring).
    """
    lead, K = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if M == 1:
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
    if w.dtype == jnp.int8:
        y = _int8_product(rows.astype(jnp.float32), w, w_scale, 1 if transposed else 0)
    else:
        dims = (((1,), (1 if transposed else 0,)), ((), ()))
        y = jax.lax.dot_general(rows.astype(w.dtype), w, dims, preferred_element_type=jnp.float32)
    return y[:M].reshape(*lead, -1)


def _stored(matrix, weights: str):
    """``matrix`` [N, K] as held in ``weights``: ``(values, scales)``, the scales [N] (int8) or None, as variables."""
    if weights == "int8":
        values, scale = quantize_int8(matrix, axis=1)  # [N, K], [N, 1]
        return nnx.Param(values), nnx.Param(scale[:, 0])
    return nnx.Param(matrix.astype(jnp.bfloat16)), nnx.data(None)


def _times_rows(x, values, scale):
    """``x`` [..., K] times the transpose of a ``_stored`` matrix [N, K] -> [..., N] float32."""
    return product(x, values[...], None if scale is None else scale[...], transposed=True)


class Linear(nnx.Module):
    """A frozen ``nnx.Linear`` whose kernel is stored in ``weights``, transposed: ``weight`` [out, in].

    The products read it along its rows (the contracted dimension minor), which
    XLA:CPU's int8 and bfloat16 kernels run 1.3-3x faster than the [in, out]
    layout for a few rows (GPT-2's MLP down projection in int8: 1.2 ms against
    4.0 for 12 layers, two rows).
    """

    def __init__(self, linear: nnx.Linear, weights: str):
        self.weight, self.scale = _stored(linear.kernel[...].T, weights)
        self.bias = nnx.data(None) if linear.bias is None else nnx.Param(linear.bias[...])
        self.dtype = linear.dtype

    def __call__(self, x):
        y = _times_rows(x, self.weight, self.scale)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """A frozen token table [V, D] stored in ``weights`` (int8: one scale per row); also the tied LM head."""

    def __init__(self, embed: nnx.Embed, weights: str):
        self.embedding, self.scale = _stored(embed.embedding[...], weights)
        self.dtype = embed.dtype

    def __call__(self, tokens):
        rows = self.embedding[...][tokens].astype(jnp.float32)  # [..., D]
        if self.scale is not None:
            rows = rows * self.scale[...][tokens][..., None]
        return rows.astype(self.dtype)

    def logits(self, hidden):
        """[..., D] -> [..., V] float32: ``hidden`` times the table's transpose."""
        return _times_rows(hidden, self.embedding, self.scale)


def quantize(model, weights: str, keep=()):
    """Stores ``model``'s (a ``GPT``) token table, LM head and block kernels in ``weights``, in place.

    ``keep``: ``nnx.Linear`` modules left as they are (kernels that fast
    weights replace). ``float32`` changes nothing. Returns ``model``.
    """
    if check_weights(weights) == "float32":
        return model
    kept = {id(m) for m in keep}
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            linear = getattr(parent, name)
            if id(linear) not in kept:
                setattr(parent, name, Linear(linear, weights))
    model.wte = Embed(model.wte, weights)
    if model.lm_head is not None:
        model.lm_head = Embed(model.lm_head, weights)
    return model


def quantize_lm(model, weights: str):
    """``quantize`` for any model ponder serves: a ``GPT``, or a fast-weight LM holding one as ``base``.

    Kernels the fast weights replace (``model.replaced_kernels``, In-Place
    TTT's ``W_down``) stay as they are. Returns ``model``.
    """
    base = getattr(model, "base", model)
    quantize(base, weights, keep=getattr(model, "replaced_kernels", ()))
    return model
