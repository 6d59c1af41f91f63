"""What ``--weights bfloat16|int8`` gives: held-out cross-entropy, decode and prefill speed, bytes.

For one checkpoint, each weight format in turn: the cross-entropy of SKIP
and of the schedule the server uses by default on held-out files (as
``ponder eval`` reads them: files of at least ``--min-tokens``, cut to
``--max-tokens``, windows of ``--window``), the base's parameter bytes, and
the speed of the base alone (TTT off): single-stream decode (``--new-tokens``
greedy tokens after a 32-token prompt, end to end as ``ponder generate``
runs them) and a cold prefill of ``--prefill-tokens``, timed in turns within
every round (``timing.interleaved_medians``), so the ratios share the
machine's drift.

    python bench/weights.py --checkpoint checkpoints/default --corpus runs/corpus --corpus runs/heldout
    python bench/weights.py --checkpoint DIR --speed-only   # DIR: ponder init --preset gpt2
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

from ponder.model import checkpoint
from ponder.model.document import run_document
from ponder.model.gating import Schedule
from ponder.model.generate import SamplingParams, prefill, stream_tokens
from ponder.model.gpt2 import KVCache
from ponder.model.quantize import WEIGHTS
from ponder.model.sampling import Sampling, ring
from ponder.train.evaluate import held_out_documents


def parameter_bytes(model) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))


def speed(bases: dict, new_tokens: int, prefill_tokens: int, runs: int) -> dict:
    """Median seconds of decode and prefill per weight format, the formats taking turns."""
    config = next(iter(bases.values())).config
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, config.vocab_size, 32)]
    params = SamplingParams(max_new_tokens=new_tokens)
    T = min(prefill_tokens, config.n_positions)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, T)), jnp.int32)
    rows, recent = Sampling().rows(config.n_positions, T), ring(np.asarray(tokens[0]), config.n_positions)

    def decode(base):
        return lambda: [t for block in stream_tokens(base, prompt, params, -1) for t in block]

    def cold_prefill(base):
        graphdef, state = nnx.split(base)

        def run():
            _, first = prefill(graphdef, state, tokens, jnp.asarray([T]), jnp.zeros((1,), jnp.int32),
                               KVCache.init(config, 1, T), jax.random.key(0)[None], rows, recent, -1, fresh=True)
            first.block_until_ready()
        return run

    fns = {(w, "decode"): decode(b) for w, b in bases.items()}
    fns.update({(w, "prefill"): cold_prefill(b) for w, b in bases.items()})
    times = interleaved_medians(fns, runs)
    return {w: {"decode_tok_s": new_tokens / times[w, "decode"], "prefill_tok_s": T / times[w, "prefill"]}
            for w in bases}


def cross_entropy(models: dict, documents: list, window: int) -> dict:
    out = {}
    for w, model in models.items():
        schedules = {"SKIP": Schedule("skip")}
        if hasattr(model, "gate"):
            schedules["LEARNED"] = Schedule()  # what `ponder serve` runs by default
        elif hasattr(model, "base"):
            schedules["UPDATE_1"] = Schedule("update")
        for name, schedule in schedules.items():
            nll = np.concatenate([run_document(model, d, schedule, window).nll for d in documents])
            out.setdefault(name, {})[w] = float(nll.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--corpus", action="append", default=[], help="a corpus of `ponder train corpus` (repeatable)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--min-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--max-documents", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=448)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    models = {w: checkpoint.load(args.checkpoint, weights=w)[0] for w in WEIGHTS}
    bases = {w: getattr(m, "base", m) for w, m in models.items()}
    result = {"checkpoint": args.checkpoint, "bytes": {w: parameter_bytes(b) for w, b in bases.items()}}
    result["speed"] = speed(bases, args.new_tokens, args.prefill_tokens, args.runs)
    if not args.speed_only:
        for corpus in args.corpus:
            docs = held_out_documents(corpus, args.window, args.min_tokens, args.max_tokens, args.max_documents)
            result[corpus] = {"documents": len(docs), "tokens": int(sum(len(d) for d in docs)),
                              "ce": cross_entropy(models, docs, args.window)}

    f32 = result["speed"]["float32"]
    print("| weights | base bytes | decode tok/s | prefill tok/s |" + "".join(
        f" {name} CE ({c}) |" for c in args.corpus if c in result for name in result[c]["ce"]))
    print("|---|---|---|---|" + "---|" * sum(len(result[c]["ce"]) for c in args.corpus if c in result))
    for w in WEIGHTS:
        s = result["speed"][w]
        row = (f"| {w} | {result['bytes'][w] / 2**20:.1f} MiB | {s['decode_tok_s']:.1f} ({s['decode_tok_s'] / f32['decode_tok_s']:.2f}×)"
               f" | {s['prefill_tok_s']:.0f} ({s['prefill_tok_s'] / f32['prefill_tok_s']:.2f}×) |")
        for c in args.corpus:
            for ce in result.get(c, {}).get("ce", {}).values():
                row += f" {ce[w]:.4f} ({(ce[w] / ce['float32'] - 1) * 100:+.2f}%) |"
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
