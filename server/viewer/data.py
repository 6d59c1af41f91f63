"""What the λ viewer shows: one document's chunks, their λ, and the loss with and without updates.

The numbers come from ``ponder.model.document.run_document``, the same window-by-window
forward ``ponder eval`` runs: once under the schedule being inspected (λ, updated
or skipped, loss per token) and once under SKIP (the TTT layer present, never
learning), so each chunk's cross-entropy can be compared with what it would be
had the fast weights never moved.

The forward runs whole chunks, so a document is padded at its end up to a
bucket of chunks (a power of two up to the context window, then whole windows:
few shapes, few compilations). The model is causal and λ_c reads only chunks
before c, so the padding changes nothing the page shows; padded tokens are
dropped, and a last partial chunk's FLOPs are counted as a whole chunk's, as
the forward computed them.

Chunks map back to the text through the bytes of their tokens: each chunk's
bytes are decoded in order by one incremental UTF-8 decoder, so a character
whose bytes straddle a chunk boundary belongs to the chunk that completes it,
and the chunks' texts concatenate to the document's text exactly. Special
tokens (the end-of-document token a document starts with) cover no text.
"""

from __future__ import annotations

import codecs
import dataclasses
from pathlib import Path

import numpy as np

from ponder.model.document import FastWeightLM, chunk_size, run_document
from ponder.model.gating import Schedule
from ponder.model.tokenizer import Tokenizer
from ponder.model.ttt_lm import TTTTransformerLM


@dataclasses.dataclass(frozen=True)
class ChunkView:
    """One chunk of C tokens (the last may be shorter).

    Attributes:
      index: the chunk's number in the document.
      token_start, token_end: its tokens, ``[token_start, token_end)``.
      char_start, char_end: its text, ``text[char_start:char_end]``.
      line: the 1-based line its text starts on.
      lam: λ the schedule gave it (0 when skipped).
      updated: whether the fast weights learned on it.
      ce: mean cross-entropy (nats) of its scored tokens under the schedule;
        None when it has none (a document's first token is not scored).
      ce_skip: the same under SKIP.
      scored: how many of its tokens are scored.
      flops: the TTT update FLOPs spent on it (0 when skipped).
    """

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    line: int
    lam: float
    updated: bool
    ce: float | None
    ce_skip: float | None
    scored: int
    flops: float


@dataclasses.dataclass(frozen=True)
class Inspection:
    """A document as the TTT layer saw it, chunk by chunk, with totals.

    Attributes:
      source: what the document is (a file path, a session).
      text: the document's text.
      schedule: the inspected schedule's kind (``model.gating.SCHEDULES``).
      chunk_size, lambda_max, threshold: the gate's settings (λ below the
        threshold skips a chunk).
      tokens: the document's tokens (its end-of-document start token included).
      scored_tokens: tokens with a loss (all but the first).
      chunks: one ``ChunkView`` per chunk, in order.
      ce, ce_skip: mean cross-entropy over the scored tokens, under the
        schedule and under SKIP (None without scored tokens).
      ttt_flops: update FLOPs of the updated chunks.
      update_1_flops: what updating every chunk once (UPDATE_1) would cost.
    """

    source: str
    text: str
    schedule: str
    chunk_size: int
    lambda_max: float
    threshold: float
    tokens: int
    scored_tokens: int
    chunks: tuple[ChunkView, ...]
    ce: float | None
    ce_skip: float | None
    ttt_flops: float
    update_1_flops: float

    @property
    def chunks_updated(self) -> int:
        return sum(c.updated for c in self.chunks)

    @property
    def chunks_skipped(self) -> int:
        return len(self.chunks) - self.chunks_updated

    @property
    def mean_lambda(self) -> float:
        return float(np.mean([c.lam for c in self.chunks])) if self.chunks else 0.0


