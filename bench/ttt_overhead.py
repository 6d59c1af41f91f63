"""Cost of the TTT layer over the base model alone, prefill and decode.

Same base weights (random `tiny`), one TTT-Linear layer (4 heads, K = 16,
chunks of 64) on top. Prefill: the full TTT forward (base logits for the gate
features, chunk scan, final logits at every position) at UPDATE_1 (lam = 1
everywhere) and at a 50% update rate (RANDOM schedule: skipped chunks take
the real skip), against the base model's forward with logits at every
position. Decode: one jitted call per token on both sides, at UPDATE_1 and
at the same 50% RANDOM schedule (a skipped chunk's steps take the real skip;
closing a chunk computes the gate features for the next one). Both also at
the threshold gate aiming at 50%: a schedule that reads the chunk features,
which cost an LM head over the base hidden states (fixed schedules skip them).
Medians after warm-up, same process.

``--kinds inplace,lora`` adds the other fast-weight kinds on the same base
weights, with their default configs (In-Place TTT: the top block's W_down,
chunks of 64; LoRA: adapters on Q, V and the MLP of every block of `tiny`,
chunks of 16, one SGD step per chunk): prefill and decode at SKIP and
UPDATE_1 against the same base timings, timed in the same rounds; LoRA also
under its read gate (random weights) at a 50% budget, which scores every
token of a chunk read (the in-chunk loss and entropy over the vocabulary).

``--preset gpt2`` runs all of it on a random base of GPT-2 small's shape
(124M, vocab 8192) instead of `tiny`.

    python bench/ttt_overhead.py [--prefill-tokens 1024] [--decode-tokens 256] [--kinds inplace,lora] [--preset gpt2]
"""

from __future__ import annotations

import argparse
import json

from ponder.runtime import configure_process

configure_process()
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import interleaved_medians

from ponder.model.config import GPTConfig
from ponder.model.gating import Schedule
from ponder.model.gpt2 import KVCache
from ponder.model.inplace import InPlaceLM, InPlaceLMConfig
from ponder.model.lora import LoRAConfig, LoRALM, LoRALMConfig
from ponder.model.ttt import TTTConfig
from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM

HALF = Schedule("random", rate=0.5, seed=0)  # every other chunk on average, skipped chunks skip for real
GATED = Schedule("threshold", rate=0.5)  # a gate that reads the chunk features (base CE/entropy, TTT losses)
BUDGET = Schedule("learned_budget", rate=0.5)  # LoRA's read gate (model.read_gate) at a 50% budget


