"""``ponder complete / ingest / sessions reset / health``: the client library from a shell.

Each command is a few lines over ``Client``; what is worth testing on its
own (where ``FILE:LINE[:COL]`` puts the cursor) is a plain function here.
A file's session id and document id are its absolute path, so repeated
``ponder complete`` calls on one file reuse the server's state for it.
Failures print one line naming what is wrong and exit with status 2 (the
status argparse uses for bad arguments); ``health`` exits 1 while the server
is not ready.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ponder.client.client import DEFAULT_URL, Client
from ponder.client.results import Completion, PonderError


def parse_position(spec: str) -> tuple[Path, int, int | None]:
    """``FILE:LINE[:COL]`` as (file, line, column or None); lines and columns count from 1.

    Raises:
      ValueError: naming the part that is not a position.
    """
    head, _, last = spec.rpartition(":")
    if not head or not last.isdigit():
        raise ValueError(f"{spec!r} is not FILE:LINE[:COL] (e.g. src/app.py:12 or src/app.py:12:5)")
    file, _, middle = head.rpartition(":")
    if file and middle.isdigit():
        line, column = int(middle), int(last)
    else:
        file, line, column = head, int(last), None
    if line < 1 or column is not None and column < 1:
        raise ValueError(f"{spec!r}: lines and columns count from 1")
    return Path(file), line, column


def split_at(text: str, line: int, column: int | None, name: str = "the file") -> tuple[str, str]:
    """``text`` cut at ``line`` (1-based) and ``column`` (1-based: 1 is before the line's first character;
    None: the end of the line) into (prefix, suffix).

    A file that ends with a newline has an empty last line after it, where a new line can be completed.

    Raises:
      ValueError: the line or column is past the end, saying where the end is.
    """
    lines = text.split("\n")
    if line > len(lines):
        raise ValueError(f"line {line} is past the end of {name}, which has {len(lines)} lines")
    start = sum(len(s) + 1 for s in lines[: line - 1])
    content = lines[line - 1].removesuffix("\r")
    if column is None:
        column = len(content) + 1
    elif column > len(content) + 1:
        raise ValueError(
            f"column {column} is past the end of line {line} of {name} ({len(content)} characters: columns 1 to {len(content) + 1})"
        )
    cut = start + column - 1
    return text[:cut], text[cut:]


def _read(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": the document exactly as the editor has it
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None


def _client(args: argparse.Namespace) -> Client:
    if args.grpc:
        return Client(grpc=args.grpc, api_key=args.api_key, retries=args.retries)
    return Client(args.url, api_key=args.api_key, retries=args.retries)


def _complete(args: argparse.Namespace) -> None:
    path, line, column = parse_position(args.position)
    prefix, suffix = split_at(_read(path), line, column, str(path))
    session = str(path.resolve())
    options = dict(session=session, document=session, max_tokens=args.max_tokens, temperature=args.temperature,
                   stop=tuple(args.stop), update_rate=args.update_rate, timeout=args.timeout)
    with _client(args) as ponder:
        if args.stream:
            for item in ponder.stream(prefix, suffix or None, **options):
                if not isinstance(item, Completion):
                    print(item.text, end="", flush=True)
            done = item
        else:
            done = ponder.complete(prefix, suffix or None, **options)
            print(done.text, end="", flush=True)
    u = done.usage
    print(f"\n[{u.generated_tokens} tokens, finish_reason={done.finish_reason}, {u.cached_tokens} of {u.prompt_tokens} "
          f"prompt tokens cached, chunks {done.chunks_updated} updated / {done.chunks_skipped} skipped]", file=sys.stderr)


def _ingest(args: argparse.Namespace) -> None:
    session = str(args.file.resolve())
    with _client(args) as ponder:
        done = ponder.ingest(_read(args.file), session=session, document=session, update_rate=args.update_rate,
                             timeout=args.timeout)
    u = done.usage
    print(f"ingested {args.file} into session {done.session_id}: {u.prompt_tokens} tokens, {u.cached_tokens} already "
          f"cached; chunks {done.chunks_updated} updated / {done.chunks_skipped} skipped")


def _reset(args: argparse.Namespace) -> None:
    with _client(args) as ponder:
        existed = ponder.reset(args.session_id, timeout=args.timeout)
    print(f"reset session {args.session_id}" if existed else f"session {args.session_id} did not exist: nothing to reset")


def _health(args: argparse.Namespace) -> None:
    with _client(args) as ponder:
        health = ponder.health(timeout=args.timeout)
    print(f"{health.status} ({ponder.address})")
    if not health.ready:
        raise SystemExit(1)


def _one_line_errors(name: str, run):
    """``run``, with ponder's and the arguments' errors as one line on stderr and exit status 2."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> None:
        try:
            run(args)
        except (PonderError, ValueError) as err:
            print(f"ponder {name}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            raise SystemExit(130) from None

    return wrapped


def _update_rate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--update-rate", type=float, metavar="RATE",
                   help="the file's session's target update rate from now on, in [0, 1] (the share of chunks whose fast "
                   "weights update), for a server with a budgeted --schedule; default: the session's last one")


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server's HTTP address (default {DEFAULT_URL})")
    p.add_argument("--grpc", metavar="TARGET", help="use gRPC at TARGET (host:port) instead of HTTP")
    p.add_argument("--api-key", help="bearer token (default: $PONDER_API_KEY, its first key if comma-separated)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole call, retries included")
    p.add_argument("--retries", type=int, default=2, help="further attempts while the server is busy or unavailable")


COMMANDS = ("complete", "ingest", "sessions", "health")  # what ``add_commands`` adds


def add_commands(commands) -> None:
    """Adds ``complete``, ``ingest``, ``sessions`` and ``health`` to the ``ponder`` command's subparsers."""
    complete = commands.add_parser("complete", help="complete a file at FILE:LINE[:COL] with a running server")
    complete.add_argument("position", metavar="FILE:LINE[:COL]",
                          help="the cursor: LINE and COL count from 1; no COL means the end of the line")
    complete.add_argument("--stream", action="store_true", help="print the completion as it arrives")
    complete.add_argument("--max-tokens", type=int, default=64)
    complete.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    complete.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    _update_rate(complete)
    _connection(complete)
    complete.set_defaults(run=_one_line_errors("complete", _complete))

    ingest = commands.add_parser("ingest", help="send a file to its session without generating")
    ingest.add_argument("file", type=Path)
    _update_rate(ingest)
    _connection(ingest)
    ingest.set_defaults(run=_one_line_errors("ingest", _ingest))

    sessions = commands.add_parser("sessions", help="manage the server's sessions")
    actions = sessions.add_subparsers(dest="action", required=True)
    reset = actions.add_parser("reset", help="forget a session (a file's session id is its absolute path)")
    reset.add_argument("session_id")
    _connection(reset)
    reset.set_defaults(run=_one_line_errors("sessions reset", _reset))

    health = commands.add_parser("health", help="say whether the server is ready (exit status 1 while it is not)")
    _connection(health)
    health.set_defaults(run=_one_line_errors("health", _health))


def main(argv: list[str] | None = None) -> int:
    """The ``ponder`` command of the client-only install (``ponder-client``): the four commands above."""
    parser = argparse.ArgumentParser(prog="ponder", description="Talk to a running ponder server.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)
    return 0
