"""Does the infill prompt layout change what the model writes? The next line, old layout against new.

On held-out files (the ``transformers`` package, which no corpus includes),
a cursor is put after the indentation of a line in the middle of a file of
at least 400 lines, and the request llama.vim would send is built: the 256
lines before (``input_prefix``), the indentation (``prompt``), the 64 lines
after (``input_suffix``). Each layout turns it into tokens, the server's
engine (the real runner, its windows and sessions, a fresh session per
request) completes it greedily, and the first generated line is compared
with the real one: exact match and edit similarity (``difflib`` ratio), with
the paired difference to the old layout and its 95% bootstrap interval.

Layouts (``--layouts``):

* ``old``: ``<eot> <fim_prefix> prefix <fim_suffix> suffix <fim_middle>``, the whole
  suffix (ponder before ``server/prompts.py``);
* ``new``: ``server.prompts.fim_tokens``, what the server sends: the prefix from its
  anchor, the suffix's first ``SUFFIX_LINES`` lines;
* ``suffix_N``: the anchored prefix with the suffix's first N tokens (64, 128, 256);
* ``suffix_lines_N``: the same with the suffix's first N lines (8, 16, 32), whole;
* ``whole_suffix``: the anchored prefix with the whole suffix;
* ``document_query``: the visible text (prefix, suffix) as a plain document,
  then a short query ``<fim_prefix> last 128 tokens of the prefix <fim_suffix>
  first 64 of the suffix <fim_middle>`` (a layout the model never saw in training).

    .venv/bin/python bench/infill_quality.py --files 40 --lines-per-file 3 --json out.json
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import time
from pathlib import Path

from ponder.runtime import configure_process

configure_process()
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402

from ponder.checkpoints import DEFAULT_CHECKPOINT  # noqa: E402
from ponder.model import checkpoint  # noqa: E402
from ponder.model.tokenizer import Tokenizer  # noqa: E402
from ponder.server.engine import Engine, EngineConfig  # noqa: E402
from ponder.server.prompts import fim_tokens, stable_prefix  # noqa: E402
from ponder.server.types import DoneEvent, Job  # noqa: E402

N_PREFIX, N_SUFFIX = 256, 64  # llama.vim's defaults
LAYOUTS = ("old", "new", "suffix_64", "suffix_128", "suffix_256", "suffix_lines_8", "suffix_lines_16", "suffix_lines_32",
           "whole_suffix", "document_query")


def held_out_files(root: Path, min_lines: int) -> list[Path]:
    return [p for p in sorted(root.rglob("*.py")) if len(p.read_text(errors="replace").splitlines()) >= min_lines]


def requests(files: list[Path], per_file: int, seed: int):
    """(prefix, suffix, expected line) per cursor: the cursor after a line's indentation, mid-file."""
    rng = random.Random(seed)
    for path in files:
        lines = path.read_text(errors="replace").splitlines()
        rows = [r for r in range(len(lines) // 5, len(lines) * 4 // 5) if len(lines[r].strip()) >= 6]
        for row in sorted(rng.sample(rows, min(per_file, len(rows)))):
            line = lines[row]
            indent = line[: len(line) - len(line.lstrip())]
            prefix = "".join(f"{text}\n" for text in lines[max(0, row - N_PREFIX) : row]) + indent
            suffix = "\n" + "".join(f"{text}\n" for text in lines[row + 1 : row + 1 + N_SUFFIX])
            yield prefix, suffix, line.strip()


def layouts(tok: Tokenizer, prefix: str, suffix: str) -> dict[str, tuple[list[int], int]]:
    """Each layout's (tokens, commit_limit)."""

    def psm(before: str, after: list[int]) -> tuple[list[int], int]:
        document = tok.encode(before)
        return [tok.eot_id, *tok.fim_prompt(document, after)], len(document) + 2

    after = tok.encode(suffix)
    visible = tok.encode_document(prefix + suffix)
    query = tok.fim_prompt(tok.encode(prefix)[-128:], after[:64])
    return {
        "old": psm(prefix, after),
        "new": fim_tokens(tok, prefix, suffix),
        **{f"suffix_{n}": psm(stable_prefix(prefix), after[:n]) for n in (64, 128, 256)},
        **{f"suffix_lines_{n}": psm(stable_prefix(prefix), tok.encode("".join(suffix.splitlines(True)[:n])))
           for n in (8, 16, 32)},
        "whole_suffix": psm(stable_prefix(prefix), after),
        "document_query": (visible + query, len(visible)),
    }


def first_line(engine: Engine, tok: Tokenizer, tokens: list[int], commit_limit: int, session: str, max_new: int) -> str:
    job = Job("", session, None, tokens, max_new, commit_limit=commit_limit)
    engine.submit(job)
    out = []
    while not isinstance(event := job.next_event(timeout=600), DoneEvent):
        out += event.token_ids
        if b"\n" in tok.decode_bytes(event.token_ids):
            job.cancel()
    return tok.decode([t for t in out if t != tok.eot_id]).split("\n")[0].strip()


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    diff = a - b
    if np.all(diff == diff[0]):
        return {"difference": float(diff[0]), "ci95": [float(diff[0])] * 2}
    ci = scipy.stats.bootstrap((diff,), np.mean, n_resamples=10_000, method="BCa", rng=np.random.default_rng(0))
    return {"difference": float(diff.mean()), "ci95": [float(ci.confidence_interval.low), float(ci.confidence_interval.high)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="held-out sources (default: the installed transformers package)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--lines-per-file", type=int, default=3)
    parser.add_argument("--min-lines", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layouts", default="old,new", help="comma-separated, from: " + ", ".join(LAYOUTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    if args.root is None:
        import transformers

        args.root = str(Path(transformers.__file__).parent)
    chosen = args.layouts.split(",")
    if "old" not in chosen or not set(chosen) <= set(LAYOUTS):
        parser.error(f"--layouts must include old and come from {', '.join(LAYOUTS)}")
    model, tok = checkpoint.load(args.checkpoint)
    engine = Engine(model, EngineConfig(slots=2))
    engine.start()
    files = random.Random(args.seed).sample(held_out_files(Path(args.root), args.min_lines), args.files)
    scores: dict[str, list[tuple[float, float]]] = {}
    started, n = time.monotonic(), 0
    for prefix, suffix, expected in requests(files, args.lines_per_file, args.seed):
        for name, (tokens, limit) in layouts(tok, prefix, suffix).items():
            if name not in chosen:
                continue
            got = first_line(engine, tok, tokens, limit, f"{name}-{n}", args.max_new_tokens)
            engine.reset_session("", f"{name}-{n}")
            scores.setdefault(name, []).append((float(got == expected), difflib.SequenceMatcher(None, got, expected).ratio()))
        n += 1
    engine.stop(drain_s=1)
    table = {"lines": n, "files": len(files), "seconds": round(time.monotonic() - started)}
    old = np.asarray(scores["old"])
    for name, rows in scores.items():
        s = np.asarray(rows)
        table[name] = {"exact_match": float(s[:, 0].mean()), "edit_similarity": float(s[:, 1].mean())}
        if name != "old":
            table[name]["minus_old"] = {"exact_match": paired(s[:, 0], old[:, 0]),
                                        "edit_similarity": paired(s[:, 1], old[:, 1])}
    print(f"{n} lines of {len(files)} files, {table['seconds']} s")
    for name in scores:
        row, diff = table[name], table[name].get("minus_old")
        text = f"{name:17} exact {row['exact_match']:.3f}  edit similarity {row['edit_similarity']:.3f}"
        if diff:
            text += "  vs old: " + ", ".join(f"{k} {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                                            for k, d in diff.items())
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
