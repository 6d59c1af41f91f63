"""How an editor's request becomes a prompt: what repeats between neighbouring requests comes first.

The base model has absolute positions, so a session can reuse only a common
token prefix of two prompts (docs/design.md, "Sessions"). An editor asks
again every time the cursor moves, with the text around the cursor: llama.vim
sends the 256 lines before the cursor line (``input_prefix``), the line up to
the cursor (``prompt``), the rest of the line and the 64 lines after it
(``input_suffix``), and snippets of other files it keeps in a ring
(``input_extra``). What stays equal when the cursor moves a few lines is the
ring, and the prefix from its first line to the old cursor; the suffix starts
elsewhere every time. So a fill-in-the-middle prompt is laid out

    <eot> <fim_prefix> snippets prefix <fim_suffix> suffix-head <fim_middle>

in the layout the model was trained on (``Tokenizer.fim_prompt``, the one
definition the training packer shares). The snippets and the prefix are the
session's document, committed in whole chunks; only the prefix's open chunk,
the suffix's head and the three markers are computed on a scratch copy, a
few hundred tokens whatever the file's size. The head is the suffix's first
``SUFFIX_LINES`` lines, whole (at most ``SUFFIX_TOKENS`` tokens), as llama.cpp
too reads only the start of a long suffix. Whole lines matter: on held-out
files the bundled model's next line was as good with 8, 16 or 32 whole lines
as with llama.vim's 64, and clearly worse with a suffix cut inside a line,
even one of 256 tokens (bench/README.md, ``infill_quality.py``).

Past ``n_prefix`` lines into a file, llama.vim's prefix starts one line
later for each line the cursor moves down, and a prompt whose first line
moved shares nothing with the last one. ``stable_prefix`` therefore starts
the prefix at its *anchor*: of its first ``ANCHOR_LINES`` lines, the one
whose text's hash (CRC-32, the same in every process) ends in the most zero
bits. While that line is in view and no stronger one comes into the first
``ANCHOR_LINES``, the prompt starts there: moving the cursor three lines
changes the start about one time in ten. The lines above the anchor (half
of ``ANCHOR_LINES`` on average, never one of the last ``KEEP_LINES`` before
the cursor, which the base's attention reads) are dropped; on held-out files
that cost nothing measurable (bench/README.md). A prefix that starts at the
top of its file keeps its start the same way, so the rule needs no knowledge
of where the window began; one growing to ``ANCHOR_LINES + KEEP_LINES``
lines may change its start meanwhile.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from ponder.model.tokenizer import Tokenizer

SUFFIX_LINES = 16  # lines of the suffix the model reads
SUFFIX_TOKENS = 256  # at most this many tokens of them
ANCHOR_LINES = 64  # the prefix may start at any of its first this many lines
KEEP_LINES = 96  # lines before the cursor's that are never dropped (~850 tokens: past the base's attention)


def anchor_strength(line: str) -> int:
    """How strongly a prefix prefers to start at ``line`` (its text without the line end): the trailing zero
    bits of its CRC-32; -1 for a blank line."""
    if not line.strip():
        return -1
    crc = zlib.crc32(line.encode("utf-8", "surrogatepass"))
    return (crc & -crc).bit_length() - 1 if crc else 32


def stable_prefix(prefix: str) -> str:
    """``prefix`` from its anchor: the strongest (the first of equals) of its first ``ANCHOR_LINES`` whole lines that
    are not among its last ``KEEP_LINES``; whole if there is none."""
    lines = prefix.split("\n")[:-1]  # whole lines; the last piece (the cursor's line) is never a candidate
    candidates = lines[: max(0, min(ANCHOR_LINES, len(lines) - KEEP_LINES))]
    if not candidates:
        return prefix
    anchor = max(range(len(candidates)), key=lambda i: (anchor_strength(candidates[i]), -i))
    return prefix[sum(len(line) + 1 for line in lines[:anchor]) :]


def suffix_head(tokenizer: Tokenizer, suffix: str) -> list[int]:
    """The tokens of the suffix's first ``SUFFIX_LINES`` lines, fewer if they are more than ``SUFFIX_TOKENS``
    tokens (a first line longer than that is cut)."""
    ends, at = [], 0
    while len(ends) < SUFFIX_LINES and (at := suffix.find("\n", at) + 1) > 0:
        ends.append(at)  # just after each of the first newlines
    if len(ends) < SUFFIX_LINES and len(suffix) > (ends[-1] if ends else -1):
        ends.append(len(suffix))  # the suffix ends within the head, not after a newline
    for end in reversed(ends):
        tokens = tokenizer.encode(suffix[:end])
        if len(tokens) <= SUFFIX_TOKENS:
            return tokens
    return tokenizer.encode(suffix[: ends[0]])[:SUFFIX_TOKENS]


def snippet_text(name: str, text: str) -> str:
    """A snippet of another file as it appears in the prompt: a comment naming it, its text, a blank line."""
    body = text.rstrip("\n") + "\n\n"
    return f"# {name}\n{body}" if name else body


def fim_tokens(tokenizer: Tokenizer, prefix: str, suffix: str, extra: Sequence[tuple[str, str]] = ()) -> tuple[list[int], int]:
    """The tokens of a fill-in-the-middle prompt (see the module docstring) and how many of them the session may keep.

    Args:
      prefix: the text before the cursor.
      suffix: the text after it (only its head is read: ``suffix_head``).
      extra: ``(name, text)`` snippets of other files.

    Returns:
      ``(tokens, commit_limit)``: the prompt, from its end-of-document token, and the length of its
      part before ``<fim_suffix>`` (the document the session commits).
    """
    document = [t for name, text in extra for t in tokenizer.encode(snippet_text(name, text))]
    document += tokenizer.encode(stable_prefix(prefix))
    tokens = [tokenizer.eot_id, *tokenizer.fim_prompt(document, suffix_head(tokenizer, suffix))]
    return tokens, len(document) + 2
