"""Load generator for a running ponder server (HTTP or gRPC), as editors would load it.

Every request streams (``stream: true``, or gRPC's server stream), so the
client sees each token arrive. Per request it records TTFT (send to the first
chunk carrying text), the gaps between text-carrying chunks (inter-token
latency; one SSE chunk may hold a few tokens), end-to-end time, and from the
last event the usage: prompt, cached (served from the session) and generated
tokens. Prompts are real Python files of the standard library, chosen by
``--seed``.

Modes:

* ``rate``: open loop, arrivals with gamma-distributed gaps (shape
  ``--burstiness``: 1 is Poisson, < 1 burstier) at ``--rate`` requests/s.
* ``concurrency``: closed loop, ``--concurrency`` workers each sending the
  next request when the last one ends.
  In both, a prompt is a window of about ``--prompt-tokens`` tokens
  (3.7 characters each, measured for the bundled tokenizer on these files)
  starting at a line of a random file; no session id, so the server matches
  prompts to sessions by shared prefix, as it does for llama.cpp clients.
* ``typing``: ``--editors`` simulated editors. Each opens a file at a random
  line and re-types the file's next lines one character at a time at
  ``--cps`` (±20% jitter, a pause of mean ``--pause-s`` after each line).
  Whenever ``--debounce-ms`` pass without a keystroke it sends a completion
  of the document up to the cursor, with its own ``session_id`` and the
  file's path as ``document_id``; the next keystroke cancels a request still
  running (closes the stream: superseded). Every ``--switch-s`` it opens
  another file. A request is cold when it is the first of its document or
  its ``cached_tokens`` is 0; warm when an earlier request of its document
  had completed before it was sent (the server has read the document) and
  its ``cached_tokens`` is above 0; *resumed* otherwise: every earlier
  request was superseded before it completed, and the server had only part
  of the document (a cold prefill cut short). A *lost session* is a warm-
  expected request (an earlier request of the same document completed, the
  prefix only grew) that got ``cached_tokens == 0``; the server's eviction
  counter (``/metrics`` before and after) says how many of those an eviction
  explains.
* ``throughput``: ``--rounds`` rounds of 1 stream, then ``--concurrency``
  simultaneous streams, of ``--max-tokens`` tokens each at temperature 0.
  The decode rate excludes TTFT: per stream (generated - 1) / (last chunk -
  first chunk); aggregate = all streams' decode tokens / (last chunk of any
  stream - first chunk of any stream), so prefills of streams admitted late
  (they stall the decode steps) count against it; the per-stream median is
  shown beside it, and "all decoding": the tokens that arrive while every
  stream is decoding (from the last stream's first chunk to the first
  stream's last chunk), per second, which leaves admission prefills out. The
  goal (the serving issue): the aggregate of 8 streams is at least 4x one
  stream's; both ratios are printed against the one stream's aggregate.

TTFT percentiles include superseded requests that got a first token;
inter-token and end-to-end latency, output tokens/s and the session hit rate
count completed requests. Goodput counts completed requests with TTFT <= 200 ms
per second. Errors are
grouped by HTTP status or gRPC code; 5xx (and gRPC INTERNAL, UNKNOWN,
UNAVAILABLE, DATA_LOSS, UNIMPLEMENTED, DEADLINE_EXCEEDED) are counted apart
as server errors.

    python bench/serve_load.py --mode typing --editors 8 --duration-s 60 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from ponder.client import AsyncClient, Completion, PonderError

CHARS_PER_TOKEN = 3.7  # the bundled code tokenizer on standard-library files
GOOD_TTFT_S = 0.2
GRPC_SERVER_CODES = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "UNIMPLEMENTED", "DEADLINE_EXCEEDED"}
WATCHED_METRICS = ("ponder_sessions_evicted_total", "ponder_session_lookups_total", "ponder_cancellations_total",
                   "ponder_compilations_total", "ponder_requests_total")


@dataclasses.dataclass
class Request:
    prompt: str
    max_tokens: int
    suffix: str | None = None
    temperature: float = 0.0
    session_id: str | None = None
    document_id: str | None = None


@dataclasses.dataclass
class Result:
    """One request as the client saw it (times in seconds; ``start`` since the run began)."""

    start: float = 0.0
    outcome: str = "running"  # ok, error, cancelled
    status: str = ""  # 200 / OK, or the HTTP status, gRPC code or exception name of a failure
    server_error: bool = False
    message: str = ""
    ttft: float | None = None
    e2e: float | None = None
    gaps: list[float] = dataclasses.field(default_factory=list)
    first_chunk: float | None = None  # perf_counter times, for the throughput mode
    last_chunk: float | None = None
    chunk_times: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (perf_counter, tokens) per text chunk
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated_tokens: int | None = None
    finish_reason: str | None = None
    session_id: str | None = None
    document_id: str | None = None
    first_of_document: bool = False
    after_completed: bool = False  # an earlier request of the document had completed when this one was sent
    lost_session: bool = False


async def wait_ready(client: AsyncClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.health(timeout=5)).ready:
                return
        except PonderError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"ponder at {client.address} was not ready within {timeout_s:.0f} s (is `ponder serve` running?)")
        await asyncio.sleep(1)


async def measure(client, req: Request, result: Result, t0: float) -> Result:
    """Runs ``req`` and fills ``result``; a cancellation (superseded) is recorded, then re-raised."""
    start = time.perf_counter()
    result.start, result.session_id, result.document_id = start - t0, req.session_id, req.document_id
    try:
        items = client.stream(req.prompt, req.suffix, session=req.session_id, document=req.document_id,
                              max_tokens=req.max_tokens, temperature=req.temperature)
        async for item in items:
            now = time.perf_counter()
            if isinstance(item, Completion):
                u = item.usage
                result.prompt_tokens, result.cached_tokens, result.generated_tokens = u.prompt_tokens, u.cached_tokens, u.generated_tokens
                result.session_id, result.finish_reason = item.session_id, item.finish_reason
            elif item.text:
                result.chunk_times.append((now, item.tokens))
                if result.first_chunk is None:
                    result.ttft, result.first_chunk = now - start, now
                else:
                    result.gaps.append(now - result.last_chunk)
                result.last_chunk = now
        result.e2e, result.outcome, result.status = time.perf_counter() - start, "ok", "OK"
    except asyncio.CancelledError:
        result.outcome, result.status = "cancelled", "cancelled"
        raise
    except PonderError as err:  # an answer (status, gRPC code) or none (connection refused, reset)
        status = err.status or type(err).__name__
        result.outcome, result.status, result.message = "error", status, err.message[:300]
        result.server_error = status.startswith("5") or status in GRPC_SERVER_CODES
    return result


# --- Prompts: real files of the standard library.


def load_files(min_chars: int, max_chars: int) -> list[tuple[str, str]]:
    """(path relative to the standard library, text) of every top-level module in the size range, sorted."""
    root = Path(os.__file__).parent
    files = [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(root.glob("*.py"))]
    files = [(name, text) for name, text in files if min_chars <= len(text) <= max_chars]
    if not files:
        raise SystemExit(f"no standard-library file in {root} has {min_chars}..{max_chars} characters")
    return files


def line_start(text: str, lo: int, hi: int, rng: random.Random) -> int:
    """A random line start in [lo, hi] (lo itself when none)."""
    at = rng.randint(lo, max(lo, hi))
    nl = text.rfind("\n", lo, at)
    return lo if nl < 0 else nl + 1


def window_request(files, rng: random.Random, args) -> Request:
    """A prompt of about ``--prompt-tokens`` tokens from a random line of a random file (rate, concurrency, throughput)."""
    name, text = rng.choice(files)
    n_chars = int(args.prompt_tokens * CHARS_PER_TOKEN)
    start = line_start(text, 0, len(text) - n_chars, rng)
    end = min(len(text), start + n_chars)
    suffix = text[end:end + args.suffix_chars] if args.suffix_chars else None
    return Request(text[start:end], args.max_tokens, suffix=suffix, temperature=args.temperature)


# --- Modes.


async def run_rate(client, files, args, results: list[Result], t0: float) -> None:
    rng = random.Random(args.seed)
    shape = args.burstiness
    tasks, deadline = [], t0 + args.duration_s
    while time.perf_counter() < deadline:
        tasks.append(asyncio.create_task(measure(client, window_request(files, rng, args), _new(results), t0)))
        await asyncio.sleep(rng.gammavariate(shape, 1 / (args.rate * shape)))  # mean gap 1 / rate
    await asyncio.gather(*tasks)


async def run_concurrency(client, files, args, results: list[Result], t0: float) -> None:
    deadline = t0 + args.duration_s

    async def worker(i: int):
        rng = random.Random(args.seed * 1000 + i)
        while time.perf_counter() < deadline:
            await measure(client, window_request(files, rng, args), _new(results), t0)

    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))


async def run_typing(client, files, args, results: list[Result], t0: float) -> None:
    deadline, debounce, tag = t0 + args.duration_s, args.debounce_ms / 1000, uuid.uuid4().hex[:8]

    async def editor(i: int):
        rng = random.Random(args.seed * 1000 + i)
        session = f"bench-{tag}-editor{i}"  # fresh per run: a rerun must not find warm sessions
        order = rng.sample(range(len(files)), len(files))  # never reopen a file: one document id, one text
        for opened_count, index in enumerate(order):
            path, text = files[index]
            cursor = line_start(text, 1000, len(text) - 400, rng)  # >= 1000 chars: past the first TTT chunks
            span_end = text.find("\n", min(len(text), cursor + int(args.cps * args.switch_s * 1.5)))
            span_end = len(text) if span_end < 0 else span_end + 1
            opened, first, committed, task = time.perf_counter(), True, [False], None
            pause = debounce + rng.expovariate(1 / args.pause_s)  # reading the file just opened: a request fires

            async def complete(req: Request, result: Result, committed=committed):  # this document's flag, bound now
                await measure(client, req, result, t0)
                if result.outcome == "ok":
                    result.lost_session = not result.first_of_document and committed[0] and result.cached_tokens == 0
                    committed[0] = True

            while True:
                if pause > debounce:  # idle long enough: complete at the cursor
                    await asyncio.sleep(debounce)
                    suffix = text[span_end:span_end + args.suffix_chars] if args.suffix_chars else None
                    req = Request(text[:cursor], args.max_tokens, suffix, args.temperature, session, path)
                    result = _new(results)
                    result.first_of_document, first = first, False
                    result.after_completed = committed[0]
                    task = asyncio.create_task(complete(req, result))
                    pause -= debounce
                await asyncio.sleep(pause)
                now = time.perf_counter()
                if now >= deadline or now - opened >= args.switch_s or cursor >= span_end:
                    break
                if task is not None and not task.done():  # the next keystroke supersedes the running request
                    task.cancel()
                cursor += 1
                pause = rng.uniform(0.8, 1.2) / args.cps
                if text[cursor - 1] == "\n":
                    pause += rng.expovariate(1 / args.pause_s)
            if task is not None and not task.done():
                if time.perf_counter() >= deadline:
                    await asyncio.gather(task, return_exceptions=True)  # the run ends: let it finish
                else:
                    task.cancel()  # switching files drops the old completion
            if time.perf_counter() >= deadline:
                return

    await asyncio.gather(*(editor(i) for i in range(args.editors)))


async def run_throughput(client, files, args) -> dict:
    rng, rows = random.Random(args.seed), {}
    await measure(client, window_request(files, rng, args), Result(), time.perf_counter())  # warm the path up
    for n in (1, args.concurrency):
        rounds = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            done = await asyncio.gather(*(measure(client, window_request(files, rng, args), Result(), t0) for _ in range(n)))
            streams = [r for r in done if r.outcome == "ok" and (r.generated_tokens or 0) > 1 and r.last_chunk > r.first_chunk]
            if len(streams) < n:
                raise SystemExit(f"throughput: {n - len(streams)} of {n} streams failed or generated < 2 tokens: "
                                 f"{[(r.status, r.message) for r in done if r not in streams]}")
            decode_tokens = sum(r.generated_tokens - 1 for r in streams)
            window = max(r.last_chunk for r in streams) - min(r.first_chunk for r in streams)
            rounds.append(dict(
                aggregate_tok_s=decode_tokens / window,
                steady_tok_s=steady_rate(streams),
                per_stream_tok_s=[(r.generated_tokens - 1) / (r.last_chunk - r.first_chunk) for r in streams],
                generated_tokens=[r.generated_tokens for r in streams],
                ttft_s=[r.ttft for r in streams],
            ))
        rows[n] = dict(
            streams=n,
            aggregate_tok_s=float(np.median([r["aggregate_tok_s"] for r in rounds])),
            steady_tok_s=float(np.median([r["steady_tok_s"] for r in rounds])),
            per_stream_tok_s=float(np.median([x for r in rounds for x in r["per_stream_tok_s"]])),
            mean_generated=float(np.mean([x for r in rounds for x in r["generated_tokens"]])),
            ttft_p50_s=float(np.median([x for r in rounds for x in r["ttft_s"]])),
            rounds=rounds,
        )
    single, many = rows[1], rows[args.concurrency]
    return dict(single=single, concurrent=many, ratio=many["aggregate_tok_s"] / single["aggregate_tok_s"],
                steady_ratio=many["steady_tok_s"] / single["aggregate_tok_s"])


def steady_rate(streams: list[Result]) -> float:
    """Tokens/s arriving while every stream is past its first token and none has ended.

    The window runs from the last stream's first chunk to the first stream's
    last chunk, so no admission prefill falls inside it (for one stream it is
    that stream's decode rate). Chunks are counted from the second one on.
    """
    begin, end = max(r.first_chunk for r in streams), min(r.last_chunk for r in streams)
    if end <= begin:
        return float("nan")
    tokens = sum(n for r in streams for t, n in r.chunk_times[1:] if begin < t <= end)
    return tokens / (end - begin)


def _new(results: list[Result]) -> Result:
    results.append(Result())
    return results[-1]


# --- Metrics and summary.


def scrape(url: str) -> dict[str, float] | None:
    """The watched ``ponder_*`` samples of ``/metrics`` (None when it cannot be read)."""
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    samples = {}
    for m in re.finditer(r"^(ponder_\w+)(\{[^}]*\})?\s+(\S+)$", text, re.M):
        if m[1] in WATCHED_METRICS:
            samples[m[1] + (m[2] or "")] = float(m[3])
    return samples


def percentiles(values, ps=(50, 90, 99)) -> dict | None:
    return {f"p{p}": float(np.percentile(values, p)) for p in ps} if len(values) else None


def summarize(results: list[Result], elapsed: float, before, after) -> dict:
    ok = [r for r in results if r.outcome == "ok"]
    errors = [r for r in results if r.outcome == "error"]
    cancelled = [r for r in results if r.outcome == "cancelled"]
    with_ttft = [r for r in results if r.ttft is not None]  # superseded requests count if a token arrived
    known = [r for r in ok if r.cached_tokens is not None]
    cold = [r.ttft for r in with_ttft if r.first_of_document or r.cached_tokens == 0]
    warm = [r.ttft for r in with_ttft if not r.first_of_document and r.cached_tokens and r.after_completed]
    resumed = [r.ttft for r in with_ttft if not r.first_of_document and r.cached_tokens and not r.after_completed]
    delta = {k: v - (before or {}).get(k, 0.0) for k, v in (after or {}).items() if v - (before or {}).get(k, 0.0)}
    evicted = delta.get("ponder_sessions_evicted_total") if after is not None else None
    lost = sum(r.lost_session for r in ok)
    return dict(
        elapsed_s=elapsed,
        sent=len(results), ok=len(ok), errors=len(errors), server_errors_5xx=sum(r.server_error for r in errors),
        errors_by_status=dict(Counter(r.status for r in errors)), cancelled=len(cancelled),
        cancel_rate=len(cancelled) / len(results) if results else 0.0,
        ttft_s=percentiles([r.ttft for r in with_ttft]),
        inter_token_s=percentiles([g for r in ok for g in r.gaps]),
        e2e_s=percentiles([r.e2e for r in ok]),
        output_tok_s=sum(r.generated_tokens or 0 for r in ok) / elapsed,
        goodput_req_s=sum(r.ttft is not None and r.ttft <= GOOD_TTFT_S for r in ok) / elapsed,
        session_hit_rate=sum(bool(r.cached_tokens) for r in known) / len(known) if known else None,
        mean_prompt_tokens=float(np.mean([r.prompt_tokens for r in known if r.prompt_tokens])) if known else None,
        warm_ttft_s=percentiles(warm, (50, 90)), cold_ttft_s=percentiles(cold, (50, 90)), warm_n=len(warm), cold_n=len(cold),
        resumed_ttft_s=percentiles(resumed, (50, 90)), resumed_n=len(resumed),
        lost_sessions=lost, sessions_evicted=evicted,
        lost_unexplained=None if evicted is None else max(0, lost - int(evicted)),
        metrics_delta=delta if after is not None else None,
    )


def _fmt(p: dict | None) -> str:
    return "-" if p is None else " / ".join(f"{v * 1000:.1f}" for v in p.values()) + " ms"


def report(mode: str, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    if mode == "throughput":
        table = Table(title="decode throughput (TTFT excluded; medians over rounds)")
        for col in ("streams", "aggregate tok/s", "all decoding tok/s", "per-stream tok/s", "mean generated", "TTFT p50"):
            table.add_column(col, justify="right")
        for row in (s["single"], s["concurrent"]):
            table.add_row(str(row["streams"]), f"{row['aggregate_tok_s']:.0f}", f"{row['steady_tok_s']:.0f}",
                          f"{row['per_stream_tok_s']:.0f}", f"{row['mean_generated']:.0f}", f"{row['ttft_p50_s'] * 1000:.0f} ms")
        n = s["concurrent"]["streams"]
        table.caption = (f"aggregate {n} streams / 1 stream = {s['ratio']:.2f}x (goal >= 4x); "
                         f"while all {n} decode: {s['steady_ratio']:.2f}x")
        Console().print(table)
        return
    table = Table(title=f"ponder load: {mode}, {s['elapsed_s']:.1f} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    rows = [
        ("requests sent / ok / cancelled", f"{s['sent']} / {s['ok']} / {s['cancelled']}"),
        ("errors (5xx)", f"{s['errors']} ({s['server_errors_5xx']})  {s['errors_by_status'] or ''}"),
        ("TTFT p50 / p90 / p99", _fmt(s["ttft_s"])),
        ("inter-token p50 / p90 / p99", _fmt(s["inter_token_s"])),
        ("end-to-end p50 / p90 / p99", _fmt(s["e2e_s"])),
        ("output tokens/s", f"{s['output_tok_s']:.1f}"),
        (f"goodput (TTFT <= {GOOD_TTFT_S * 1000:.0f} ms)", f"{s['goodput_req_s']:.2f} req/s"),
        ("cancel rate", pct(s["cancel_rate"])),
        ("session hit rate (cached_tokens > 0)", pct(s["session_hit_rate"])),
        ("mean prompt tokens", "-" if s["mean_prompt_tokens"] is None else f"{s['mean_prompt_tokens']:.0f}"),
    ]
    if mode == "typing":
        rows += [
            (f"warm TTFT p50 / p90 (n={s['warm_n']})", _fmt(s["warm_ttft_s"])),
            (f"cold TTFT p50 / p90 (n={s['cold_n']})", _fmt(s["cold_ttft_s"])),
            (f"resumed TTFT p50 / p90 (n={s['resumed_n']})", _fmt(s["resumed_ttft_s"])),
            ("lost sessions / evicted (server)",
             f"{s['lost_sessions']} / {'-' if s['sessions_evicted'] is None else int(s['sessions_evicted'])}"),
        ]
    for row in rows:
        table.add_row(*row)
    if s["metrics_delta"]:
        deltas = sorted(s["metrics_delta"].items())
        table.caption = "server /metrics delta: " + ", ".join(f"{k.removeprefix('ponder_')} +{v:g}" for k, v in deltas)
    Console().print(table)


async def main(args) -> None:
    if args.max_tokens is None:
        args.max_tokens = 128 if args.mode == "throughput" else 32
    files = load_files(3000 if args.mode == "typing" else int(args.prompt_tokens * CHARS_PER_TOKEN), args.max_file_chars)
    # No retries: a refusal is a figure here, not something to hide.
    address = {"url": args.url} if args.protocol == "http" else {"grpc": args.grpc_target}
    client = AsyncClient(**address, api_key=args.api_key, retries=0)
    try:
        await wait_ready(client, args.wait_s)
        if args.mode == "throughput":
            summary, results = await run_throughput(client, files, args), []
        else:
            before, results, t0 = scrape(args.url), [], time.perf_counter()
            run = {"rate": run_rate, "concurrency": run_concurrency, "typing": run_typing}[args.mode]
            await run(client, files, args, results, t0)
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0.2)  # the server counts a cancellation at its next step
            summary = summarize(results, elapsed, before, scrape(args.url))
    finally:
        await client.aclose()
    report(args.mode, summary)
    if args.json:
        out = dict(config=vars(args), summary=summary, requests=[dataclasses.asdict(r) for r in results])
        Path(args.json).write_text(json.dumps(out, indent=1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("rate", "concurrency", "typing", "throughput"), default="concurrency",
                   help="open loop at --rate, closed loop of --concurrency, simulated editors, or decode throughput")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="HTTP /v1/completions (SSE) or gRPC Complete")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="HTTP base URL (also read for /metrics with --protocol grpc)")
    p.add_argument("--grpc-target", default="127.0.0.1:50051", help="gRPC host:port")
    p.add_argument("--api-key", default=os.environ.get("PONDER_API_KEY"), help="bearer token (default: $PONDER_API_KEY)")
    p.add_argument("--duration-s", type=float, default=30.0, help="how long to send requests (rate, concurrency, typing)")
    p.add_argument("--rate", type=float, default=4.0, help="rate mode: mean requests per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="rate mode: gamma shape of the gaps (1: Poisson, <1: burstier)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrency mode: workers; throughput mode: simultaneous streams")
    p.add_argument("--editors", type=int, default=8, help="typing mode: simulated editors, each with its own session")
    p.add_argument("--cps", type=float, default=8.0, help="typing mode: characters typed per second (±20%% jitter)")
    p.add_argument("--pause-s", type=float, default=1.0, help="typing mode: mean pause after each typed line (exponential)")
    p.add_argument("--debounce-ms", type=float, default=150.0, help="typing mode: idle time before a completion is requested")
    p.add_argument("--switch-s", type=float, default=30.0, help="typing mode: seconds before an editor opens another file")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (default 32; throughput mode 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (throughput mode always 0)")
    p.add_argument("--prompt-tokens", type=int, default=512,
                   help=f"rate/concurrency/throughput: prompt length, approximated as {CHARS_PER_TOKEN} characters per token")
    p.add_argument("--suffix-chars", type=int, default=0,
                   help="send this much of the text after the cursor as `suffix` (fill-in-the-middle); 0: none")
    p.add_argument("--max-file-chars", type=int, default=24000, help="use standard-library files up to this size")
    p.add_argument("--rounds", type=int, default=3, help="throughput mode: rounds per stream count (medians are reported)")
    p.add_argument("--wait-s", type=float, default=600.0, help="wait this long for the server to report ready")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of files, prompts, arrivals and typing")
    p.add_argument("--json", metavar="OUT", help="write the configuration, the summary and every request here")
    args = p.parse_args(argv)
    if args.mode == "throughput":
        args.temperature = 0.0
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
