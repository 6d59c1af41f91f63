"""Decode throughput of the engine alone: 1 stream against N, no front end.

Starts ``server.engine.Engine`` on the bundled checkpoint (warm-up
included) and submits greedy jobs straight to it, each read by its own
thread as the gRPC front end's handler threads do. A round submits ``n``
jobs at once (random prompts of ``--prompt-tokens`` tokens in fresh
sessions, ``--max-tokens`` each) and counts the tokens that arrive while
every job is past its first token and none has ended, as
``serve_load.py --mode throughput`` does for its "all decoding" figure.
Medians of ``--rounds`` rounds. The gap between this and ``serve_load.py``
is what the front ends and the load generator cost; the gap between this
and ``engine_step.py`` is the engine loop's own.

    python bench/engine_throughput.py [--checkpoint DIR] [--streams 8] [--rounds 3] [--prompt-tokens 512] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time

from ponder.runtime import configure_process

configure_process()

from ponder.model.checkpoint import load
from ponder.server.engine import Engine, EngineConfig
from ponder.server.types import DoneEvent, Job, TokenEvent

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "default")


def all_decoding_rate(engine: Engine, n: int, args, rng: random.Random) -> float:
    """Tokens/s of ``n`` concurrent jobs while all of them decode."""
    vocab = engine.model.config.base.vocab_size
    jobs = [
        Job("bench", f"s{rng.getrandbits(64)}", None,
            [engine.eot_id] + [rng.randrange(1, vocab) for _ in range(args.prompt_tokens - 1)], args.max_tokens)
        for _ in range(n)
    ]
    arrivals: list[list[float]] = [[] for _ in jobs]
    failures: list[object] = []

    def read(i: int, job: Job) -> None:
        while True:
            event = job.next_event()
            if isinstance(event, TokenEvent):
                arrivals[i] += [time.perf_counter()] * len(event.token_ids)
            else:
                if not isinstance(event, DoneEvent):
                    failures.append(event)
                return

    readers = [threading.Thread(target=read, args=(i, job)) for i, job in enumerate(jobs)]
    for reader in readers:
        reader.start()
    for job in jobs:
        engine.submit(job)
    for reader in readers:
        reader.join()
    if failures or any(len(a) < 2 for a in arrivals):
        raise SystemExit(f"a job failed or generated < 2 tokens: {failures}")
    begin, end = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
    return sum(1 for a in arrivals for t in a[1:] if begin < t <= end) / (end - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    engine = Engine(load(args.checkpoint)[0], EngineConfig(slots=args.streams, max_new_tokens=args.max_tokens))
    engine.start()
    rng = random.Random(args.seed)
    try:
        all_decoding_rate(engine, 1, args, rng)  # the first round pays for cold caches
        rates = {n: statistics.median(all_decoding_rate(engine, n, args, rng) for _ in range(args.rounds))
                 for n in (1, args.streams)}
    finally:
        engine.stop()
    one, many = rates[1], rates[args.streams]
    print(f"engine alone: 1 stream {one:,.0f} tokens/s; {args.streams} streams {many:,.0f} tokens/s while all decode "
          f"({many / one:.2f}x)")


if __name__ == "__main__":
    main()
