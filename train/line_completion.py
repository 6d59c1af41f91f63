"""Line completion on held-out files: given a file up to a line, write the next line.

For each target line the model reads the file up to the line's start and
greedily generates until a newline (or ``max_new_tokens``); the first
generated line is compared with the real one (both stripped): exact match
and edit similarity (``difflib`` ratio, 1 = identical).

Files longer than the window run as the server runs them: attention sees the
current window (windows of ``window`` tokens from the start of the file), and
the fast weights either carry across windows (``persistent``: they have read
the whole file) or start fresh at the current window (``fresh``). The
difference between the two is what a session's fast weights buy.
"""

from __future__ import annotations

import dataclasses
import difflib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponder.model.gating import Schedule
from ponder.model.gpt2 import KVCache
from ponder.model.tokenizer import Tokenizer
from ponder.model.ttt_lm import TTTTransformerLM
from ponder.model.document import window_forward


@dataclasses.dataclass
class LineResult:
    expected: str
    generated: str

    @property
    def exact(self) -> bool:
        return self.generated.strip() == self.expected.strip()

    @property
    def similarity(self) -> float:
        return difflib.SequenceMatcher(None, self.generated.strip(), self.expected.strip()).ratio()


def target_lines(tokenizer: Tokenizer, tokens: np.ndarray, every: int, start: int) -> list[int]:
    """Token offsets where a non-blank line starts: one every ``every`` tokens after ``start``."""
    offsets, next_at = [], start
    pieces = [tokenizer.decode_bytes([int(t)]) for t in tokens]
    ends_line = [p.endswith(b"\n") for p in pieces]
    for i in range(1, len(tokens) - 1):
        if i >= next_at and ends_line[i - 1] and pieces[i].strip():
            offsets.append(i)
            next_at = i + every
    return offsets


def complete_lines(model: TTTTransformerLM, tokenizer: Tokenizer, tokens: np.ndarray, targets: list[int],
                   window: int, persistent: bool, schedule: Schedule = Schedule(), max_new_tokens: int = 48):
    """``LineResult`` per target offset (ascending), reading the file as described in the module docstring."""
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda params, *a: nnx.merge(graphdef, params).step(*a, schedule))
    base = model.config.base
    window_states = {0: model.init_state(1, schedule)}  # persistent state at each window start

    def state_at(w: int):
        if not persistent:
            return model.init_state(1, schedule)
        done = max(k for k in window_states if k <= w)
        state = window_states[done]
        for start in range(done, w, window):
            piece = jnp.asarray(tokens[None, start : start + window], jnp.int32)
            *_, state = window_forward(graphdef, params, piece, schedule, state, None)
            window_states[start + window] = state
        return state

    results = []
    for offset in targets:
        w0 = offset // window * window
        state, cache = state_at(w0), KVCache.init(base, 1)
        room = window - (offset - w0)
        logits = None
        for position, token in enumerate(tokens[w0:offset]):
            logits, cache, state = step(params, jnp.asarray([int(token)]), jnp.asarray([position]), cache, state)
        generated = []
        for position in range(offset - w0, offset - w0 + min(max_new_tokens, room)):
            token = int(jnp.argmax(logits[0]))
            if token == tokenizer.eot_id:
                break
            generated.append(token)
            if b"\n" in tokenizer.decode_bytes([token]):
                break
            logits, cache, state = step(params, jnp.asarray([token]), jnp.asarray([position]), cache, state)
        text = tokenizer.decode(generated).split("\n")[0]
        line_end = offset
        while line_end < len(tokens) and b"\n" not in tokenizer.decode_bytes([int(tokens[line_end])]):
            line_end += 1
        expected = tokenizer.decode(tokens[offset : line_end + 1]).split("\n")[0]
        results.append(LineResult(expected, text))
    return results


def summarize(results: list[LineResult]) -> dict:
    return {
        "lines": len(results),
        "exact_match": float(np.mean([r.exact for r in results])) if results else float("nan"),
        "edit_similarity": float(np.mean([r.similarity for r in results])) if results else float("nan"),
    }
