"""``ponder serve``: one process, one engine, HTTP and gRPC in front of it.

The engine warms up in the background while both front ends already listen,
so ``/health`` answers 503 (and gRPC health NOT_SERVING) until every shape
is compiled. SIGTERM drains: new requests get 503 / UNAVAILABLE, running
ones finish (up to ``--drain-s``), then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.server.auth import parse_api_keys
from ponder.server.http.config import HttpConfig

if TYPE_CHECKING:
    from ponder.model.gating import Schedule


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags (``ponder serve`` adds the ``--schedule`` family beside them).

    Unset flags are the config dataclasses' defaults: ``EngineConfig`` (slots, queue,
    session memory, tokens per request), ``Limits`` (prompt length), ``HttpConfig`` (body size and time).
    """
    from ponder.server.engine import EngineConfig
    from ponder.server.service import Limits

    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint directory (default: the bundled one)")
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
    p.add_argument("--drain-s", type=float, default=30.0, help="how long SIGTERM waits for running requests")
    p.add_argument("--log-level", default="info")


def run(args, schedule: Schedule) -> None:
    """Loads the checkpoint, starts the engine, serves until SIGTERM / Ctrl-C.

    Args:
      args: the flags of ``add_arguments``.
      schedule: where λ comes from.
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ponder.serve")
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

    model, tokenizer = checkpoint.load(args.checkpoint)
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
    keys = parse_api_keys(args.api_key, os.environ.get("PONDER_API_KEY", ""))
    name = Path(args.checkpoint).name
    app = build_app(service, engine, metrics, api_keys=keys, max_body_bytes=args.max_body_bytes, model_name=name,
                    body_timeout_s=args.body_timeout_s, allowed_hosts=allowed_hosts(args.host))
    grpc_server = None
    if args.grpc_port:
        grpc_server = build_grpc_server(service, engine, metrics, keys, f"{args.host}:{args.grpc_port}")
        grpc_server.start()
    threading.Thread(target=engine.start, name="ponder-warmup", daemon=True).start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: refuse new work first
            engine.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signals it caught once serve() returns, which would kill the
            # process before the engine and gRPC have drained; this process exits by itself.
            self._captured_signals.clear()

    http = Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=int(args.drain_s))
    )
    log.info("ponder: HTTP on %s:%d, gRPC on %s, checkpoint %s, %d slots", args.host, args.port,
             args.grpc_port or "off", args.checkpoint, args.slots)

    def sigterm_outside_uvicorn(sig, frame):
        # uvicorn handles SIGTERM while it serves and puts this handler back when it stops: a
        # repeated SIGTERM (supervisors send more than one) must not kill the process while the
        # engine and gRPC still drain. Before serving, SIGTERM ends the process as usual.
        if not engine.draining:
            raise SystemExit(128 + sig)
        log.info("ponder: SIGTERM again; still draining")

    on_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    if on_main_thread:
        signal.signal(signal.SIGTERM, sigterm_outside_uvicorn)
    asyncio.run(http.serve())
    engine.stop(drain_s=args.drain_s)
    if grpc_server is not None:
        grpc_server.stop(grace=5).wait()
    log.info("ponder: stopped")
    if on_main_thread:
        # Nothing is left to drain. Python's shutdown puts SIGTERM's default action back while
        # XLA and gRPC tear down (a few hundred ms), which would turn a repeated SIGTERM into
        # exit -15; an ignored signal stays ignored.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
