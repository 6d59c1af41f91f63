"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, runs: int, warmup: int = 2) -> dict:
    """Median seconds of each function, timed in turn within every round.

    This VM's speed drifts by tens of percent within seconds; alternating the
    contenders exposes them to the same drift, so their ratio stays meaningful.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_matmul(n: int = 2048):
    """A large jitted f32 matmul (the peak that MFU is measured against) and its FLOPs."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    return (lambda: matmul(a, b).block_until_ready()), 2 * n**3


def streaming_read(mib: int = 512):
    """A jitted sum over an f32 array far larger than the caches (the DRAM read rate) and its bytes."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return (lambda: total(x).block_until_ready()), x.nbytes
