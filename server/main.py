"""``ponder serve``: one process, one engine, HTTP and gRPC in front of it.

The engine warms up in the background while both front ends already listen,
so ``/health`` answers 503 (and gRPC health NOT_SERVING) until every shape
is compiled. SIGTERM (or Ctrl-C) drains: new requests get 503 / UNAVAILABLE,
running ones go on for up to ``--drain-s``, then every one still running ends
with 503 / UNAVAILABLE and the process exits. A second signal ends them at
once. Whatever is stuck, the process is gone ``Shutdown.GRACE_S`` after the
drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.server.auth import parse_api_keys
from ponder.server.http.config import HttpConfig

if TYPE_CHECKING:
    from ponder.model.gating import Schedule


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    """``--weights``: how the base's weights are held in memory (``model.quantize``)."""
    from ponder.model.quantize import WEIGHTS

    p.add_argument("--weights", default="float32", choices=WEIGHTS,
                   help="store the base's kernels and token table in float32, bfloat16, or int8 with a scale per "
                        "output (activations then quantized per token); fast weights stay float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags (``ponder serve`` adds the ``--schedule`` family beside them).

    Unset flags are the config dataclasses' defaults: ``EngineConfig`` (slots, queue,
    session memory, tokens per request), ``Limits`` (prompt length), ``HttpConfig`` (body size and time).
    """
    from ponder.server.engine import EngineConfig
    from ponder.server.service import Limits

    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint directory (default: the bundled one)")
    add_weights_argument(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for every interface); on a loopback address, HTTP answers "
                        "only the Host names localhost, 127.0.0.1 and [::1] (against DNS rebinding)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: no gRPC)")
    p.add_argument("--slots", type=int, default=EngineConfig.slots, help="decode slots (requests generating at once)")
    p.add_argument("--queue-size", type=int, default=EngineConfig.queue_size, help="requests waiting for a slot before 429")
    p.add_argument("--session-memory", type=float, default=EngineConfig.session_memory_mb,
                   help="MiB that sessions may hold (LRU eviction)")
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens, help="longest prompt, in tokens")
    p.add_argument("--max-tokens", type=int, default=EngineConfig.max_new_tokens, help="most tokens one request may generate")
    p.add_argument("--max-body-bytes", type=int, default=HttpConfig.max_body_bytes, help="largest HTTP request body")
    p.add_argument("--body-timeout-s", type=float, default=HttpConfig.body_timeout_s,
                   help="seconds an HTTP request body may take to arrive (then 408)")
    p.add_argument(
        "--api-key", action="append", default=None,
        help="require this bearer token; several: comma-separated (k1,k2) or the flag repeated (default: "
             "$PONDER_API_KEY, read the same way; none: no auth)",
    )
    p.add_argument("--compile-cache", default=str(Path.home() / ".cache" / "ponder" / "jax"), help="persistent XLA cache ('' to disable)")
    p.add_argument("--drain-s", type=float, default=30.0,
                   help="how long SIGTERM waits for running requests (then they end with 503 / UNAVAILABLE; "
                        "a second SIGTERM or Ctrl-C ends them at once)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="listen on a non-loopback --host without any API key: anyone who reaches the port may "
                        "complete, read and reset every session (without this flag such a server refuses to start)")
    p.add_argument("--ui", action="store_true",
                   help="serve the λ viewer (GET /ui) without --api-key: any local client may then read any session's "
                        "text (with keys it is always on, each key seeing its own sessions)")
    p.add_argument("--log-level", default="info")


def run(args, schedule: Schedule) -> None:
    """Loads the checkpoint, starts the engine, serves until SIGTERM / Ctrl-C.

    Args:
      args: the flags of ``add_arguments``.
      schedule: where λ comes from.
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ponder.serve")
    keys = parse_api_keys(args.api_key, os.environ.get("PONDER_API_KEY", ""))
    refuse_open_bind(args.host, keys, args.insecure_no_auth)
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import uvicorn

    from ponder.model import checkpoint
    from ponder.server.engine import Engine, EngineConfig
    from ponder.server.grpc_server import build_grpc_server
    from ponder.server.http.app import build_app
    from ponder.server.http.hosts import allowed_hosts
    from ponder.server.metrics import ServerMetrics
    from ponder.server.service import CompletionService, Limits

    model, tokenizer = checkpoint.load(args.checkpoint, weights=args.weights)
    if schedule.kind == "policy" and getattr(model, "policy", None) is None:
        raise ValueError(f"--schedule policy needs a checkpoint with an update policy; {args.checkpoint} has none "
                         "(add one with `ponder train policy`)")
    metrics = ServerMetrics.create()
    config = EngineConfig(
        slots=args.slots, max_new_tokens=args.max_tokens, queue_size=args.queue_size,
        session_memory_mb=args.session_memory, schedule=schedule,
    )
    engine = Engine(model, config, metrics)
    service = CompletionService(engine, tokenizer, Limits(max_prompt_tokens=args.max_prompt_tokens))
    name = Path(args.checkpoint).name
    app = build_app(service, engine, metrics, api_keys=keys, max_body_bytes=args.max_body_bytes, model_name=name,
                    ui=args.ui, body_timeout_s=args.body_timeout_s, allowed_hosts=allowed_hosts(args.host))
    grpc_server = None
    if args.grpc_port:
        grpc_server = build_grpc_server(service, engine, metrics, keys, f"{args.host}:{args.grpc_port}")
        grpc_server.start()
    warmup = threading.Thread(target=engine.start, name="ponder-warmup", daemon=True)
    warmup.start()
    shutdown = Shutdown(engine, args.drain_s)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C
            shutdown.signal(sig)
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signals it caught once serve() returns, which would kill the
            # process before the engine and gRPC have drained; this process exits by itself.
            self._captured_signals.clear()

    # HTTP requests run until the engine ends them (a 503, in-band in a stream) at the drain's end:
    # uvicorn waits a little longer, so that their answers go out whole.
    http = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                 timeout_graceful_shutdown=args.drain_s + 1))
    log.info("ponder: HTTP on %s:%d, gRPC on %s, checkpoint %s, %d slots", args.host, args.port,
             args.grpc_port or "off", args.checkpoint, args.slots)

    def signal_outside_uvicorn(sig, frame):
        # uvicorn handles the signals while it serves and puts this handler back when it stops,
        # while the engine and gRPC may still drain. Before serving, a signal ends the process.
        if not engine.draining:
            raise SystemExit(128 + sig)
        shutdown.signal(sig)

    on_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    if on_main_thread:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal_outside_uvicorn)
    asyncio.run(http.serve())
    shutdown.begin("the HTTP server stopped")  # no-op after a signal: it began then
    shutdown.stopped.wait()
    if grpc_server is not None:
        grpc_server.stop(grace=1).wait()  # every call has its final event: they end within one poll
    log.info("ponder: stopped")
    if on_main_thread:
        # Nothing is left to drain. Python's shutdown puts the default actions back while XLA and
        # gRPC tear down (a few hundred ms), which would turn a late signal into exit -15.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    if warmup.is_alive():  # stopped while compiling: XLA aborts the process if Python finalizes under it
        logging.shutdown()
        os._exit(0)


