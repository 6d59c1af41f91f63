"""Does a session's memory help the next line? Line completion with persistent vs fresh fast weights.

Runs ``ponder.train.line_completion`` (the same code as ``ponder eval``'s
line-completion table, without the schedule table) on a corpus's held-out
documents, and prints both variants' exact match, edit similarity and the
real line's loss, with the paired difference and its 95% bootstrap interval.
``--versus skip`` instead compares the learned gate against SKIP, both with
fresh fast weights: what test-time training buys inside the window alone.

    .venv/bin/python bench/line_memory.py --corpus runs/corpus
    .venv/bin/python bench/line_memory.py --corpus runs/heldout-transformers   # a package no corpus takes
"""

from __future__ import annotations

import argparse
import json
import time

from ponder.runtime import configure_process

configure_process()
from ponder.checkpoints import DEFAULT_CHECKPOINT  # noqa: E402
from ponder.model import checkpoint  # noqa: E402
from ponder.model.gating import Schedule  # noqa: E402
from ponder.train import evaluate  # noqa: E402
from ponder.train import line_completion as lc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="a corpus made by `ponder train corpus` (its val split)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--max-documents", type=int, default=20)
    parser.add_argument("--lines-per-file", type=int, default=12)
    parser.add_argument("--line-every", type=int, default=100)
    parser.add_argument("--versus", choices=["fresh", "skip"], default="fresh",
                        help="fresh: persistent vs fresh fast weights; skip: learned vs SKIP, both fresh")
    args = parser.parse_args()

    model, tokenizer = checkpoint.load(args.checkpoint)
    docs = evaluate.held_out_documents(args.corpus, args.window, 2000, 4096, args.max_documents)
    if args.versus == "fresh":
        variants = {"persistent": (True, Schedule()), "fresh": (False, Schedule())}
    else:
        variants = {"learned": (False, Schedule()), "skip": (False, Schedule("skip"))}
    started = time.monotonic()
    table = lc.compare_variants(model, tokenizer, docs, args.window, args.line_every, args.lines_per_file, variants)
    report = {"corpus": args.corpus, "documents": len(docs), "seconds": round(time.monotonic() - started), **table}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
