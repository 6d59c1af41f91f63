"""Line completion on held-out files: given a file up to a line, write the next line.

For each target line the model reads the file the way the server does and
greedily generates until a newline (or ``max_new_tokens``); the first
generated line is compared with the real one (both stripped): exact match and
edit similarity (``difflib`` ratio, 1 = identical).

Attention sees a window that ends at the line and leaves ``max_new_tokens``
positions free (``attention_start``: a chunk boundary at most ``window -
max_new_tokens`` tokens back). The two variants see exactly that same
context; they differ only in the fast weights:

* ``persistent``: the fast weights have read the whole file before the
  window (a session that holds the document), window by window from the
  file's start as ``ponder eval`` reads it, then the window itself;
* ``fresh``: the fast weights start from their trained initial state at the
  window's start, and read only the window.

So the difference between them is what a session's memory buys. A line whose
window starts at the file's start is the same computation both ways, so
``target_lines`` takes lines from ``start`` on (``ponder eval`` passes the
window size). ``compare`` gives the paired difference with a bootstrap
confidence interval: the lines are few and each is a coin flip, so a
difference smaller than its interval says nothing.
"""

from __future__ import annotations

import dataclasses
import difflib

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import nnx

from ponder.model.document import window_forward
from ponder.model.gating import Schedule
from ponder.model.generate import SamplingParams, stream_ttt_tokens
from ponder.model.tokenizer import Tokenizer
from ponder.model.ttt_lm import TTTTransformerLM


@dataclasses.dataclass
class LineResult:
    """One target line: the real one, the generated one, and the real line's mean loss (nats per token,
    its newline included) given the same context: a measure with far less noise than an exact match."""

    expected: str
    generated: str
    nll: float = float("nan")

    @property
    def exact(self) -> bool:
        return self.generated.strip() == self.expected.strip()

    @property
    def similarity(self) -> float:
        return difflib.SequenceMatcher(None, self.generated.strip(), self.expected.strip()).ratio()


def target_lines(tokenizer: Tokenizer, tokens: np.ndarray, every: int, start: int) -> list[int]:
    """Token offsets where the text of a non-blank line starts, after its indentation: one every
    ``every`` tokens from ``start`` on.

    BPE merges a newline with the indentation after it (one token ``"\\n    "``), so
    the indentation is part of the prompt and the target is the rest of the line;
    counting only tokens that end exactly in a newline would keep just the
    unindented lines (imports, ``def`` and ``class`` headers), the least
    predictable ones and a small minority of a typical file.
    """
    offsets, next_at = [], start
    pieces = [tokenizer.decode_bytes([int(t)]) for t in tokens]
    blank_so_far, blank = [], True  # after token i: the line so far is blank (indentation at most)
    for piece in pieces:
        if b"\n" in piece:
            blank = not piece[piece.rindex(b"\n") + 1 :].strip()
        elif piece.strip():
            blank = False
        blank_so_far.append(blank)
    for i in range(1, len(tokens) - 1):
        if i >= next_at and blank_so_far[i - 1] and pieces[i].strip() and not pieces[i].startswith(b"\n"):
            offsets.append(i)
            next_at = i + every
    return offsets


