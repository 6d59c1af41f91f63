"""Batches for training: packed rows with segment ids, fill-in-the-middle, resumable order.

A batch is ``tokens, positions, segment_ids, real`` ([B, T] each). Documents
are first cut into pieces of at most T tokens, and the pieces are shuffled
per epoch: one long file (a generated table, a big test module) would
otherwise fill hundreds of consecutive batches, and the model would drift
toward it. Rows are filled with pieces back to back; each piece gets its own
segment id and positions that restart at 0, so base attention and fast
weights never cross a boundary (docs/design.md, "Sessions").

* ``align=1`` (stage 1) packs pieces densely; a piece longer than the room
  left in a row continues in the next row (again as a new piece).
* ``align=C`` (stage 2) starts every piece on a chunk boundary: a piece is
  padded to a whole number of chunks with ``real = False`` tokens that come
  after it (they reach no real output) and are left out of the loss.

The order is a pure function of ``(seed, DataState)``, so a checkpoint that
stores the ``DataState`` resumes on exactly the next batch.

Fill-in-the-middle: with probability ``fim_rate`` a document
``<eot> body`` becomes ``<eot> <fim_prefix> A <fim_suffix> C <fim_middle> B``
for ``body = A B C`` cut at two random token positions, so the model learns
to write B from A and C (editors' infill requests). The layout is the
tokenizer's ``fim_prompt(A, C)`` followed by B, the same call the server
makes for an infill prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ponder.train.corpus import TokenFile


@dataclasses.dataclass(frozen=True)
class DataState:
    """Where the batch iterator stands: epoch, index into its piece order, tokens of that piece used."""

    epoch: int = 0
    piece: int = 0
    offset: int = 0


class Batch(NamedTuple):
    tokens: np.ndarray  # [B, T] int32
    positions: np.ndarray  # [B, T] int32, restart at 0 in every piece
    segment_ids: np.ndarray  # [B, T] int32, one id per piece within a row
    real: np.ndarray  # [B, T] bool, False on alignment padding


class Packer:
    """Deterministic packed batches from a ``TokenFile``."""

    def __init__(
        self,
        data: TokenFile,
        batch_size: int,
        seq_len: int,
        *,
        align: int = 1,
        seed: int = 0,
        fim_rate: float = 0.0,
        fim_prompt: Callable[[Sequence[int], Sequence[int]], list[int]] | None = None,
        pad_id: int = 0,
    ):
        if seq_len % align:
            raise ValueError(f"seq_len ({seq_len}) must be a multiple of align ({align})")
        if len(data) == 0:
            raise ValueError("the corpus split has no documents")
        if fim_rate and fim_prompt is None:
            raise ValueError("fim_rate > 0 needs the tokenizer's FIM layout (fim_prompt=tokenizer.fim_prompt)")
        self.data, self.batch_size, self.seq_len, self.align = data, batch_size, seq_len, align
        self.seed, self.fim_rate, self.fim_prompt, self.pad_id = seed, fim_rate, fim_prompt, pad_id
        # Pieces of at most seq_len tokens (FIM adds 3, so leave room for them): [n_pieces, 2] start, end.
        size = seq_len - 3 if fim_rate else seq_len
        starts, ends = data.offsets[:-1], data.offsets[1:]
        self.pieces = np.asarray([(a, min(a + size, b)) for s, b in zip(starts, ends) for a in range(s, b, size)])
        self.opens_document = np.isin(self.pieces[:, 0], starts)  # [n_pieces] the piece starts with <eot>

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))

    def _piece(self, epoch: int, piece: int) -> np.ndarray:
        start, end = self.pieces[int(piece)]
        tokens = np.asarray(self.data.tokens[start:end], np.int32)
        rng = np.random.default_rng([self.seed, epoch, int(piece), 1])
        if self._fim(rng, len(tokens)):
            lead = 1 if self.opens_document[int(piece)] else 0  # a document's <eot> stays in front
            head, body = tokens[:lead], tokens[lead:]
            i, j = sorted(rng.integers(0, len(body) + 1, size=2))
            tokens = np.concatenate([head, self.fim_prompt(body[:i].tolist(), body[j:].tolist()), body[i:j]])
        return tokens.astype(np.int32)

    def _fim(self, rng: np.random.Generator, n: int) -> bool:
        """Whether the piece of ``n`` tokens whose generator is ``rng`` becomes a FIM example (one draw)."""
        return bool(self.fim_rate) and rng.random() < self.fim_rate and n > 3

    def _length(self, epoch: int, piece: int) -> int:
        """``len(self._piece(epoch, piece))`` without reading its tokens (FIM adds the layout's special tokens)."""
        start, end = self.pieces[int(piece)]
        n = int(end - start)
        if self._fim(np.random.default_rng([self.seed, epoch, int(piece), 1]), n):
            n += len(self.fim_prompt([], []))
        return n

    def next(self, state: DataState, rows: range | None = None) -> tuple[Batch, DataState]:
        """The batch at ``state`` and the state after it.

        ``rows`` (a range of the batch's rows) builds only those rows, for the process that feeds them
        in multi-process training: the pieces of the other rows are measured but never read, so each
        process reads its share of the corpus and the returned state is the same in every process.
        """
        B, T, C = self.batch_size, self.seq_len, self.align
        rows = range(B) if rows is None else rows
        if rows.step != 1 or not 0 <= rows.start <= rows.stop <= B:
            raise ValueError(f"rows {rows} is not a contiguous range of the {B} rows of a batch")
        tokens = np.full((len(rows), T), self.pad_id, np.int32)
        positions = np.zeros((len(rows), T), np.int32)
        segments = np.zeros((len(rows), T), np.int32)
        real = np.zeros((len(rows), T), bool)
        epoch, index, offset = state.epoch, state.piece, state.offset
        order = self._order(epoch)
        piece, length = None, self._length(epoch, order[index])
        for row in range(B):
            start, segment, out = 0, 0, row - rows.start
            while start < T:
                n = min(length - offset, T - start)
                end = start + -(-n // C) * C  # padding to the next chunk boundary stays in this piece
                if row in rows:
                    if piece is None:
                        piece = self._piece(epoch, order[index])
                    tokens[out, start : start + n] = piece[offset : offset + n]
                    positions[out, start : start + n] = np.arange(n)
                    real[out, start : start + n] = True
                    positions[out, start + n : end] = np.arange(n, end - start)
                    segments[out, start:end] = segment
                start, segment, offset = end, segment + 1, offset + n
                if offset == length:  # next piece (and epoch)
                    index, offset = index + 1, 0
                    if index == len(order):
                        epoch, index = epoch + 1, 0
                        order = self._order(epoch)
                    piece, length = None, self._length(epoch, order[index])
        return Batch(tokens, positions, segments, real), DataState(epoch, index, offset)


def loss_mask(segment_ids, real):
    """[B, T-1]: position t's prediction of token t+1 counts when both are real and in the same piece."""
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & real[:, 1:]
