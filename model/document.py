"""A fast-weight model over a whole document, window by window: per-token losses, λ and FLOPs.

Evaluation (``ponder eval``), line completion and the λ viewer all need the
same thing: a document longer than the context run so that attention sees
one window at a time while the fast-weight state (a TTT layer's fast weights
and gate history, In-Place TTT's or LoRA's) carries across windows, so the
fast weights see the whole document. This module is that one loop;
``window_forward`` is its compiled step. ``chunk_size``, ``initial_state``
and ``chunk_work`` hide what differs between the three kinds (the server's
runner uses them too).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponder.model.gating import Schedule
from ponder.model.inplace import InPlaceLM
from ponder.model.lora import LoRALM
from ponder.model.ttt_lm import TTTTransformerLM

FastWeightLM = TTTTransformerLM | InPlaceLM | LoRALM


@dataclasses.dataclass
class DocumentRun:
    nll: np.ndarray  # [T - 1] loss of tokens 1..T-1
    chunk_lambda: np.ndarray  # [n_chunks]
    chunk_updated: np.ndarray  # [n_chunks] bool
    ttt_flops: float
    clipped: int = 0  # updates capped to the norm limit (In-Place, LoRA)


def chunk_size(model: FastWeightLM) -> int:
    """Tokens per chunk: the unit λ is chosen for and the fast weights update on."""
    return model.config.gate.chunk if isinstance(model, TTTTransformerLM) else model.config.settings.chunk


def initial_state(model: FastWeightLM, rows: int, schedule: Schedule):
    """The state of ``rows`` empty documents (a gate's history starts at the schedule's budget)."""
    return model.init_state(rows) if isinstance(model, InPlaceLM) else model.init_state(rows, schedule)


def clipped(state) -> jax.Array:
    """[B] capped fast-weight updates a state has counted (In-Place and LoRA; 0 for the TTT layer)."""
    return getattr(state, "clipped", jnp.zeros((), jnp.int32))


def chunk_work(model: FastWeightLM, out, schedule: Schedule):
    """``(updated [B, n] bool, update FLOPs [B])`` of a forward's output ``out``.

    The TTT layer reports its own; In-Place and LoRA update a chunk where its λ
    is above zero, each at ``update_flops`` (LoRA's per optimizer step).
    """
    if isinstance(model, TTTTransformerLM):
        return out.chunk_updated, out.ttt_flops
    updated = out.chunk_lambda > 0
    return updated, updated.sum(-1) * model.update_flops(schedule.steps)


@functools.partial(jax.jit, static_argnums=(0, 3))
def window_forward(graphdef, params, tokens, schedule, state, chunk_lambda):
    """One window [1, T] from ``state``: log-probabilities [T, V], lam, updated, FLOPs, the state after."""
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(tokens.shape[1])[None]
    out = model(tokens, positions, schedule, state=state, chunk_lambda=chunk_lambda)
    logp = jax.nn.log_softmax(out.logits[0], axis=-1)  # [T, V]
    updated, flops = chunk_work(model, out, schedule)
    return logp, out.chunk_lambda[0], updated[0], flops[0], out.state


def run_document(model: FastWeightLM, tokens: np.ndarray, schedule: Schedule, window: int, chunk_lambda=None):
    """Runs one document (its length a multiple of the chunk size) window by window.

    Args:
      tokens: [T] the document; window: tokens per window (a multiple of the chunk size).
      chunk_lambda: [T / C] lam per chunk overriding the schedule (ORACLE), or None.
    """
    C = chunk_size(model)
    graphdef, params = nnx.split(model)
    state, nll, lams, updated, flops = initial_state(model, 1, schedule), [], [], [], 0.0
    previous = None  # log-probabilities at the last position of the previous window
    for start in range(0, len(tokens), window):
        piece = jnp.asarray(tokens[None, start : start + window], jnp.int32)
        given = None if chunk_lambda is None else jnp.asarray(chunk_lambda[None, start // C : (start + piece.shape[1]) // C])
        logp, lam, upd, fl, state = window_forward(graphdef, params, piece, schedule, state, given)
        logp = np.asarray(logp)
        if previous is not None:
            nll.append(-previous[tokens[start]][None])
        nll.append(-logp[np.arange(piece.shape[1] - 1), tokens[start + 1 : start + piece.shape[1]]])
        previous = logp[-1]
        lams.append(np.asarray(lam))
        updated.append(np.asarray(upd))
        flops += float(fl)
    return DocumentRun(np.concatenate(nll), np.concatenate(lams), np.concatenate(updated), flops, int(clipped(state).sum()))
