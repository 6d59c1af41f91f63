"""Single-stream decode and prefill speed: ponder vs Hugging Face transformers.

Both run the same weights (ours exported with ``model.hf.export_hf`` and
loaded by ``GPT2LMHeadModel``), the same prompt and the same number of greedy
new tokens, in the same process, taking turns within every round (this VM's speed
drifts). Warm-up runs are excluded; each figure is the median of ``--runs``
timed rounds. Prefill model-FLOPs utilisation is measured
against a large jitted f32 matmul timed in the same run.

    python bench/decode.py [--preset tiny] [--prompt-tokens 32] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from ponder.runtime import configure_process

configure_process()
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from timing import interleaved_medians, peak_matmul
from transformers import GPT2LMHeadModel

from ponder.model.config import GPTConfig
from ponder.model.generate import SamplingParams, prefill, stream_tokens
from ponder.model.gpt2 import KVCache, forward, init_model
from ponder.model.hf import export_hf
from ponder.model.sampling import Sampling, ring
from ponder.model.tokenizer import Tokenizer


def forward_flops(config: GPTConfig, T: int, logit_positions: int) -> float:
    """Model FLOPs of a forward over T tokens with LM-head logits at ``logit_positions``.

    Attention is counted for the causal pairs only (T(T+1)/2), whatever the
    implementation computes, so the figure is the useful work.
    """
    D, L = config.n_embd, config.n_layer
    matmuls = L * 2 * (3 * D * D + D * D + 8 * D * D) * T
    attention = L * 2 * 2 * D * T * (T + 1) // 2  # QK^T and PV
    return matmuls + attention + 2 * D * config.vocab_size * logit_positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    config = GPTConfig.preset(args.preset, vocab_size=args.vocab_size)
    ours = init_model(config, seed=0)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, config.vocab_size, args.prompt_tokens)]
    no_eot = -1  # neither side may stop early
    with tempfile.TemporaryDirectory() as tmp:
        # Only the tokenizer's end-of-document id reaches the HF config; nothing is tokenized.
        export_hf(ours, Tokenizer.train(["pass\n"], vocab_size=300), tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp).eval()

    # Decode: prompt -> N greedy tokens, end to end (prefill included) on both sides.
    params = SamplingParams(max_new_tokens=args.new_tokens)
    ours_tokens = []

    def ours_generate():
        ours_tokens[:] = [t for block in stream_tokens(ours, prompt, params, no_eot) for t in block]

    hf_prompt = torch.tensor([prompt])
    hf_tokens = []

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(
                hf_prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                use_cache=True, pad_token_id=0, eos_token_id=None,
            )
        hf_tokens[:] = out[0, len(prompt):].tolist()

    decode = interleaved_medians({"ours": ours_generate, "hf": hf_generate}, args.runs)
    ours_decode, hf_decode = decode["ours"], decode["hf"]
    same_tokens = ours_tokens == hf_tokens

    # Prefill as `ponder generate` does it: ingest T prompt tokens at the start of
    # a document into the KV cache, logits (and the first token) at the last position only.
    T = min(args.prefill_tokens, config.n_positions)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, T)), jnp.int32)
    graphdef, state = nnx.split(ours)
    zeros_i = jnp.zeros((1,), jnp.int32)
    rows, recent = Sampling().rows(config.n_positions, T), ring(np.asarray(tokens[0]), config.n_positions)

    def ours_prefill_call():
        cache = KVCache.init(config, 1, T)
        _, first = prefill(
            graphdef, state, tokens, jnp.asarray([T]), zeros_i, cache, jax.random.key(0)[None], rows, recent, no_eot,
            fresh=True,
        )
        first.block_until_ready()

    hf_input = torch.tensor(np.asarray(tokens))

    def hf_prefill_call():
        with torch.no_grad():
            hf(hf_input, use_cache=True, logits_to_keep=1).logits.argmax(-1)


    # Full forward (as in training): logits at every position, no cache.
    positions = jnp.arange(T)[None]

    def hf_forward():
        with torch.no_grad():
            hf(hf_input, use_cache=False)

    matmul, matmul_flops = peak_matmul()
    prefill_times = interleaved_medians(
        {
            "matmul": matmul,  # timed in the same rounds, so MFU sees the same drift
            "ours_prefill": ours_prefill_call,
            "hf_prefill": hf_prefill_call,
            "ours_full": lambda: forward(graphdef, state, tokens, positions)[0].block_until_ready(),
            "hf_full": hf_forward,
        },
        args.runs,
    )
    ours_prefill, hf_prefill = prefill_times["ours_prefill"], prefill_times["hf_prefill"]
    ours_full, hf_full = prefill_times["ours_full"], prefill_times["hf_full"]
    peak = matmul_flops / prefill_times["matmul"]
    prefill_flops = forward_flops(config, T, 1)
    full_flops = forward_flops(config, T, T)

    n = args.new_tokens
    results = {
        "preset": args.preset,
        "vocab_size": config.vocab_size,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": n,
        "ours_decode_tokens_per_s": n / ours_decode,
        "hf_decode_tokens_per_s": n / hf_decode,
        "decode_speedup": hf_decode / ours_decode,
        "greedy_tokens_identical": same_tokens,
        "prefill_tokens": T,
        "ours_prefill_tokens_per_s": T / ours_prefill,
        "hf_prefill_tokens_per_s": T / hf_prefill,
        "prefill_speedup": hf_prefill / ours_prefill,
        "matmul_peak_gflops": peak / 1e9,
        "prefill_gflops": prefill_flops / ours_prefill / 1e9,
        "prefill_mfu": prefill_flops / ours_prefill / peak,
        "ours_full_forward_tokens_per_s": T / ours_full,
        "hf_full_forward_tokens_per_s": T / hf_full,
        "full_forward_speedup": hf_full / ours_full,
        "full_forward_mfu": full_flops / ours_full / peak,
        "torch_threads": torch.get_num_threads(),
        "jax_backend": jax.default_backend(),
    }
    print(f"decode  ({args.prompt_tokens}-token prompt, {n} greedy tokens, batch 1, end to end)")
    print(f"  ponder       {results['ours_decode_tokens_per_s']:8.1f} tokens/s")
    print(f"  transformers {results['hf_decode_tokens_per_s']:8.1f} tokens/s")
    print(f"  ratio        {results['decode_speedup']:8.2f}x   (same greedy tokens: {same_tokens})")
    print(f"prefill ({T}-token prompt into the KV cache, first token sampled, batch 1)")
    print(f"  ponder       {results['ours_prefill_tokens_per_s']:8.1f} tokens/s")
    print(f"  transformers {results['hf_prefill_tokens_per_s']:8.1f} tokens/s   (logits_to_keep=1)")
    print(f"  ratio        {results['prefill_speedup']:8.2f}x")
    print(f"  {results['prefill_gflops']:.1f} GFLOP/s = {100 * results['prefill_mfu']:.0f}% of a jitted 2048^3 f32 "
          f"matmul ({results['matmul_peak_gflops']:.1f} GFLOP/s)")
    print(f"full forward ({T} tokens, logits at every position, no cache)")
    print(f"  ponder       {results['ours_full_forward_tokens_per_s']:8.1f} tokens/s")
    print(f"  transformers {results['hf_full_forward_tokens_per_s']:8.1f} tokens/s")
    print(f"  ratio        {results['full_forward_speedup']:8.2f}x   ({100 * results['full_forward_mfu']:.0f}% of matmul peak)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
