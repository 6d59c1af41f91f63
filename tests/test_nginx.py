"""deploy/nginx.conf in front of two real ``ponder serve`` replicas.

The router's contract (docs/design.md, "Scaling out"): every request of a session reaches the
replica that holds the session, sessions spread over the replicas, and when a
replica goes away (drains on SIGTERM, then exits) its sessions continue, cold,
on another one, with no error to the client; when a replica dies (SIGKILL) mid-stream, only that
stream is cut, and the session's next request rebuilds it from the prompt on another replica, with
the same greedy text. The test runs the deployment's
own nginx.conf, rendered with local addresses, and reads which replica
answered from ``X-Ponder-Upstream``.
"""

import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conftest
import grpc
import httpx
from conftest import LIVE_SLOTS, LiveServer, free_port, require_tool

NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
# Over one 64-token chunk, so that the session commits state a follow-up can reuse.
PROMPT = """import os


def read_lines(path):
    with open(path) as f:
        return [line.rstrip() for line in f]


def write_lines(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write(line + "\\n")


"""
SESSIONS = [f"doc-{i}" for i in range(12)]


def render_config(text: str, http: list[str], grpc: list[str], port: int, grpc_port: int, tmp: Path) -> str:
    """deploy/nginx.conf with local replicas, local ports and temp paths under ``tmp``.

    Everything else (the routing key, hashing, failover, proxying) is the
    deployment's. ``resolve`` and the cluster DNS resolver are dropped: the
    replicas are literal addresses, and the nginx of a test machine may
    predate ``resolve``.
    """
    replicas = {"ponder_http": http, "ponder_grpc": grpc}

    def upstream(match: re.Match) -> str:
        servers = list(re.finditer(r"^(\s*)server\s+[^\s;{]+([^;{]*);\n", match["body"], flags=re.M))
        assert servers, f"no server lines in upstream {match['name']}"
        indent, params = servers[0][1], servers[0][2].replace(" resolve", "")
        lines = "".join(f"{indent}server {address}{params};\n" for address in replicas[match["name"]])
        body = match["body"][: servers[0].start()] + lines + match["body"][servers[-1].end():]
        return f"upstream {match['name']} {{{body}}}"

    text, n = re.subn(r"upstream (?P<name>\w+) \{(?P<body>[^}]*)\}", upstream, text)
    assert n == 2, "deploy/nginx.conf should have the upstreams ponder_http and ponder_grpc"
    text = re.sub(r"^\s*resolver .*;\n", "", text, flags=re.M)
    text, n_http = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", text)
    text, n_grpc = re.subn(r"listen 50051 http2;", f"listen 127.0.0.1:{grpc_port} http2;", text)
    assert n_http == n_grpc == 1
    text, n_pid = re.subn(r"^pid .*;$", f"pid {tmp / 'nginx.pid'};", text, flags=re.M)
    assert n_pid == 1
    # Every file nginx writes goes to this test's directory (nginx's compiled-in defaults are system paths).
    text = re.sub(r"^\s*\w+_temp_path .*;\n", "", text, flags=re.M)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "".join(f"    {kind}_temp_path {tmp / kind};\n" for kind in kinds)
    return text.replace("http {\n", "http {\n" + temp, 1)


