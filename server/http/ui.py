"""``GET /ui``: a session's λ viewer page, at a bounded cost and only to the key that made the session.

A page is a fresh run of the model over the session's committed tokens,
twice (under the session's schedule and under SKIP; ``ponder.server.viewer``),
on a worker thread beside the engine, with which it shares the processor: on
a 12k-token session three pages at once took ~49 s each and made 16-token
completions 30 times slower. So its cost is bounded:

* one page at a time per process: a request while one is rendered is a 429
  (``QueueFull``) that says to retry;
* at most ``max_tokens`` tokens, the document's first (the TTT state is
  carried from the start, so the first ones are the ones a bounded run can
  show exactly); the page says how many it shows.

A session's text is its owner's: the page is looked up under the caller's
key, as every session is. A server without keys cannot tell its clients
apart, so there ``/ui`` is off (403) unless ``ponder serve --ui`` turns it on.
"""

from __future__ import annotations

import threading

import anyio

from ponder.server.http.errors import ApiError
from ponder.server.sessions import check_id
from ponder.server.types import QueueFull


class SessionPages:
    """Renders ``/ui`` pages (see the module docstring).

    Args:
      engine: the serving engine: its sessions' committed tokens and schedules, and its model.
      tokenizer: the model's tokenizer (chunks back to text).
      enabled: whether ``/ui`` answers at all (a server with API keys, or ``--ui``).
      max_tokens: most tokens of a session a page shows.
    """

    def __init__(self, engine, tokenizer, enabled: bool, max_tokens: int):
        self.engine, self.tokenizer, self.enabled, self.max_tokens = engine, tokenizer, enabled, max_tokens
        self._rendering = threading.Lock()  # held while a page is computed

    async def page(self, api_key: str, session_id: str) -> str:
        """The HTML page of the caller's session ``session_id``.

        Raises:
          ApiError: 403 when ``/ui`` is off, 400 without a usable ``session_id``, 404 for no such session of this key.
          QueueFull: another page is being rendered.
        """
        if not self.enabled:
            raise ApiError(403, "the λ viewer is off: a server without API keys cannot tell whose session is whose; "
                           "start it with --api-key, or with --ui where every local user may read every session",
                           kind="permission_error")
        if not session_id:
            raise ApiError(400, "session_id: required query parameter naming the session to show (GET /ui?session_id=ID)",
                           "session_id")
        check_id("session_id", session_id)
        tokens, schedule = self.engine.committed_tokens(api_key, session_id), self.engine.session_schedule(api_key, session_id)
        if tokens is None or schedule is None:
            raise ApiError(404, f"session_id: no session {session_id!r} for this API key (a completion with that "
                           "session_id creates it)", "session_id", kind="not_found_error")
        if not self._rendering.acquire(blocking=False):
            raise QueueFull("the λ viewer renders one page at a time and another is being rendered")
        try:  # the thread is waited for even if the client leaves, so the lock is held exactly while it runs
            return await anyio.to_thread.run_sync(self._render, tokens, schedule, session_id)
        finally:
            self._rendering.release()

    def _render(self, tokens: list[int], schedule, session_id: str) -> str:
        from ponder.server.viewer import data, page

        shown = tokens[: self.max_tokens]
        note = "Recomputed for this page from the session's committed tokens"
        if len(shown) < len(tokens):
            note += f": the first {len(shown)} of its {len(tokens)} (the server shows at most {self.max_tokens})"
        inspection = data.inspect_tokens(self.engine.model, self.tokenizer, shown, schedule, source=f"session {session_id}")
        return page.render_html(inspection, note=note + ".")

