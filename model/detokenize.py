"""Generated tokens as text: what is final, and where a stop sequence ends it.

Offline generation (``generate.stream_text``) and the server's completion
service stream text the same way, through ``TextStream``: token bytes go
through an incremental UTF-8 decoder, which holds back a sequence that the
next token may complete, and a tail of the text that could still grow into
a stop sequence is not final until the next token decides. So a client sees
the same text however the tokens are batched into deltas.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from ponder.model.tokenizer import Tokenizer


def stop_cut(text: str, stops: Iterable[str]) -> tuple[int | None, int]:
    """Where the first complete stop sequence starts in ``text`` (None: none yet), and how much
    of ``text`` is safe to emit: all of it but a tail that is the start of a stop sequence."""
    stops = tuple(stops)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), min(hits)
    safe = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                safe = min(safe, len(text) - k)
                break
    return None, safe


class TextStream:
    """The text of a growing list of generated tokens.

    Attributes:
      text: the decoded text so far; an incomplete UTF-8 sequence at its end
        waits in the decoder, out of ``text``, until a token completes it or
        ``close`` turns it into U+FFFD.
      stops: the stop sequences.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Iterable[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add(self, ids: Iterable[int]) -> None:
        """Appends the text of ``ids`` (special tokens included as their text: drop them before)."""
        self.text += self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def close(self) -> None:
        """No token follows: a held-back incomplete UTF-8 sequence becomes U+FFFD."""
        self.text += self._utf8.decode(b"", final=True)

    def stop_cut(self) -> tuple[int | None, int]:
        """``stop_cut`` of the text so far: (start of the first stop sequence or None, length safe to emit)."""
        return stop_cut(self.text, self.stops)

    def stop_at(self, index: int) -> str:
        """The stop sequence that starts at ``index`` of the text (from ``stop_cut``)."""
        return next(s for s in self.stops if self.text.startswith(s, index))
