"""One decode step of the server's engine, by rows and keys read.

Times ``server.runner._decode`` (one token per row, attention over the
first ``keys`` cache slots) on the bundled checkpoint with every row busy, as
the engine calls it between requests' tokens: on all the slots' state, or on
slot 0's state alone (1 row, a lone stream). The step the 8-stream
throughput goal rests on. Every
(rows, keys) pair takes its turn in every round; a turn runs ``--burst``
steps back to back, each started before the last one ends (as the engine's
pipeline does), so a state stays in the CPU caches as it does while its
streams decode. Times are per step, medians of ``--runs`` rounds, with the
median count of page faults per turn (memory that the steps' temporaries
took from the kernel afresh).

Each row also gets its memory floor: the bytes the step must read (every
row's keys and values, and the parameters once), at the rate a jitted sum
reads a 512 MiB array (timed before the rounds), as if every byte came
from DRAM. "8 × 1 row / 8 rows" is the throughput ratio the step allows
before any serving cost.

    python bench/engine_step.py [--checkpoint DIR] [--weights int8] [--keys 128,256,512,768,1024] [--rows 1,8] [--runs 30] [--burst 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics

from ponder.runtime import configure_process

configure_process()
import jax.numpy as jnp
from timing import interleaved_medians, streaming_read

from ponder.model.checkpoint import load
from ponder.server.engine import EngineConfig
from ponder.server.metrics import ServerMetrics
from ponder.server.runner import ModelRunner, _decode, _first_rows

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--keys", default="128,256,512,768,1024", help="cache slots read, comma-separated")
    parser.add_argument("--rows", default="1,8", help="rows stepped, comma-separated")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--burst", type=int, default=8, help="steps per turn")
    parser.add_argument("--weights", default="float32", help="float32, bfloat16 or int8 (as ponder serve --weights)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    config = EngineConfig(slots=args.slots)
    runner = ModelRunner(load(args.checkpoint, weights=args.weights)[0], config.slots, config.max_new_tokens, config.schedule, ServerMetrics.create())
    keys = [int(k) for k in args.keys.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    if set(rows) - {*runner.head_rows, args.slots}:
        raise SystemExit(f"--rows takes {runner.head_rows} (the first rows on their own state) or {args.slots} "
                         f"(every slot), got {args.rows}")
    if min(keys) <= args.burst:
        raise SystemExit(f"--keys must all exceed --burst ({args.burst}): a turn's positions stay below the keys read")
    # Every row busy, positions just inside the bucket for the whole turn, so the mask keeps (nearly) every key read.
    busy_at = lambda k, r: jnp.full((r,), k - 1 - args.burst, jnp.int32)  # a fresh array each time: the step donates its input

    def busy(k: int, r: int):
        state = runner.empty_slots() if r == args.slots else _first_rows(runner.empty_slots(), r)
        return dataclasses.replace(state, active=jnp.ones((r,), bool), position=busy_at(k, r))

    slots = {(k, r): busy(k, r) for k in keys for r in rows}
    faults = {(k, r): [] for k in keys for r in rows}

    def step(k: int, r: int):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(args.burst):
                slots[k, r], tokens, *_ = _decode(runner.static, runner.schedule, runner.eot_id, k, 1, runner.params,
                                                  slots[k, r])
            tokens.block_until_ready()
            faults[k, r].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            slots[k, r] = dataclasses.replace(slots[k, r], position=busy_at(k, r))  # every turn reads the same keys
        return run

    read, read_bytes = streaming_read()
    bandwidth = read_bytes / interleaved_medians({"read": read}, 10)["read"]
    del read  # its 512 MiB
    turns = interleaved_medians({(k, r): step(k, r) for k in keys for r in rows}, args.runs)
    medians = {pair: t / args.burst for pair, t in turns.items()}
    c = runner.base_config
    param_bytes = sum(a.nbytes for a in runner.params)
    kv_bytes = lambda k, r: r * c.n_layer * 2 * c.n_head * k * c.head_dim * jnp.dtype(c.compute_dtype).itemsize
    floor = lambda k, r: (kv_bytes(k, r) + param_bytes) / bandwidth
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    print(f"streaming read: {bandwidth / 1e9:.1f} GB/s; parameters {param_bytes / 2**20:.1f} MiB")
    ratio = 1 in rows and args.slots in rows
    print("| keys read | " + " | ".join(f"{r} row{'s' * (r > 1)} (memory floor)" for r in rows)
          + (f" | {args.slots} × 1 row / {args.slots} rows |" if ratio else " |"))
    print("|---" * (len(rows) + 1 + ratio) + "|")
    for k in keys:
        cells = [f"{medians[k, r] * 1e3:.2f} ms ({floor(k, r) * 1e3:.2f} ms; {statistics.median(faults[k, r]):.0f} faults)" for r in rows]
        if ratio:
            cells.append(f"{args.slots * medians[k, 1] / medians[k, args.slots]:.2f}×")
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bandwidth, **{f"{k}x{r}": medians[k, r] for k in keys for r in rows}}, f, indent=2)


if __name__ == "__main__":
    main()
