"""Cost of the TTT layer over the base model alone, prefill and decode.

Same base weights (random `tiny`), one TTT-Linear layer (4 heads, K = 16,
chunks of 64) on top. Prefill: the full TTT forward (base logits for the gate
features, chunk scan, final logits at every position) at UPDATE_1 (lam = 1
everywhere) and at a 50% update rate (RANDOM schedule: skipped chunks take
the real skip), against the base model's forward with logits at every
position. Decode: one jitted call per token on both sides, every token
updating (the decode step has no skip yet, so 50% costs what 100% does).
Medians after warm-up, same process.

    python bench/ttt_overhead.py [--prefill-tokens 1024] [--decode-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import model  # noqa: F401  (XLA flags)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import GPTConfig
from model.gating import Schedule
from model.gpt2 import KVCache
from model.ttt import TTTConfig
from model.ttt_lm import TTTLMConfig, TTTTransformerLM
from timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--json")
    args = parser.parse_args()

    base_config = GPTConfig.tiny()
    config = TTTLMConfig(base=base_config, ttt=TTTConfig(width=base_config.n_embd, n_head=4, mini_batch=16))
    lm = TTTTransformerLM(config, rngs=nnx.Rngs(0))
    T = args.prefill_tokens
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, base_config.vocab_size, (1, T)), jnp.int32)
    positions = jnp.arange(T)[None]

    # Split once and pass state as an argument: nnx.jit re-walks the module graph
    # on every call (milliseconds), which would swamp a per-token timing.
    graphdef, state = nnx.split(lm)
    base_graphdef, base_state = nnx.split(lm.base)
    base_forward = jax.jit(lambda s, t, p: nnx.merge(base_graphdef, s)(t, p)[0])
    update_all = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p, Schedule("update")))
    update_half = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p, Schedule("random", rate=0.5, seed=0)))
    prefill = interleaved_medians(
        {
            "base": lambda: base_forward(base_state, tokens, positions).block_until_ready(),
            "update": lambda: update_all(state, tokens, positions).logits.block_until_ready(),
            "half": lambda: update_half(state, tokens, positions).logits.block_until_ready(),
        },
        args.runs,
    )
    base_prefill, ttt_prefill, half_prefill = prefill["base"], prefill["update"], prefill["half"]
    half_rate = float(update_half(state, tokens, positions).chunk_updated.mean())

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

    decode = interleaved_medians({"base": decode_base, "ttt": decode_ttt}, args.runs)
    base_decode, ttt_decode = decode["base"] / n, decode["ttt"] / n
    results = {
        "prefill_tokens": T,
        "base_prefill_ms": 1e3 * base_prefill,
        "ttt_update1_prefill_ms": 1e3 * ttt_prefill,
        "prefill_ratio_update1": ttt_prefill / base_prefill,
        "half_update_rate": half_rate,
        "ttt_half_prefill_ms": 1e3 * half_prefill,
        "prefill_ratio_half": half_prefill / base_prefill,
        "base_decode_ms_per_token": 1e3 * base_decode,
        "ttt_update1_decode_ms_per_token": 1e3 * ttt_decode,
        "decode_ratio_update1": ttt_decode / base_decode,
    }
    print(f"prefill {T} tokens: base {results['base_prefill_ms']:.1f} ms, TTT UPDATE_1 "
          f"{results['ttt_update1_prefill_ms']:.1f} ms -> {results['prefill_ratio_update1']:.2f}x; "
          f"{100 * half_rate:.0f}% of chunks updated {results['ttt_half_prefill_ms']:.1f} ms -> "
          f"{results['prefill_ratio_half']:.2f}x")
    print(f"decode per token:   base {results['base_decode_ms_per_token']:.2f} ms, TTT UPDATE_1 "
          f"{results['ttt_update1_decode_ms_per_token']:.2f} ms -> {results['decode_ratio_update1']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
