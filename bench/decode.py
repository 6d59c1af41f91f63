"""Single-stream decode and prefill speed: ponder vs Hugging Face transformers.

Both run the same weights (ours exported with ``model.hf.export_hf`` and
loaded by ``GPT2LMHeadModel``), the same prompt and the same number of greedy
new tokens, in the same process. Warm-up runs are excluded; each figure is the
median of ``--runs`` timed runs. Prefill model-FLOPs utilisation is measured
against a large jitted f32 matmul timed in the same run.

    python bench/decode.py [--preset tiny] [--prompt-tokens 32] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import model  # noqa: F401  (XLA flags)
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import GPT2LMHeadModel

from model.config import GPTConfig
from model.generate import SamplingParams, stream_tokens
from model.gpt2 import forward, init_model
from model.hf import export_hf
from model.tokenizer import Tokenizer


def median_seconds(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(n: int, runs: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), runs)


def prefill_flops(config: GPTConfig, T: int) -> float:
    """Forward FLOPs for T tokens: matmuls, attention as computed (full T x T), all-position LM head."""
    D, L = config.n_embd, config.n_layer
    per_token = L * 2 * (3 * D * D + D * D + 8 * D * D) + L * 4 * T * D + 2 * D * config.vocab_size
    return per_token * T


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

    ours_decode = median_seconds(ours_generate, args.runs)
    hf_decode = median_seconds(hf_generate, args.runs)
    same_tokens = ours_tokens == hf_tokens

    # Prefill: one forward over T tokens, logits at every position.
    T = min(args.prefill_tokens, config.n_positions)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, T)), jnp.int32)
    positions = jnp.arange(T)[None]
    graphdef, state = nnx.split(ours)
    ours_prefill = median_seconds(lambda: forward(graphdef, state, tokens, positions)[0].block_until_ready(), args.runs)
    hf_input = torch.tensor(np.asarray(tokens))

    def hf_forward():
        with torch.no_grad():
            hf(hf_input)

    hf_prefill = median_seconds(hf_forward, args.runs)
    peak = matmul_peak_flops(2048, args.runs)
    mfu = prefill_flops(config, T) / ours_prefill / peak

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
        "prefill_gflops": prefill_flops(config, T) / ours_prefill / 1e9,
        "prefill_mfu": mfu,
        "torch_threads": torch.get_num_threads(),
        "jax_backend": jax.default_backend(),
    }
    print(f"decode  ({args.prompt_tokens}-token prompt, {n} greedy tokens, batch 1, end to end)")
    print(f"  ponder       {results['ours_decode_tokens_per_s']:8.1f} tokens/s")
    print(f"  transformers {results['hf_decode_tokens_per_s']:8.1f} tokens/s")
    print(f"  ratio        {results['decode_speedup']:8.2f}x   (same greedy tokens: {same_tokens})")
    print(f"prefill ({T} tokens, batch 1)")
    print(f"  ponder       {results['ours_prefill_tokens_per_s']:8.1f} tokens/s")
    print(f"  transformers {results['hf_prefill_tokens_per_s']:8.1f} tokens/s")
    print(f"  ratio        {results['prefill_speedup']:8.2f}x")
    print(f"  {results['prefill_gflops']:.1f} GFLOP/s = {100 * mfu:.0f}% of a jitted 2048^3 f32 matmul "
          f"({results['matmul_peak_gflops']:.1f} GFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