def padded_length(n_tokens: int, chunk: int, window: int) -> int:
    """Tokens the forward runs for a document of ``n_tokens``: a power of two of chunks up to
    ``window`` (a multiple of ``chunk``), whole windows beyond."""
    n_chunks = -(-n_tokens // chunk)
    if n_chunks * chunk <= window:
        return min(1 << max(n_chunks - 1, 0).bit_length(), window // chunk) * chunk
    return -(-n_tokens // window) * window


def chunk_texts(tokenizer: Tokenizer, tokens: list[int], chunk: int) -> list[str]:
    """The text of each chunk of ``tokens``; joined, they are the document's text (see the module docstring)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for start in range(0, len(tokens), chunk):
        ids = [t for t in tokens[start : start + chunk] if t not in tokenizer.special_ids]
        last = start + chunk >= len(tokens)
        pieces.append(decoder.decode(tokenizer.decode_bytes(ids), final=last))
    return pieces


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def inspect_tokens(
    model: FastWeightLM, tokenizer: Tokenizer, tokens: list[int], schedule: Schedule = Schedule(), source: str = ""
) -> Inspection:
    """Runs a document under ``schedule`` and under SKIP and collects what the viewer shows.

    Args:
      model: a fast-weight model (``model.checkpoint.load`` of a stage-2 checkpoint: TTT layer, In-Place or LoRA).
      tokenizer: its tokenizer.
      tokens: the document from its start (``Tokenizer.encode_document``).
      schedule: where λ comes from.
      source: a name for the document, shown on the page.

    Returns:
      An ``Inspection``.
    """
    if not isinstance(model, FastWeightLM):
        raise ValueError("the λ viewer needs a fast-weight checkpoint (train one with `ponder train ttt`); this one is base-only")
    C = chunk_size(model)
    window = model.config.base.n_positions // C * C
    T = len(tokens)
    texts = chunk_texts(tokenizer, tokens, C)
    text = "".join(texts)
    if isinstance(model, TTTTransformerLM):
        lambda_max, threshold = model.config.gate.lambda_max, model.config.gate.threshold
        chunk_flops = float(sum(layer.update_flops(C, schedule.steps) for layer in model.ttt))
        update_1_flops = float(sum(layer.update_flops(C) for layer in model.ttt))
    else:  # In-Place and LoRA: λ from a fixed schedule (1 for UPDATE), no threshold
        lambda_max, threshold = max(1.0, schedule.value if schedule.kind == "fixed" else 1.0), 0.0
        chunk_flops, update_1_flops = model.update_flops(schedule.steps), model.update_flops()
    if T == 0:
        return Inspection(source, text, schedule.kind, C, lambda_max, threshold, 0, 0, (), None, None, 0.0, 0.0)
    pad = model.config.eot_id if model.config.eot_id is not None else 0
    padded = np.full(padded_length(T, C, window), pad, np.int32)  # [T_padded]
    padded[:T] = tokens
    run = run_document(model, padded, schedule, window)
    skip = run_document(model, padded, Schedule("skip"), window)
    # Token t's loss is nll[t - 1]; the document's first token has none.
    nll = run.nll[: T - 1]
    nll_skip = skip.nll[: T - 1]
    chunks, char = [], 0
    for index, piece in enumerate(texts):
        start, end = index * C, min((index + 1) * C, T)
        scored = slice(max(start, 1) - 1, end - 1)
        updated = bool(run.chunk_updated[index])
        chunks.append(ChunkView(
            index=index, token_start=start, token_end=end, char_start=char, char_end=char + len(piece),
            line=text.count("\n", 0, char) + 1, lam=float(run.chunk_lambda[index]), updated=updated,
            ce=_mean(nll[scored]), ce_skip=_mean(nll_skip[scored]), scored=len(nll[scored]),
            flops=chunk_flops if updated else 0.0,
        ))
        char += len(piece)
    return Inspection(
        source=source, text=text, schedule=schedule.kind, chunk_size=C, lambda_max=lambda_max,
        threshold=threshold, tokens=T, scored_tokens=len(nll), chunks=tuple(chunks),
        ce=_mean(nll), ce_skip=_mean(nll_skip), ttt_flops=sum(c.flops for c in chunks),
        update_1_flops=len(chunks) * update_1_flops,
    )


def read_text(path: str | Path) -> str:
    """A source file's text, exactly (line endings kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); the viewer shows text files only") from None

