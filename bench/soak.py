"""Soak: ``ponder serve`` under valid, invalid, cancelled and oversized requests for minutes, then SIGTERM.

Starts a server (the bundled checkpoint unless ``--checkpoint``) on free
local ports and keeps it busy from this one process, over HTTP and gRPC:

* editors (``--editors`` per protocol): each grows a real standard-library
  file in a named session of its own, a few lines per request, with
  streamed completions (on gRPC an ingestion now and then); past
  ``--doc-chars`` it moves on to another file under a new document id;
* anonymous completions (no session id; ``/infill`` with a suffix);
* invalid requests: fields out of range, bodies that are not JSON or not
  sent as JSON, a foreign ``Host``, an unknown route, gRPC messages that do
  not parse;
* cancelled ones: streams closed after their first chunk (HTTP and gRPC),
  and a body that stops arriving (answered 408 after ``--body-timeout-s``);
* oversized ones: a body over the server's ``--max-body-bytes``, a prompt
  longer than any prompt of ``--max-prompt-tokens`` tokens can be, and one
  short enough to tokenize but over the limit.

Then SIGTERM, with the load still running, and the time until the process
is gone. Reported (``--json`` writes them too):

* **5xx** before the SIGTERM: HTTP answers >= 500 and the gRPC codes that
  mean a server fault (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED). Goal 0.
  Answers of the wrong kind (an invalid request served, a valid one
  refused) are listed apart as *unexpected*.
* **lost sessions**: an editor request that extends the document of the
  session's previous request, which had completed, and gets
  ``cached_tokens == 0`` while ``ponder_sessions_evicted_total`` did not move
  since that previous request was sent: committed tokens that vanished
  without eviction pressure. Goal 0. Warm requests answered cold for any
  reason (an eviction included) are counted too.
* **RSS** of the server: when warm, before the load; at the end, before the
  SIGTERM; and its peak (sampled each second), beside ``--session-memory``
  and what ``/metrics`` says the sessions hold (and sessions, evictions and
  compilations, at the start and the end).
* **shutdown**: seconds from SIGTERM to the exit, and the exit code. Goal:
  within ``--drain-s`` + 5 s, exit 0.

    python bench/soak.py --minutes 10 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

from ponder.v1 import completion_pb2 as pb
from ponder.v1 import completion_pb2_grpc as pb_grpc

GRPC_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                      grpc.StatusCode.UNIMPLEMENTED}
JSON = {"Content-Type": "application/json"}


@dataclasses.dataclass
class Tally:
    """What the server answered, by kind of request."""

    answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (kind, answer) -> n
    server_errors: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    lost_sessions: list[str] = dataclasses.field(default_factory=list)
    warm_checks: int = 0
    warm_misses: int = 0  # warm-expected requests answered cold, lost or not
    draining: bool = False  # SIGTERM sent: refusals and dropped connections are expected from here on

    def record(self, kind: str, answer: str, expected: bool, server_fault: bool = False) -> None:
        if self.draining:
            kind += " (after SIGTERM)"
        self.answers[kind, answer] += 1
        if self.draining:
            return
        if server_fault:
            self.server_errors.append(f"{kind}: {answer}")
        elif not expected:
            self.unexpected.append(f"{kind}: {answer}")


class Soak:
    def __init__(self, args, http_url: str, grpc_target: str, files: list[str]):
        self.args, self.url, self.files = args, http_url, files
        self.http = httpx.AsyncClient(base_url=http_url, timeout=120)
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = pb_grpc.CompletionStub(self.channel)
        self.tally = Tally()
        self.rng = random.Random(args.seed)

    # --- Helpers.

    def _http_answer(self, kind: str, status: int, ok: set[int]) -> None:
        self.tally.record(kind, str(status), status in ok, status >= 500)

    def _grpc_answer(self, kind: str, code: grpc.StatusCode, ok: set[grpc.StatusCode]) -> None:
        self.tally.record(kind, code.name, code in ok, code in GRPC_SERVER_FAULTS)

    async def metric(self, name: str) -> float:
        """A counter or gauge of the server's ``/metrics``, summed over its labels."""
        text = (await self.http.get("/metrics")).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))

    async def evictions(self) -> float:
        return await self.metric("ponder_sessions_evicted_total")

    async def server_state(self) -> dict:
        """What the server holds: sessions, their bytes, evictions so far, compilations so far."""
        names = {"sessions": "ponder_sessions_active", "session_memory_mib": "ponder_session_memory_bytes",
                 "evictions": "ponder_sessions_evicted_total", "compilations": "ponder_compilations_total"}
        state = {key: await self.metric(name) for key, name in names.items()}
        state["session_memory_mib"] = round(state["session_memory_mib"] / 2**20, 1)
        return state

    def window(self, chars: int) -> str:
        text = self.rng.choice(self.files)
        start = self.rng.randrange(max(1, len(text) - chars))
        return text[start:start + chars]

    # --- Editors: named sessions that grow, checked for lost state.

    async def editor(self, name: str, protocol: str) -> None:
        rng = random.Random(f"{self.args.seed}-{name}")
        document, text, end, warm_expected, evictions_then = 0, "", 0, False, 0.0
        while True:
            if not text or end >= min(len(text), self.args.doc_chars):
                document, text, end, warm_expected = document + 1, rng.choice(self.files), 0, False
            end = min(len(text), max(end, 600) + rng.randint(40, 400))
            prompt, doc_id = text[:end], f"{name}-doc{document}"
            evictions_now = await self.evictions()
            try:
                if protocol == "grpc" and rng.random() < 0.2:
                    cached = await self._grpc_ingest(name, doc_id, prompt)
                elif protocol == "grpc":
                    cached = await self._grpc_complete(name, doc_id, prompt)
                else:
                    cached = await self._http_complete(name, doc_id, prompt)
            except (httpx.HTTPError, grpc.RpcError, OSError):
                if not self.tally.draining:
                    self.tally.record(f"{protocol} editor", "no answer", False)
                warm_expected = False
                await asyncio.sleep(0.5)
                continue
            if cached is not None and warm_expected:
                self.tally.warm_checks += 1
                self.tally.warm_misses += cached == 0
                if cached == 0 and await self.evictions() == evictions_then:
                    self.tally.lost_sessions.append(f"{name} {doc_id} at {len(prompt)} characters")
            warm_expected, evictions_then = cached is not None, evictions_now
            await asyncio.sleep(rng.uniform(0.05, 0.3))

    async def _http_complete(self, session: str, doc_id: str, prompt: str) -> int | None:
        body = {"prompt": prompt, "max_tokens": 16, "stream": True, "session_id": session, "document_id": doc_id}
        cached = None
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.tally.record("http editor", f"in-band {event['error'].get('code')}", False,
                                          event["error"].get("code", 0) >= 500)
                        return None
                    cached = event.get("ponder", {}).get("cached_tokens", cached)
        self._http_answer("http editor", response.status_code, {200})
        return cached if response.status_code == 200 else None

    async def _grpc_complete(self, session: str, doc_id: str, prompt: str) -> int | None:
        request = pb.CompleteRequest(prompt=prompt, max_tokens=16, session_id=session, document_id=doc_id)
        try:
            async for message in self.stub.Complete(request, timeout=120):
                if message.HasField("usage"):
                    self._grpc_answer("grpc editor", grpc.StatusCode.OK, {grpc.StatusCode.OK})
                    return message.usage.cached_tokens
        except grpc.aio.AioRpcError as error:
            self._grpc_answer("grpc editor", error.code(), {grpc.StatusCode.OK})
        return None

    async def _grpc_ingest(self, session: str, doc_id: str, prompt: str) -> int | None:
        try:
            answer = await self.stub.Ingest(pb.IngestRequest(text=prompt, session_id=session, document_id=doc_id), timeout=120)
        except grpc.aio.AioRpcError as error:
            self._grpc_answer("grpc ingest", error.code(), {grpc.StatusCode.OK})
            return None
        self._grpc_answer("grpc ingest", grpc.StatusCode.OK, {grpc.StatusCode.OK})
        return answer.usage.cached_tokens

    # --- The rest of the mix: one request per turn, each kind in turn.

    async def anonymous(self) -> None:
        prompt = self.window(2000)
        if self.rng.random() < 0.5:
            r = await self.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8})
            self._http_answer("http anonymous", r.status_code, {200})
        elif self.rng.random() < 0.5:
            cut = len(prompt) // 2
            r = await self.http.post("/infill", json={"input_prefix": prompt[:cut], "input_suffix": prompt[cut:], "n_predict": 8})
            self._http_answer("http infill", r.status_code, {200})
        else:
            try:
                async for _ in self.stub.Complete(pb.CompleteRequest(prompt=prompt, max_tokens=8), timeout=120):
                    pass
                self._grpc_answer("grpc anonymous", grpc.StatusCode.OK, {grpc.StatusCode.OK})
            except grpc.aio.AioRpcError as error:
                self._grpc_answer("grpc anonymous", error.code(), {grpc.StatusCode.OK})

    async def invalid(self) -> None:
        choice = self.rng.randrange(8)
        refused = {400, 403, 404, 405, 413, 415}
        if choice == 0:
            r = await self.http.post("/v1/completions", json={"prompt": "x", "temperature": -1, "max_tokens": 10**6})
        elif choice == 1:
            r = await self.http.post("/infill", content=b'{"input_prefix": "x",', headers=JSON)
        elif choice == 2:
            r = await self.http.post("/v1/completions", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
        elif choice == 3:
            r = await self.http.post("/v1/completions", json={"prompt": "x"}, headers={"Host": "evil.example"})
        elif choice == 4:
            r = await self.http.get("/v2/nothing-here")
        elif choice == 5:
            r = await self.http.post("/v1/completions", json={"prompt": "x", "no_such_field": 1})
        else:
            data = self.rng.choice([b"\x0a\x02\xff\xfe", b"\x0a\x10abc", b"\x22\x05"])
            method = "/ponder.v1.Completion/Complete" if choice == 6 else "/ponder.v1.Completion/Ingest"
            call = (self.channel.unary_stream if choice == 6 else self.channel.unary_unary)(method)  # raw bytes out
            try:
                answer = call(data, timeout=30)
                if choice == 6:
                    async for _ in answer:
                        pass
                else:
                    await answer
                self._grpc_answer("grpc malformed", grpc.StatusCode.OK, set())
            except grpc.aio.AioRpcError as error:
                self._grpc_answer("grpc malformed", error.code(), {grpc.StatusCode.INVALID_ARGUMENT})
            return
        self._http_answer("http invalid", r.status_code, refused)

    async def cancelled(self) -> None:
        choice = self.rng.randrange(5)
        prompt = self.window(1500)
        if choice <= 1:  # an editor's keystroke: the stream closes after its first chunk
            async with self.http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 64, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break
            self._http_answer("http cancelled", r.status_code, {200})
        elif choice <= 3:
            call = self.stub.Complete(pb.CompleteRequest(prompt=prompt, max_tokens=64), timeout=120)
            try:
                async for _ in call:
                    break
                call.cancel()
                self.tally.record("grpc cancelled", "cancelled", True)
            except grpc.aio.AioRpcError as error:
                self._grpc_answer("grpc cancelled", error.code(), {grpc.StatusCode.OK})
        else:  # 4 of 100 body bytes, then nothing
            status = await self.raw_post(b"Content-Length: 100\r\n\r\n{\"pr", self.args.body_timeout_s + 10)
            self.tally.record("http partial body", status, status == "408", status.startswith("5"))

    async def raw_post(self, rest: bytes, timeout_s: float) -> str:
        """The status of a ``POST /v1/completions`` whose request, after its first headers, is ``rest``."""
        host, port = self.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" + rest)
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), timeout_s)).split(b" ")[1].decode()
        except (TimeoutError, IndexError):
            return "no answer"
        finally:
            writer.close()

    async def oversized(self) -> None:
        choice = self.rng.randrange(3)
        if choice == 0:  # refused on its declared length, before a byte of it is read
            status = await self.raw_post(f"Content-Length: {self.args.max_body_bytes + 1}\r\n\r\n".encode(), 30)
            self.tally.record("http body over the cap", status, status == "413", status.startswith("5"))
        elif choice == 1:  # longer than any prompt of the token limit can be: refused unread
            r = await self.http.post("/v1/completions", json={"prompt": "x" * (self.args.max_prompt_tokens * 128)})
            self._http_answer("http prompt over the bound", r.status_code, {400})
        else:  # tokenized, then refused on its count
            prompt = "x = 1\n" * (self.args.max_prompt_tokens // 2)
            try:
                await self.stub.Ingest(pb.IngestRequest(text=prompt), timeout=120)
                self._grpc_answer("grpc prompt over the limit", grpc.StatusCode.OK, set())
            except grpc.aio.AioRpcError as error:
                self._grpc_answer("grpc prompt over the limit", error.code(), {grpc.StatusCode.INVALID_ARGUMENT})

    async def loop(self, turn) -> None:
        while True:
            try:
                await turn()
            except (httpx.HTTPError, grpc.RpcError, OSError) as error:
                if not self.tally.draining:
                    self.tally.record(turn.__name__, f"no answer ({type(error).__name__})", False)
                await asyncio.sleep(0.5)
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str, str, Path]:
    port, grpc_port = free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="ponder-soak-", suffix=".log")[1])
    command = [sys.executable, "-m", "ponder", "serve", "--port", str(port), "--grpc-port", str(grpc_port),
               "--slots", str(args.slots), "--drain-s", str(args.drain_s), "--session-memory", str(args.session_memory),
               "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-body-bytes", str(args.max_body_bytes),
               "--body-timeout-s", str(args.body_timeout_s), "--log-level", "warning"]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    if args.compile_cache is not None:
        command += ["--compile-cache", args.compile_cache]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.ready_timeout_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"ponder serve exited with {process.returncode}; its log: {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url, f"127.0.0.1:{grpc_port}", log
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"ponder serve not ready after {args.ready_timeout_s:.0f} s; its log: {log}")
        time.sleep(1)


