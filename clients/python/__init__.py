"""ponder's Python client: completions, sessions and health over HTTP or gRPC, sync or asyncio.

    from ponder.client import Client
    with Client("http://127.0.0.1:8080") as ponder:          # or Client(grpc="127.0.0.1:50051")
        print(ponder.complete("def read_lines(path):\n    ", session="a.py").text)

``Client`` / ``AsyncClient`` are in ``client.py``; the results and the
exceptions they raise in ``results.py``; the ``ponder complete / ingest /
sessions / health`` commands in ``cli.py``.
"""

from ponder.client.client import AsyncClient, Client
from ponder.client.results import (
    AuthenticationError,
    Completion,
    DeadlineExceeded,
    Delta,
    Health,
    Ingestion,
    InvalidRequest,
    PonderError,
    ServerBusy,
    ServerUnavailable,
    Usage,
)

__all__ = [
    "AsyncClient", "AuthenticationError", "Client", "Completion", "DeadlineExceeded", "Delta", "Health", "Ingestion",
    "InvalidRequest", "PonderError", "ServerBusy", "ServerUnavailable", "Usage",
]
