"""What a decode step's matrix products cost by rows: XLA against NumPy's BLAS on the same weights.

A decode step multiplies B rows (one per busy slot) by every weight matrix,
so at batch 1 it is a matrix-vector product and its cost is reading the
weights; with B rows the weights should still be read once. This times
``--layers`` products of [B, D] by a [D, 4D] f32 matrix (GPT-2's MLP
shape, 124M: D = 768), chained so none can be skipped, jitted in XLA and
as B one-row products (XLA runs independent products on
separate threads), and in NumPy (its BLAS, with its own threads), and reports ms and the weight
bytes read per second. Rounds interleave both sides (``timing.interleaved_medians``).

    python bench/small_dot.py [--width 768] [--rows 1,2,4,8] [--layers 12] [--runs 10]
"""

from __future__ import annotations

import argparse

from ponder.runtime import configure_process

configure_process()
import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians, streaming_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    D, rows = args.width, [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((D, 4 * D)) / np.sqrt(D)).astype(np.float32) for _ in range(args.layers)]
    device_weights = [jnp.asarray(w) for w in weights]

    @jax.jit
    def xla_chain(x, ws):
        for w in ws:
            x = (x @ w)[:, :D]  # [B, D]
        return x

    @jax.jit
    def xla_rowwise_chain(x, ws):
        for w in ws:
            x = jnp.concatenate([x[b : b + 1] @ w for b in range(x.shape[0])])[:, :D]  # B one-row products
        return x

    def numpy_chain(x):
        for w in weights:
            x = (x @ w)[:, :D]
        return x

    calls = {}
    for B in rows:
        x = rng.standard_normal((B, D), dtype=np.float32)
        xd = jnp.asarray(x)
        xla_chain(xd, device_weights).block_until_ready()
        calls["xla", B] = lambda xd=xd: xla_chain(xd, device_weights).block_until_ready()
        calls["numpy", B] = lambda x=x: numpy_chain(x)
        xla_rowwise_chain(xd, device_weights).block_until_ready()
        calls["xla rowwise", B] = lambda xd=xd: xla_rowwise_chain(xd, device_weights).block_until_ready()
    read, read_bytes = streaming_read()
    bandwidth = read_bytes / interleaved_medians({"read": read}, 5)["read"]
    del read
    times = interleaved_medians(calls, args.runs)
    weight_bytes = sum(w.nbytes for w in weights)
    print(f"{args.layers} x [B, {D}] @ [{D}, {4 * D}] f32 ({weight_bytes / 2**20:.0f} MiB of weights); "
          f"streaming read {bandwidth / 1e9:.1f} GB/s; jax {jax.__version__}, numpy {np.__version__}")
    print("| rows | XLA ms (weights GB/s) | XLA, one product per row | NumPy ms (weights GB/s) | XLA B rows / 1 row |")
    print("|---|---|---|---|---|")
    for B in rows:
        cell = lambda side: f"{times[side, B] * 1e3:.2f} ({weight_bytes / times[side, B] / 1e9:.1f})"
        print(f"| {B} | {cell('xla')} | {cell('xla rowwise')} | {cell('numpy')} | {times['xla', B] / times['xla', rows[0]]:.2f}x |")


if __name__ == "__main__":
    main()
