"""One decode step of the server's engine, by rows and keys read.

Times ``server.engine._decode`` (one token per row, attention over the
first ``keys`` cache slots) on the bundled checkpoint with every row busy, as
the engine calls it between requests' tokens: on all the slots' state, or on
slot 0's state alone (1 row, a lone stream). The step the 8-stream
throughput goal rests on. Every
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
from server.engine import Engine, EngineConfig, _decode, _first_row
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
    if set(rows) - {1, args.slots}:
        raise SystemExit(f"--rows takes 1 (slot 0 alone) or {args.slots} (every slot), got {args.rows}")
    # Every row busy, positions just inside the bucket, so the mask keeps (nearly) every key read.
    busy_at = lambda k, r: jnp.full((r,), k - 2, jnp.int32)  # a fresh array each time: the step donates its input

    def busy(k: int, r: int):
        state = engine._empty_slots() if r == args.slots else _first_row(engine._empty_slots())
        return dataclasses.replace(state, active=jnp.ones((r,), bool), position=busy_at(k, r))

    slots = {(k, r): busy(k, r) for k in keys for r in rows}
    faults = {(k, r): [] for k in keys for r in rows}

    def step(k: int, r: int):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            slots[k, r], tokens, *_ = _decode(engine.static, engine.config.schedule, engine.eot_id, k, engine.params, slots[k, r])
            tokens.block_until_ready()
            faults[k, r].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            slots[k, r] = dataclasses.replace(slots[k, r], position=busy_at(k, r))  # every round reads the same keys
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