class Nginx:
    """nginx in the foreground on a rendered config, with its files in ``tmp``."""

    def __init__(self, nginx: str, config: str, tmp: Path):
        self.tmp, self.log = tmp, tmp / "nginx.log"
        (tmp / "nginx.conf").write_text(config)
        command = [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
        files = f"error_log {self.log} info;"
        check = subprocess.run([*command, "-g", files, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        with open(tmp / "nginx.out", "w") as out:
            run = [*command, "-g", files + " daemon off;"]
            self.process = subprocess.Popen(run, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return "\n".join(p.read_text() for p in (self.tmp / "nginx.out", self.log) if p.exists())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_listening(url: str, nginx: Nginx, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert nginx.process.poll() is None, nginx.output()
        try:
            httpx.get(url + "/health", timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"nginx not listening after {timeout} s:\n{nginx.output()}")


def complete(client: httpx.Client, session: str, prompt: str, **fields) -> tuple[str, dict]:
    """One completion in ``session`` through the router: (replica address, ponder fields and ``text``)."""
    body = {"prompt": prompt, "max_tokens": 2, "session_id": session, **fields}
    response = client.post("/v1/completions", json=body, headers={"X-Session-Id": session})
    assert response.status_code == 200, f"{session}: {response.status_code} {response.text}"
    # After a failover nginx lists every replica it tried; the last one answered.
    answer = response.json()
    return response.headers["X-Ponder-Upstream"].split(", ")[-1], {**answer["ponder"], "text": answer["choices"][0]["text"]}


def stream_directly(url: str, session: str, started: threading.Event) -> list[str]:
    """A long completion streamed from one replica, bypassing the router: its SSE lines."""
    body = {"prompt": PROMPT, "max_tokens": 256, "stream": True, "session_id": session}
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
                started.set()
    return lines


def complete_grpc(channel, session: str, prompt: str) -> tuple[str, int]:
    """One streamed gRPC completion through the router: (replica address, cached tokens)."""
    from ponder.v1 import completion_pb2, completion_pb2_grpc

    request = completion_pb2.CompleteRequest(prompt=prompt, max_tokens=2, session_id=session)
    stub = completion_pb2_grpc.CompletionStub(channel)
    call = stub.Complete(request, metadata=[("x-session-id", session)], timeout=120)
    replies = list(call)
    assert replies[-1].session_id == session
    return dict(call.initial_metadata())["x-ponder-upstream"].split(", ")[-1], replies[-1].usage.cached_tokens


def test_sessions_stick_to_a_replica_and_fail_over_cold(tmp_path, compile_cache, monkeypatch):
    nginx_bin = require_tool("nginx")
    cache = compile_cache
    replicas, nginx = [], None
    try:
        # Warm-up dominates the test. One after the other, the second replica loads what the
        # first compiled from the shared cache; started together, both would compile everything.
        replicas.append(LiveServer("--slots", LIVE_SLOTS, "--compile-cache", cache))
        replicas[0].wait_ready(timeout=600)
        replicas.append(LiveServer("--slots", LIVE_SLOTS, "--compile-cache", cache))
        replicas[1].wait_ready(timeout=600)
        address = {f"127.0.0.1:{r.port}": r for r in replicas}
        port, grpc_port = free_port(), free_port()
        config = render_config(
            NGINX_CONF.read_text(), list(address), [r.grpc_target for r in replicas], port, grpc_port, tmp_path
        )
        nginx = Nginx(nginx_bin, config, tmp_path)
        router = f"http://127.0.0.1:{port}"
        wait_listening(router, nginx)

        with httpx.Client(base_url=router, timeout=120) as client:
            # Each session: a first request, then two that extend the document.
            home = {}
            for session in SESSIONS:
                prompt = f"# {session}\n" + PROMPT
                home[session], first = complete(client, session, prompt)
                assert first["session_id"] == session
                for step in range(2):
                    prompt += f"x_{step} = {step}\n"
                    upstream, follow = complete(client, session, prompt)
                    assert upstream == home[session], f"{session} moved from {home[session]} to {upstream}"
                    assert follow["cached_tokens"] > 0, f"{session}: the replica did not reuse the session"
            assert set(home.values()) == set(address), f"sessions not spread over both replicas: {home}"

            # A reset names its session only in the path, and reaches the replica holding it.
            reset = client.post(f"/v1/sessions/{SESSIONS[0]}/reset")
            assert reset.headers["X-Ponder-Upstream"] == home[SESSIONS[0]]
            assert reset.json()["existed"] is True
            home[SESSIONS[0]], _ = complete(client, SESSIONS[0], f"# {SESSIONS[0]}\n" + PROMPT + "x_0 = 0\nx_1 = 1\n")

            # Without a session id, one client keeps one replica (its prefix-matched sessions live there).
            anonymous = [client.post("/infill", json={"input_prefix": PROMPT, "n_predict": 2}) for _ in range(2)]
            assert [r.status_code for r in anonymous] == [200, 200]
            assert anonymous[0].headers["X-Ponder-Upstream"] == anonymous[1].headers["X-Ponder-Upstream"]

            # SSE passes through whole, and stays on the session's replica.
            body = {"prompt": f"# {SESSIONS[1]}\n" + PROMPT, "max_tokens": 4, "stream": True, "session_id": SESSIONS[1]}
            with client.stream("POST", "/v1/completions", json=body, headers={"X-Session-Id": SESSIONS[1]}) as stream:
                assert stream.headers["X-Ponder-Upstream"] == home[SESSIONS[1]]
                events = [line for line in stream.iter_lines() if line]
            assert events[0].startswith("data: {") and events[-1] == "data: [DONE]"

            # gRPC hashes on the x-session-id metadata the same way (on its own ring: nginx places
            # a server by address and port, so a session's HTTP and gRPC homes may differ).
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                prompt = "# grpc-doc\n" + PROMPT
                grpc_home, _ = complete_grpc(channel, "grpc-doc", prompt)
                assert grpc_home in {r.grpc_target for r in replicas}
                upstream, cached = complete_grpc(channel, "grpc-doc", prompt + "z = 0\n")
                assert upstream == grpc_home and cached > 0, (upstream, grpc_home, cached)

            # One replica goes away while it still streams (SIGTERM: it drains, then exits). No
            # request may fail, neither during the drain nor after the exit.
            lost, kept = list(address)

            def extend_all(tail: str) -> dict[str, tuple[str, dict]]:
                """Every session's next request, four at a time: failover under load, not one by one."""
                with ThreadPoolExecutor(4) as pool:
                    answers = pool.map(lambda s: complete(client, s, f"# {s}\n" + PROMPT + tail), SESSIONS)
                    return dict(zip(SESSIONS, answers))

            with ThreadPoolExecutor(2) as drain:
                # Long streams in both of its slots, so that the drain outlasts the requests below.
                streaming = [threading.Event() for _ in range(2)]
                running = [drain.submit(stream_directly, address[lost].url, f"long-{i}", e) for i, e in enumerate(streaming)]
                assert all(started.wait(timeout=120) for started in streaming)
                address[lost].process.send_signal(signal.SIGTERM)
                during = extend_all("x_0 = 0\nx_1 = 1\ny = 2\n")
                assert address[lost].process.poll() is None, "the replica exited before the requests: no drain tested"
                assert all(f.result(timeout=120)[-1] == "data: [DONE]" for f in running), "a draining stream was cut"
            assert address[lost].stop() == 0, address[lost].output()
            for session, (upstream, answer) in during.items():
                assert upstream == kept, f"{session} answered by {upstream} while {lost} drained"
                moved = home[session] == lost
                assert (answer["cached_tokens"] == 0) == moved, f"{session} (moved: {moved}): {answer}"

            # The moved sessions now live on the remaining replica.
            for session, (upstream, answer) in extend_all("x_0 = 0\nx_1 = 1\ny = 2\nz = 3\n").items():
                assert upstream == kept and answer["cached_tokens"] > 0, f"{session} after {lost} exited: {answer}"

            # The replica comes back on its address (warm from the compile cache) and takes its share of
            # new sessions again; then it dies (SIGKILL) in the middle of a session's stream.
            ports = iter([address[lost].port, address[lost].grpc_port])
            monkeypatch.setattr(conftest, "free_port", lambda: next(ports))
            back = LiveServer("--slots", LIVE_SLOTS, "--compile-cache", cache)
            replicas.append(back)
            back.wait_ready(timeout=600)
            greedy = {"max_tokens": 8, "temperature": 0}
            for session in (f"killed-{i}" for i in range(40)):  # a new session that hashes to the returned replica
                prompt = f"# {session}\n" + PROMPT
                upstream, before = complete(client, session, prompt, **greedy)
                if upstream == lost:
                    break
            assert upstream == lost and before["cached_tokens"] == 0, (upstream, before)
            body = {"prompt": prompt, "max_tokens": 256, "stream": True, "session_id": session, "temperature": 0}
            events = []
            with client.stream("POST", "/v1/completions", json=body, headers={"X-Session-Id": session}) as stream:
                assert stream.status_code == 200 and stream.headers["X-Ponder-Upstream"] == lost
                try:
                    for line in filter(None, stream.iter_lines()):
                        events.append(line)
                        if len(events) == 2:
                            back.process.send_signal(signal.SIGKILL)
                except httpx.HTTPError:
                    pass  # the cut stream: the only failed request of this part
            assert back.process.wait(timeout=30) == -signal.SIGKILL
            assert "data: [DONE]" not in events, "the stream finished before the replica was killed"
            upstream, after = complete(client, session, prompt, **greedy)
            assert upstream == kept and after["cached_tokens"] == 0, (upstream, after)  # rebuilt from the prompt
            assert after["text"] == before["text"], (before, after)  # cold start on either replica: one text
    except BaseException:
        print(nginx.output() if nginx else "nginx did not start")
        for replica in replicas:
            print(replica.output()[-4000:])
        raise
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.stop()
