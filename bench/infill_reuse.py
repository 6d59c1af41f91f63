"""What a second editor request costs: two llama.vim-shaped ``/infill`` requests, the cursor three lines apart.

Against a running ``ponder serve``, on a real Python file of at least 400
lines: the request llama.vim sends for a cursor at the end of line ``--row``
(the 256 lines before it, the line, the 64 lines after, ``--extra`` snippets
of other files as its ring holds them, ``t_max_predict_ms``), then the same
with the cursor three lines down. For each it prints the prompt tokens the
server computed against the prompt's size (``timings/prompt_n`` /
``tokens_evaluated``), what it reused (``timings/cache_n``), the earlier
tokens its base re-read to move its window, and the time to the first
token as the client saw it (the answer streams) and as the server timed it
(``timings/prompt_ms``).

llama.vim sends no session id: the server matches the request to a session
by shared prefix. So that the first request is cold even on a server that
has seen the file before, both carry a ``document_id`` of their own (a new
document id resets the session it matches).

    .venv/bin/python bench/infill_reuse.py --url http://127.0.0.1:8080 [--file PATH] [--row 250]
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
import uuid
from pathlib import Path

import httpx

N_PREFIX, N_SUFFIX, RING_LINES = 256, 64, 32  # llama.vim's defaults (a ring chunk is half of ring_chunk_size)


def request(lines: list[str], row: int, extra: list[dict], document: str, n_predict: int, budget_ms: int) -> dict:
    """llama.vim's body for a cursor at the end of line ``row`` (1-based)."""
    line = lines[row - 1]
    return {
        "input_prefix": "".join(f"{text}\n" for text in lines[max(0, row - 1 - N_PREFIX) : row - 1]),
        "prompt": line,
        "input_suffix": "\n" + "".join(f"{text}\n" for text in lines[row : row + N_SUFFIX]),
        "input_extra": extra,
        "n_predict": n_predict,
        "n_indent": len(line) - len(line.lstrip()),
        "top_k": 40, "top_p": 0.99, "stream": True, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
        "t_max_prompt_ms": 500, "t_max_predict_ms": budget_ms,
        "document_id": document,
    }


def ring(paths: list[Path], count: int) -> list[dict]:
    """``count`` snippets of ``RING_LINES`` lines from the middle of other files, as llama.vim's ring sends them."""
    chunks = []
    for path in paths[:count]:
        lines = path.read_text().splitlines()
        start = len(lines) // 2
        chunks.append({"text": "\n".join(lines[start : start + RING_LINES]) + "\n", "time": 0, "filename": path.name})
    return chunks


def replay(url: str, body: dict) -> dict:
    """Sends ``body`` (streaming); the final answer's figures and the client's time to the first token."""
    sent, first = time.perf_counter(), None
    with httpx.stream("POST", url.rstrip("/") + "/infill", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: ") :])
            if first is None and event.get("tokens_predicted", 0) > 0:
                first = time.perf_counter()
            if event.get("stop"):
                final = event
    t = final["timings"]
    return {
        "computed": t["prompt_n"], "total": final["tokens_evaluated"], "cached": t["cache_n"],
        "reencoded": final["ponder"].get("reencoded_tokens", "n/a"), "generated": t["predicted_n"],
        "ttft_ms": round(1000 * ((first or time.perf_counter()) - sent), 1), "prompt_ms": round(t["prompt_ms"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--file", default=textwrap.__file__, help="a Python file of 400 lines or more (default: textwrap.py)")
    parser.add_argument("--row", type=int, default=250, help="the first request's cursor line (1-based)")
    parser.add_argument("--extra", type=int, default=4, help="ring snippets sent with both requests")
    parser.add_argument("--n-predict", type=int, default=32)
    parser.add_argument("--t-max-predict-ms", type=int, default=250)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    path = Path(args.file)
    lines = path.read_text().splitlines()
    if len(lines) < 400 or not 1 <= args.row <= len(lines) - 3:
        parser.error(f"{path} has {len(lines)} lines: the bench wants 400 or more, and --row within them")
    others = sorted(p for p in path.parent.glob("*.py") if p != path)
    extra, document = ring(others, args.extra), f"bench-{uuid.uuid4().hex}"
    rows = {"first": args.row, "three_lines_down": args.row + 3}
    report = {"file": str(path), "lines": len(lines)}
    for name, row in rows.items():
        report[name] = {"row": row, **replay(args.url, request(lines, row, extra, document, args.n_predict, args.t_max_predict_ms))}
        r = report[name]
        print(f"{name:17} row {row:4}: computed {r['computed']:5} / {r['total']:5} prompt tokens "
              f"({r['computed'] / r['total']:.0%}), cached {r['cached']:5}, re-read {r['reencoded']:>4}, "
              f"TTFT {r['ttft_ms']:7.1f} ms (server prompt phase {r['prompt_ms']:7.1f} ms), {r['generated']} generated")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
