"""Cost of the TTT layer over the base model alone, prefill and decode.

Same base weights (random `tiny`), one TTT-Linear layer (4 heads, K = 16) on
top, every mini-batch updated (UPDATE_1, lam = 1). Both sides are jitted and
timed in the same process; medians after warm-up.

    python bench/ttt_overhead.py [--prefill-tokens 1024] [--decode-tokens 128]

Not measurable yet: the 50%-update-rate figures, which need the gating
network's real skip (issue 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import model  # noqa: F401  (XLA flags)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import GPTConfig
from model.gpt2 import KVCache
from model.ttt import TTTConfig
from model.ttt_lm import TTTLMConfig, TTTTransformerLM


def median_seconds(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()

    base_config = GPTConfig.tiny()
    config = TTTLMConfig(base=base_config, ttt=TTTConfig(width=base_config.n_embd, n_head=4, mini_batch=16))
    lm = TTTTransformerLM(config, rngs=nnx.Rngs(0))
    T, K = args.prefill_tokens, config.ttt.mini_batch
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, base_config.vocab_size, (1, T)), jnp.int32)
    positions = jnp.arange(T)[None]
    lam = jnp.ones((1, T // K))

    # Split once and pass state as an argument: nnx.jit re-walks the module graph
    # on every call (milliseconds), which would swamp a per-token timing.
    graphdef, state = nnx.split(lm)
    base_graphdef, base_state = nnx.split(lm.base)
    base_forward = jax.jit(lambda s, t, p: nnx.merge(base_graphdef, s)(t, p)[0])
    ttt_forward = jax.jit(lambda s, t, p, lam: nnx.merge(graphdef, s)(t, p, lam)[0])
    base_prefill = median_seconds(lambda: base_forward(base_state, tokens, positions).block_until_ready(), args.runs)
    ttt_prefill = median_seconds(lambda: ttt_forward(state, tokens, positions, lam).block_until_ready(), args.runs)

    # Decode: one jitted call per token on both sides, from the start of a document.
    n = args.decode_tokens
    base_step = jax.jit(
        lambda s, t, p, c: nnx.merge(base_graphdef, s)(t[:, None], p[:, None], c)[::2], donate_argnums=3
    )
    ttt_step = jax.jit(lambda s, *args: nnx.merge(graphdef, s).step(*args), donate_argnums=3)
    ones = jnp.ones((1,))

    def decode_base():
        cache = KVCache.init(base_config, 1, 256)
        for i in range(n):
            logits, cache = base_step(base_state, tokens[:, i], positions[:, i], cache)
        logits.block_until_ready()

    def decode_ttt():
        cache, states = KVCache.init(base_config, 1, 256), lm.init_states(1)
        for i in range(n):
            logits, cache, states = ttt_step(state, tokens[:, i], positions[:, i], cache, states, ones)
        logits.block_until_ready()

    base_decode = median_seconds(decode_base, args.runs) / n
    ttt_decode = median_seconds(decode_ttt, args.runs) / n
    results = {
        "prefill_tokens": T,
        "base_prefill_ms": 1e3 * base_prefill,
        "ttt_update1_prefill_ms": 1e3 * ttt_prefill,
        "prefill_ratio_update1": ttt_prefill / base_prefill,
        "base_decode_ms_per_token": 1e3 * base_decode,
        "ttt_update1_decode_ms_per_token": 1e3 * ttt_decode,
        "decode_ratio_update1": ttt_decode / base_decode,
    }
    print(f"prefill {T} tokens: base {results['base_prefill_ms']:.1f} ms, TTT UPDATE_1 "
          f"{results['ttt_update1_prefill_ms']:.1f} ms -> {results['prefill_ratio_update1']:.2f}x")
    print(f"decode per token:   base {results['base_decode_ms_per_token']:.2f} ms, TTT UPDATE_1 "
          f"{results['ttt_update1_decode_ms_per_token']:.2f} ms -> {results['decode_ratio_update1']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