def refuse_open_bind(host: str, keys: tuple[str, ...], insecure_no_auth: bool) -> None:
    """Fails closed: a server reachable from other machines needs a key, or the explicit unsafe flag.

    Raises:
      SystemExit: ``host`` is not a loopback address, ``keys`` is empty and ``insecure_no_auth`` is not set.
    """
    from ponder.server.http.hosts import allowed_hosts

    if keys or insecure_no_auth or allowed_hosts(host):
        return
    raise SystemExit(
        f"ponder serve: --host {host} listens beyond this machine, but no API key is set: give --api-key KEY "
        "(or $PONDER_API_KEY; several comma-separated), or --insecure-no-auth to serve every client unauthenticated"
    )


class Shutdown:
    """What SIGTERM and Ctrl-C do: one drain, one deadline, for the engine and both front ends.

    The first signal makes the engine refuse new jobs and starts ``Engine.stop(drain_s)`` on a
    thread of its own: running jobs go on until the deadline, then each ends with a final event
    (503 / UNAVAILABLE), so the HTTP and gRPC calls waiting on them return. A second signal cuts
    the drain short. A watchdog ends the process ``GRACE_S`` after the deadline (``HURRY_S`` after
    a second signal) if it is still here, naming the threads that held it (``exit``: ``os._exit``, which
    joins no thread).
    """

    GRACE_S = 4.0
    HURRY_S = 2.0

    def __init__(self, engine, drain_s: float, exit=os._exit):
        self.engine, self.drain_s, self.exit = engine, drain_s, exit
        self.stopped = threading.Event()  # the engine has stopped: every job has its final event
        self._limit: float | None = None  # when the watchdog ends the process
        self._wake = threading.Event()

    def signal(self, sig: int) -> None:
        """A SIGTERM or SIGINT (the signal handlers call this): the first begins the drain, the next cuts it short."""
        name = signal.Signals(sig).name
        if self._limit is None:
            self.begin(name)
            return
        logging.getLogger("ponder.serve").warning("ponder: %s again: ending the requests still running now", name)
        self.engine.end_drain()
        self._limit = min(self._limit, time.monotonic() + self.HURRY_S)
        self._wake.set()

    def begin(self, reason: str) -> None:
        """Starts the drain (once)."""
        if self._limit is not None:
            return
        logging.getLogger("ponder.serve").info("ponder: %s: draining for up to %.1f s", reason, self.drain_s)
        self.engine.draining = True
        self._limit = time.monotonic() + self.drain_s + self.GRACE_S
        threading.Thread(target=self._stop, name="ponder-drain", daemon=True).start()
        threading.Thread(target=self._watch, name="ponder-watchdog", daemon=True).start()

    def _stop(self) -> None:
        self.engine.stop(drain_s=self.drain_s)
        self.stopped.set()

    def _watch(self) -> None:
        while True:
            self._wake.clear()
            if not self._wake.wait(max(0.0, self._limit - time.monotonic())) and time.monotonic() >= self._limit:
                break
        held = ", ".join(sorted(t.name for t in threading.enumerate() if t is not threading.current_thread()))
        logging.getLogger("ponder.serve").error("ponder: not stopped by the end of the drain; exiting (threads: %s)", held)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self.exit(1)
