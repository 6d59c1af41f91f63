"""One decode step of the server's engine, by rows and keys read.

Times ``server.engine._decode`` (one token for each of the first ``rows``
slots, attention over the first ``keys`` cache slots) on the bundled
checkpoint with every slot busy, as the engine calls it between requests'
tokens: the step the 8-stream throughput goal rests on. Every
(rows, keys) pair takes its turn in every round; medians of ``--runs`` rounds,
with the median count of page faults per step (memory that the step's
temporaries took from the kernel afresh).

    python bench/engine_step.py [--checkpoint DIR] [--keys 128,256,512,768,1024] [--rows 1,8] [--runs 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics

import model  # noqa: F401  (XLA flags)
import jax
import jax.numpy as jnp

from model.checkpoint import load
from server.engine import Engine, EngineConfig, _decode
from timing import interleaved_medians

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--keys", default="128,256,512,768,1024", help="cache slots read, comma-separated")
    parser.add_argument("--rows", default="1,8", help="rows stepped, comma-separated")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    engine = Engine(load(args.checkpoint)[0], EngineConfig(slots=args.slots))  # not started: this script steps it
    keys = [int(k) for k in args.keys.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    S = args.slots
    # Every slot busy, positions just inside the bucket, so the mask keeps (nearly) every key read.
    busy_at = lambda k: jnp.full((S,), k - 2, jnp.int32)  # a fresh array each time: the step donates its input
    slots = {k: dataclasses.replace(engine._empty_slots(), active=jnp.ones((S,), bool), position=busy_at(k)) for k in keys}
    faults = {(k, r): [] for k in keys for r in rows}

    def step(k: int, r: int):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            slots[k], tokens, *_ = _decode(engine.static, engine.config.schedule, engine.eot_id, k, r, engine.params, slots[k])
            tokens.block_until_ready()
            faults[k, r].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            slots[k] = dataclasses.replace(slots[k], position=busy_at(k))  # every round reads the same keys
        return run

    medians = interleaved_medians({(k, r): step(k, r) for k in keys for r in rows}, args.runs)
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    print("| keys read | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{medians[k, r] * 1e3:.2f} ms ({statistics.median(faults[k, r]):.0f} faults)" for r in rows) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k}x{r}": medians[k, r] for k in keys for r in rows}, f, indent=2)


if __name__ == "__main__":
    main()
