"""Bearer-key authentication, one check for both front ends (HTTP and gRPC).

A server started with API keys serves a request whose ``Authorization``
header (gRPC: ``authorization`` metadata) reads ``Bearer KEY`` for one of
them; the matched key then scopes the caller's sessions. A server without
keys serves everyone, under the key "". Every key is compared, in constant
time, so the time a check takes says nothing about which key matched or how
much of a wrong one was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class Unauthenticated(Exception):
    """The request's bearer key is missing or is none of the server's. Each front end words the answer."""


def parse_api_keys(flags: Sequence[str] | None, env: str = "") -> tuple[str, ...]:
    """The server's keys. A flag and the variable read the same way: keys separated by commas.

    Args:
      flags: the ``--api-key`` values (the flag may be repeated); if there are any, ``env`` is not read.
      env: ``$PONDER_API_KEY``.

    Returns:
      The keys, stripped, blanks and repeats dropped; empty means no authentication.
    """
    keys = (key.strip() for value in (flags if flags else [env]) for key in value.split(","))
    return tuple(dict.fromkeys(key for key in keys if key))


def authenticate(authorization: str, api_keys: Sequence[str]) -> str:
    """The server's key that the caller sent.

    Args:
      authorization: the ``Authorization`` header's value ("" if absent).
      api_keys: the server's keys (``parse_api_keys``); empty means no authentication.

    Returns:
      The matched key, or "" when the server has no keys.

    Raises:
      Unauthenticated: the header is absent, not ``Bearer``, or names none of ``api_keys``.
    """
    if not api_keys:
        return ""
    scheme, _, token = authorization.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    matched = ""
    for key in api_keys:  # every key is compared: the time taken says nothing about which matched
        if hmac.compare_digest(token.encode(), key.encode()):
            matched = key
    if not matched:
        raise Unauthenticated("missing or wrong API key")
    return matched
