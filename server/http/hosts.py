"""DNS rebinding: a server on a loopback address answers loopback ``Host`` names only.

A web page can point a name its author controls at 127.0.0.1 (DNS rebinding);
the user's browser then sends that page's requests to the local server and
lets the page read the answers, as if the server were the page's own site. A
local ponder has no API key by default, so a server listening on a loopback
address refuses every ``Host`` but ``localhost``, ``127.0.0.1`` and
``[::1]`` (with any port), as local development servers do. A server
listening on another address answers any name; a proxy in front of it
decides which reach it.

The check is Starlette's ``TrustedHostMiddleware``; only its refusal (a plain
400) is replaced, by a 403 in the API's error shape that says what to do.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ponder.server.http.errors import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_ADMITTED = "ponder.host_admitted"  # set in the scope of a request whose Host passed


def allowed_hosts(bind: str) -> tuple[str, ...]:
    """The ``Host`` names a server listening on address ``bind`` answers (empty: any)."""
    try:
        loopback = ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        loopback = bind.lower() == "localhost"
    return LOOPBACK_HOSTS if loopback else ()


class TrustedHosts:
    """ASGI middleware: ``app`` behind Starlette's host check for ``hosts``, refusing with a 403 that says why."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]):
        self.app, self.hosts = app, hosts
        self.check = TrustedHostMiddleware(self._admit, allowed_hosts=list(hosts), www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_refuse(message: Message) -> None:
            if scope.get(_ADMITTED):
                await send(message)
            elif message["type"] == "http.response.start":  # the check's own refusal: ours goes out instead
                await self._refusal(scope)(scope, receive, send)

        await self.check(scope, receive, send_or_refuse)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[_ADMITTED] = True
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope):
        host = Headers(scope=scope).get("host")
        names = ", ".join(self.hosts)
        message = (f"Host: {host!r} is not a name of this server: listening on a loopback address, it answers only "
                   f"Host {names} (any port), against DNS rebinding; to be reached under other names, listen on "
                   f"another address (ponder serve --host)")
        return ApiError(403, message, kind="permission_error").response()