def attention_start(offset: int, window: int, max_new_tokens: int, chunk: int) -> int:
    """The first token attention sees for a line at ``offset``: a chunk boundary such that the
    context and ``max_new_tokens`` generated tokens fit in ``window`` positions."""
    return max(0, -(-(offset + max_new_tokens - window) // chunk) * chunk)


def complete_lines(model: TTTTransformerLM, tokenizer: Tokenizer, tokens: np.ndarray, targets: list[int],
                   window: int, persistent: bool, schedule: Schedule = Schedule(), max_new_tokens: int = 48):
    """``LineResult`` per target offset (ascending), reading the file as described in the module docstring."""
    C = model.config.gate.chunk
    if max_new_tokens > window - C:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves less than a chunk ({C}) of a {window}-token window "
                         "for the context")
    graphdef, params = nnx.split(model)
    window_states = {0: model.init_state(1, schedule)}  # the persistent state at each multiple of ``window``

    def read_until(end: int):
        """The state after ``tokens[:end]`` read window by window from the file's start (``end`` on a chunk)."""
        w = end // window * window
        for begin in range(max(window_states), w, window):
            piece = jnp.asarray(tokens[None, begin : begin + window], jnp.int32)
            *_, window_states[begin + window] = window_forward(graphdef, params, piece, schedule,
                                                               window_states[begin], None)
        state = window_states[w]
        if end > w:
            *_, state = window_forward(graphdef, params, jnp.asarray(tokens[None, w:end], jnp.int32), schedule,
                                       state, None)
        return state

    greedy = SamplingParams(max_new_tokens=max_new_tokens)
    results = []
    for offset in targets:
        start = attention_start(offset, window, max_new_tokens, C)
        doc = read_until(start) if persistent else model.init_state(1, schedule)
        line_end = offset
        while line_end < len(tokens) and b"\n" not in tokenizer.decode_bytes([int(tokens[line_end])]):
            line_end += 1
        # The real line given the same context, teacher-forced: one window-long forward (padding after the
        # line changes nothing before it), so every line shares one compiled shape.
        piece = np.full(window, tokenizer.eot_id, np.int32)  # [window]
        n = min(window, len(tokens) - start)
        piece[:n] = tokens[start : start + n]
        logp, *_ = window_forward(graphdef, params, jnp.asarray(piece[None]), schedule, doc, None)  # [window, V]
        scored = np.arange(offset, min(line_end + 1, start + n))  # the line's tokens (the file may end inside it)
        nll = float(-np.asarray(logp)[scored - start - 1, tokens[scored]].mean())
        # A copy: generation donates its state's buffers, and the window states are kept for later lines.
        doc = jax.tree.map(jnp.copy, doc)
        generated = []
        prompt = [int(t) for t in tokens[start:offset]]
        for piece in stream_ttt_tokens(model, prompt, greedy, tokenizer.eot_id, schedule, doc=doc):
            if piece[-1] == tokenizer.eot_id:
                break
            generated += piece
            if b"\n" in tokenizer.decode_bytes(piece):
                break
        text = tokenizer.decode(generated).split("\n")[0]
        expected = tokenizer.decode(tokens[offset : line_end + 1]).split("\n")[0]
        results.append(LineResult(expected, text, nll))
    return results


def compare_variants(model: TTTTransformerLM, tokenizer: Tokenizer, docs: list[np.ndarray], window: int,
                     every: int, per_file: int, variants: dict[str, tuple[bool, Schedule]],
                     max_new_tokens: int = 48) -> dict:
    """Two ways of reading the same lines, side by side (``ponder eval`` and ``bench/line_memory.py``).

    Args:
      docs: held-out documents; each gives up to ``per_file`` lines past its first window, ``every`` tokens apart.
      variants: two entries, name -> (persistent, schedule), e.g. persistent vs fresh fast weights.
      max_new_tokens: most tokens generated per line (the window keeps room for them).

    Returns:
      ``summarize`` of each variant, and ``compare`` of the first against the second under
      ``"{first}_minus_{second}"``.
    """
    lines = {name: [] for name in variants}
    for doc in docs:  # past the first window: before it, persistent and fresh are one computation
        targets = target_lines(tokenizer, doc, every, window)[:per_file]
        for name, (persistent, schedule) in variants.items():
            lines[name] += complete_lines(model, tokenizer, doc, targets, window, persistent, schedule, max_new_tokens)
    first, second = variants
    return {**{name: summarize(results) for name, results in lines.items()},
            f"{first}_minus_{second}": compare(lines[first], lines[second])}


def summarize(results: list[LineResult]) -> dict:
    return {
        "lines": len(results),
        "exact_match": float(np.mean([r.exact for r in results])) if results else float("nan"),
        "edit_similarity": float(np.mean([r.similarity for r in results])) if results else float("nan"),
        "line_ce": float(np.mean([r.nll for r in results])) if results else float("nan"),
    }


def compare(persistent: list[LineResult], fresh: list[LineResult], resamples: int = 10_000, seed: int = 0) -> dict:
    """Persistent minus fresh on the same lines: the mean difference of exact match, of edit
    similarity and of the line's loss (negative: memory helps), each with a 95% paired-bootstrap
    interval (``scipy.stats.bootstrap``, BCa)."""
    if len(persistent) != len(fresh) or len(persistent) < 2:
        raise ValueError(f"compare needs the same lines both ways, at least 2 ({len(persistent)} and {len(fresh)})")
    out = {"lines": len(persistent)}
    scores = (("exact_match", lambda r: float(r.exact)), ("edit_similarity", lambda r: r.similarity),
              ("line_ce", lambda r: r.nll))
    for name, score in scores:
        diff = np.asarray([score(a) - score(b) for a, b in zip(persistent, fresh)])
        if np.all(diff == diff[0]):  # no spread to resample (e.g. every line the same both ways)
            low = high = float(diff[0])
        else:
            ci = scipy.stats.bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=0.95,
                                       method="BCa", rng=np.random.default_rng(seed)).confidence_interval
            low, high = float(ci.low), float(ci.high)
        out[name] = {"difference": float(diff.mean()), "ci95": [low, high]}
    return out