class FastWeights:
    """An In-Place TTT or LoRA model on ``base`` (default config), its prefill and decode as timed closures."""

    def __init__(self, kind: str, base):
        if kind == "inplace":
            config = InPlaceLMConfig(base.config)
            self.model = InPlaceLM(config, rngs=nnx.Rngs(0), base=base)
            # W_target starts at zero (every update would be zero work of the same cost); make it non-zero anyway.
            self.model.W_target[...] = jnp.full(self.model.W_target.shape, 1e-3)
        else:
            lora = LoRAConfig(layers=min(LoRAConfig.layers, base.config.n_layer))
            config = LoRALMConfig(base.config, lora, gate=LoRALMConfig.read_gate(lora.chunk))
            self.model = LoRALM(config, rngs=nnx.Rngs(0), base=base)
            # A read gate whose score varies from chunk to chunk (an untrained one scores every chunk alike).
            self.model.gate.out.kernel[...] = jax.random.normal(jax.random.key(1), self.model.gate.out.kernel.shape)
        self.graphdef, self.state = nnx.split(self.model)
        self.schedules = {"skip": Schedule("skip"), "update": Schedule("update")}
        if kind == "lora":
            self.schedules["budget"] = BUDGET
        self.forward = {name: jax.jit(lambda s, t, p, sch=sch: nnx.merge(self.graphdef, s)(t, p, sch).logits)
                        for name, sch in self.schedules.items()}
        self.step = {name: jax.jit(lambda s, *a, sch=sch: nnx.merge(self.graphdef, s).step(*a, sch), donate_argnums=(3, 4))
                     for name, sch in self.schedules.items()}

    def prefill(self, name, tokens, positions):
        return lambda: self.forward[name](self.state, tokens, positions).block_until_ready()

    def decode(self, name, tokens, positions):
        def run():
            cache, doc = KVCache.init(self.model.config.base, 1, 512), self.model.init_state(1, self.schedules[name])
            for i in range(tokens.shape[1]):
                logits, cache, doc = self.step[name](self.state, tokens[:, i], positions[:, i], cache, doc)
            logits.block_until_ready()

        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--kinds", default="", help="comma-separated: inplace, lora (besides the TTT layer)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "gpt2"], help="the random base's shape")
    parser.add_argument("--json")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - {"inplace", "lora"}:
        parser.error(f"--kinds takes inplace and lora, not {args.kinds}")

    base_config = GPTConfig.tiny() if args.preset == "tiny" else GPTConfig.gpt2(vocab_size=8192)
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
    update_half = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p, HALF))
    update_gated = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p, GATED))
    others = {kind: FastWeights(kind, lm.base) for kind in kinds}
    prefill = interleaved_medians(
        {
            "base": lambda: base_forward(base_state, tokens, positions).block_until_ready(),
            "update": lambda: update_all(state, tokens, positions).logits.block_until_ready(),
            "half": lambda: update_half(state, tokens, positions).logits.block_until_ready(),
            "gated": lambda: update_gated(state, tokens, positions).logits.block_until_ready(),
            **{f"{kind}:{name}": other.prefill(name, tokens, positions)
               for kind, other in others.items() for name in other.schedules},
        },
        args.runs,
    )
    base_prefill, ttt_prefill, half_prefill = prefill["base"], prefill["update"], prefill["half"]
    half_rate = float(update_half(state, tokens, positions).chunk_updated.mean())
    gated_prefill, gated_rate = prefill["gated"], float(update_gated(state, tokens, positions).chunk_updated.mean())

    # Decode: one jitted call per token on both sides, from the start of a document.
    n = args.decode_tokens
    base_step = jax.jit(
        lambda s, t, p, c: nnx.merge(base_graphdef, s)(t[:, None], p[:, None], c)[::2], donate_argnums=3
    )
    def ttt_decoder(schedule):
        step = jax.jit(lambda s, *args: nnx.merge(graphdef, s).step(*args, schedule), donate_argnums=(3, 4))

        def decode():
            cache, doc = KVCache.init(base_config, 1, 512), lm.init_state(1, schedule)
            for i in range(n):
                logits, cache, doc = step(state, tokens[:, i], positions[:, i], cache, doc)
            logits.block_until_ready()

        return decode

    def decode_base():
        cache = KVCache.init(base_config, 1, 512)
        for i in range(n):
            logits, cache = base_step(base_state, tokens[:, i], positions[:, i], cache)
        logits.block_until_ready()

    decode = interleaved_medians(
        {
            "base": decode_base,
            "update": ttt_decoder(Schedule("update")),
            "half": ttt_decoder(HALF),
            "gated": ttt_decoder(GATED),
            **{f"{kind}:{name}": other.decode(name, tokens[:, :n], positions[:, :n])
               for kind, other in others.items() for name in other.schedules},
        },
        args.runs,
    )
    gated_decode = decode["gated"] / n
    gated_decode_rate = float(update_gated(state, tokens[:, :n], positions[:, :n]).chunk_updated.mean())
    base_decode, ttt_decode, half_decode = decode["base"] / n, decode["update"] / n, decode["half"] / n
    half_decode_rate = float(update_half(state, tokens[:, :n], positions[:, :n]).chunk_updated.mean())
    results = {
        "preset": args.preset,
        "prefill_tokens": T,
        "base_prefill_ms": 1e3 * base_prefill,
        "ttt_update1_prefill_ms": 1e3 * ttt_prefill,
        "prefill_ratio_update1": ttt_prefill / base_prefill,
        "half_update_rate": half_rate,
        "ttt_half_prefill_ms": 1e3 * half_prefill,
        "prefill_ratio_half": half_prefill / base_prefill,
        "gated_update_rate": gated_rate,
        "ttt_gated_prefill_ms": 1e3 * gated_prefill,
        "prefill_ratio_gated": gated_prefill / base_prefill,
        "base_decode_ms_per_token": 1e3 * base_decode,
        "ttt_update1_decode_ms_per_token": 1e3 * ttt_decode,
        "decode_ratio_update1": ttt_decode / base_decode,
        "half_decode_update_rate": half_decode_rate,
        "ttt_half_decode_ms_per_token": 1e3 * half_decode,
        "decode_ratio_half": half_decode / base_decode,
        "gated_decode_update_rate": gated_decode_rate,
        "ttt_gated_decode_ms_per_token": 1e3 * gated_decode,
        "decode_ratio_gated": gated_decode / base_decode,
    }
    print(f"prefill {T} tokens: base {results['base_prefill_ms']:.1f} ms, TTT UPDATE_1 "
          f"{results['ttt_update1_prefill_ms']:.1f} ms -> {results['prefill_ratio_update1']:.2f}x; "
          f"{100 * half_rate:.0f}% of chunks updated {results['ttt_half_prefill_ms']:.1f} ms -> "
          f"{results['prefill_ratio_half']:.2f}x; threshold gate ({100 * gated_rate:.0f}% updated) "
          f"{results['ttt_gated_prefill_ms']:.1f} ms -> {results['prefill_ratio_gated']:.2f}x")
    print(f"decode per token:   base {results['base_decode_ms_per_token']:.2f} ms, TTT UPDATE_1 "
          f"{results['ttt_update1_decode_ms_per_token']:.2f} ms -> {results['decode_ratio_update1']:.2f}x; "
          f"{100 * half_decode_rate:.0f}% of chunks updated {results['ttt_half_decode_ms_per_token']:.2f} ms -> {results['decode_ratio_half']:.2f}x; "
          f"threshold gate ({100 * gated_decode_rate:.0f}%) {results['ttt_gated_decode_ms_per_token']:.2f} ms -> "
          f"{results['decode_ratio_gated']:.2f}x")
    for kind in kinds:
        for name in others[kind].schedules:
            key = f"{kind}:{name}"
            results[f"{kind}_{name}_prefill_ratio"] = prefill[key] / base_prefill
            results[f"{kind}_{name}_decode_ms_per_token"] = 1e3 * decode[key] / n
            results[f"{kind}_{name}_decode_ratio"] = decode[key] / n / base_decode
        print(f"{kind}: prefill SKIP {results[f'{kind}_skip_prefill_ratio']:.2f}x, UPDATE_1 "
              f"{results[f'{kind}_update_prefill_ratio']:.2f}x; decode per token SKIP "
              f"{results[f'{kind}_skip_decode_ms_per_token']:.2f} ms -> {results[f'{kind}_skip_decode_ratio']:.2f}x, "
              f"UPDATE_1 {results[f'{kind}_update_decode_ms_per_token']:.2f} ms -> "
              f"{results[f'{kind}_update_decode_ratio']:.2f}x the base")
        if "budget" in others[kind].schedules:
            print(f"{kind} under its read gate at a 50% budget: prefill {results[f'{kind}_budget_prefill_ratio']:.2f}x, "
                  f"decode {results[f'{kind}_budget_decode_ratio']:.2f}x the base")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