async def soak(args, process: subprocess.Popen, url: str, grpc_target: str) -> dict:
    root = Path(os.__file__).parent
    files = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))]
    files = [text for text in files if len(text) > 4000]
    s = Soak(args, url, grpc_target, files)
    rss = {"start": rss_bytes(process.pid), "peak": 0}
    rss_by_minute = []
    state = {"start": await s.server_state()}
    turns = [s.anonymous, s.anonymous, s.invalid, s.cancelled, s.oversized]
    tasks = [asyncio.create_task(s.editor(f"{protocol}-{i}", protocol)) for protocol in ("http", "grpc")
             for i in range(args.editors)]
    tasks += [asyncio.create_task(s.loop(turn)) for turn in turns]
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        await asyncio.sleep(1)
        now = rss_bytes(process.pid)
        rss["peak"] = max(rss["peak"], now)
        if time.monotonic() > end - args.minutes * 60 + 60 * (len(rss_by_minute) + 1):
            rss_by_minute.append(round(now / 2**20))
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()
    rss["end"] = rss_bytes(process.pid)
    state["end"] = await s.server_state()
    s.tally.draining = True
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(process.wait, args.drain_s + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "killed"
    shutdown_s = time.monotonic() - signalled
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await s.http.aclose()
    await s.channel.close()
    t = s.tally
    return {
        "minutes": args.minutes, "server_errors": len(t.server_errors), "server_error_examples": t.server_errors[:20],
        "unexpected": len(t.unexpected), "unexpected_examples": t.unexpected[:20],
        "lost_sessions": len(t.lost_sessions), "lost_session_examples": t.lost_sessions[:20], "warm_checks": t.warm_checks,
        "warm_misses": t.warm_misses,
        "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()}, "rss_mib_by_minute": rss_by_minute,
        "session_memory_mib": args.session_memory,
        "server": state,
        "shutdown_s": round(shutdown_s, 2), "exit_code": code, "drain_s": args.drain_s,
        "answers": {f"{kind}: {answer}": n for (kind, answer), n in sorted(t.answers.items())},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--checkpoint", default=None, help="default: the bundled one")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--editors", type=int, default=3, help="editors per protocol")
    p.add_argument("--doc-chars", type=int, default=24000, help="an editor moves to another file past this many characters")
    p.add_argument("--drain-s", type=float, default=5)
    p.add_argument("--session-memory", type=float, default=1024, help="MiB (the server's --session-memory)")
    p.add_argument("--max-prompt-tokens", type=int, default=16384)
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--body-timeout-s", type=float, default=10)
    p.add_argument("--compile-cache", default=None, help="the server's --compile-cache (default: its own default)")
    p.add_argument("--ready-timeout-s", type=float, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args()
    process, url, grpc_target, log = start_server(args)
    try:
        report = asyncio.run(soak(args, process, url, grpc_target))
    finally:
        if process.poll() is None:
            process.kill()
    report["server_log"] = str(log)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"\n5xx: {report['server_errors']} (goal 0); unexpected answers: {report['unexpected']}; lost sessions: "
          f"{report['lost_sessions']} of {report['warm_checks']} warm requests (goal 0; {report['warm_misses']} answered "
          f"cold in all); RSS {report['rss_mib']['start']} -> "
          f"{report['rss_mib']['end']} MiB (peak {report['rss_mib']['peak']}, session cap {args.session_memory:g}); "
          f"shutdown {report['shutdown_s']} s, exit {report['exit_code']} (goal <= {args.drain_s + 5:g} s, 0)")


if __name__ == "__main__":
    main()
