"""What the HTTP front end is told at start-up.

Kept apart from the app, and light to import: ``ponder serve``'s argument
parser reads its defaults from here without loading the server (and JAX).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """The front end's settings (``ponder serve``'s ``--api-key``, ``--max-body-bytes``, ``--ui``, ``--body-timeout-s``,
    ``--host`` and checkpoint name).

    Attributes:
      api_keys: bearer tokens, any of which authenticates (empty: no auth).
      max_body_bytes: larger request bodies are refused with 413. 4 MiB holds a long
        file plus its ``input_extra`` snippets with room to spare.
      model_name: the name ``/v1/models`` and the answers report.
      ui: serve ``/ui`` without API keys (``--ui``): every local client may then read every session's
        text. With keys it is always on, each key seeing its own sessions.
      ui_max_tokens: most tokens of a session one ``/ui`` page shows (its cost grows with them).
      body_timeout_s: a request body not whole after this long is refused with 408 (a client that
        sends part of one would hold its connection open).
      allowed_hosts: the ``Host`` names answered (empty: any); ``ponder serve`` on a loopback
        address answers only loopback names (``server/http/hosts.py``).
    """

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    model_name: str = "ponder"
    ui: bool = False
    ui_max_tokens: int = 2048
    body_timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ()
