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

    engine = Engine(load(args.checkpoint)[0], EngineConfig(slots=args.slots))
    engine.start(warmup=False)
    engine._stop = True  # the engine thread is not needed: this script calls the step itself
    with engine._lock:
        engine._lock.notify_all()
    keys = [int(k) for k in args.keys.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    S = args.slots
    # Every slot busy, positions just inside the bucket, so the mask keeps (nearly) every key read.
    busy = {
        k: dataclasses.replace(engine._slots, active=jnp.ones((S,), bool), position=jnp.full((S,), k - 2, jnp.int32))
        for k in keys
    }
    slots = {k: jax.tree.map(jnp.copy, busy[k]) for k in keys}

    def step(k: int, r: int):
        def run():
            slots[k], tokens, *_ = _decode(engine.static, engine.config.schedule, engine.eot_id, k, r, engine.params, slots[k])
            tokens.block_until_ready()
            # Hold positions still, so every round reads the same number of keys.
            # (A fresh array: the step donates what it is given.)
            slots[k] = dataclasses.replace(slots[k], position=jnp.full((S,), k - 2, jnp.int32))
        return run

    faults = {}

    def counted(k: int, r: int):
        run = step(k, r)

        def fn():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            run()
            faults.setdefault((k, r), []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return fn

    medians = interleaved_medians({(k, r): counted(k, r) for k in keys for r in rows}, args.runs)
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    print("| keys read | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{medians[k, r] * 1e3:.2f} ms ({sorted(faults[k, r])[len(faults[k, r]) // 2]} faults)" for r in rows) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k}x{r}": medians[k, r] for k in keys for r in rows}, f, indent=2)


if __name__ == "__main__":
    main()
