"""Sampling and the decode loop.

Generation has two compiled functions and a thin Python driver:

* ``prefill``: runs the prompt (right-padded to a length bucket, so a few
  shapes cover every prompt) through the model into the KV cache and samples
  the first new token.
* ``decode``: a ``lax.while_loop`` that feeds the last sampled token, samples
  the next and repeats, for up to ``n_steps`` tokens (at most ``DECODE_BLOCK``)
  or until every row has produced end-of-document. Many tokens run per call
  with no Python round trip; streaming simply asks for fewer steps per call.

The driver (``generate_text`` / ``stream_text``) turns token blocks into text
with ``detokenize.TextStream``, as the server does: it holds back an incomplete
UTF-8 sequence and any text that might be the start of a stop sequence, and it
cuts the output at the first stop sequence.
Sampling (``ponder.model.sampling``) reads traced controls, so changing them
never recompiles; each row carries a ring of its latest tokens for the
repetition penalties.

A TTT model (``stream_ttt_tokens``) prefills the prompt's whole chunks in one
dual-form forward and steps the rest, then decodes one token per compiled
call (its fast weights keep learning on the generated text); the server's
engine batches this path.
The token for position p of a row is drawn with ``fold_in(row_key, p)``, so a
seed gives the same text whatever the block size or batch composition.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponder.model.detokenize import TextStream
from ponder.model.doc_state import DocState
from ponder.model.document import FastWeightLM, chunk_size, initial_state
from ponder.model.gating import Schedule
from ponder.model.gpt2 import GPT, KVCache
from ponder.model.sampling import Sampling, accept, ring, sample
from ponder.model.tokenizer import Tokenizer

DECODE_BLOCK = 64  # most tokens one decode call produces
MIN_BUCKET = 16  # shortest prefill bucket
MIN_CACHE = 128  # shortest KV cache


@dataclasses.dataclass(frozen=True)
class SamplingParams(Sampling):
    """How to pick tokens (``Sampling``'s controls), how many, and where to stop.

    Attributes:
      max_new_tokens: most tokens to generate.
      stop: generation ends before the first occurrence of any of these strings.
    """

    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        self.check()
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop sequences must be non-empty strings, got {self.stop!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the decode loop carries between calls (one row per sequence)."""

    cache: KVCache
    token: jax.Array  # [B] last sampled token, not yet fed to the model
    position: jax.Array  # [B] position that ``token`` will take
    done: jax.Array  # [B] bool: row produced end-of-document
    key: jax.Array  # [B] sampling key of each row
    recent: jax.Array  # [B, W] ring of each row's tokens before ``token`` (``sampling.ring``)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("fresh",), donate_argnames=("cache",))
def prefill(graphdef, state, tokens, length, start, cache, keys, rows, recent, eot_id, fresh=False):
    """Feeds a right-padded prompt and samples the first new token.

    Args:
      tokens: [B, T] prompt ids, right-padded to the bucket length T.
      length: [B] true prompt length per row (>= 1).
      start: [B] position of ``tokens[:, 0]`` (tokens before it are in ``cache``).
      cache: KV cache for the rows.
      keys: [B] sampling key of each row.
      rows: the rows' sampling controls.
      recent: [B, W] ring of every token of the rows so far, the prompt's included (``sampling.ring``).
      fresh: every row starts its document (``start`` is 0 and ``cache``
        empty): attention skips the cache, with no runtime test for it.

    Returns:
      ``(DecodeState, first_token [B])``.
    """
    model: GPT = nnx.merge(graphdef, state)
    positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]  # [B, T]
    _, hidden, cache = model(tokens, positions, cache, compute_logits=False, attend_keys=0 if fresh else None)  # [B, T, D]
    last_hidden = jnp.take_along_axis(hidden, (length - 1)[:, None, None], axis=1)  # [B, 1, D]
    last = model.logits(last_hidden)[:, 0]  # [B, V]: the head runs on one position per row
    end = start + length
    token = sample(last, jax.vmap(jax.random.fold_in)(keys, end), rows, recent, end - 1)
    return DecodeState(cache, token, end, token == eot_id, keys, recent), token


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("decode_state",))
def decode(graphdef, state, decode_state: DecodeState, n_steps, rows, eot_id):
    """Generates up to ``n_steps`` (<= DECODE_BLOCK) more tokens per row in one call.

    Returns:
      ``(DecodeState, tokens [B, DECODE_BLOCK], n_done)``: the first ``n_done``
      columns are new tokens (``eot_id`` after a row finished).
    """
    model: GPT = nnx.merge(graphdef, state)
    B = decode_state.token.shape[0]
    # Keys for every step of the block at once (one vectorised threefry per call).
    offsets = decode_state.position[:, None] + 1 + jnp.arange(DECODE_BLOCK)[None, :]  # [B, DECODE_BLOCK]
    step_keys = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)))(decode_state.key, offsets)

    def keep_going(carry):
        i, ds, _ = carry
        return (i < n_steps) & ~jnp.all(ds.done)

    def step(carry):
        i, ds, out = carry
        logits, _, cache = model(ds.token[:, None], ds.position[:, None], ds.cache)  # [B, 1, V]
        recent = accept(ds.recent, ds.position, ds.token)
        token = sample(logits[:, 0], step_keys[:, i], rows, recent, ds.position)
        token = jnp.where(ds.done, eot_id, token)
        out = out.at[:, i].set(token)
        ds = DecodeState(cache, token, ds.position + 1, ds.done | (token == eot_id), ds.key, recent)
        return i + 1, ds, out

    out = jnp.full((B, DECODE_BLOCK), eot_id, jnp.int32)
    n_done, decode_state, out = jax.lax.while_loop(keep_going, step, (0, decode_state, out))
    return decode_state, out, n_done


def bucket_length(n: int, room: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET), capped at ``room``."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), room)


@dataclasses.dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (stop sequence or end of document) or "length"


def cache_length(config, prompt: list[int], params: SamplingParams) -> int:
    """Checks that a request fits the context; returns the KV cache length it needs.

    The cache holds only what the request can reach (a power of two, so few
    shapes are compiled): attention reads every slot on every step.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token (start documents with end-of-document)")
    if len(prompt) + params.max_new_tokens > config.n_positions:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
            f"the context window of {config.n_positions} tokens"
        )
    return min(max(MIN_CACHE, 1 << (len(prompt) + params.max_new_tokens - 1).bit_length()), config.n_positions)


def stream_tokens(
    model: GPT, prompt: list[int], params: SamplingParams, eot_id: int, block: int = DECODE_BLOCK
) -> Iterator[list[int]]:
    """Yields lists of new token ids (batch 1), ``block`` tokens per compiled call.

    The last token of the last list is ``eot_id`` if the model ended the document.
    """
    config = model.config
    S = cache_length(config, prompt, params)
    if params.max_new_tokens == 0:
        return
    graphdef, state = nnx.split(model)
    T = bucket_length(len(prompt), S)
    tokens = jnp.asarray([prompt + [eot_id] * (T - len(prompt))], jnp.int32)  # [1, T]
    rows = params.rows(config.n_positions, len(prompt))
    ds, first = prefill(
        graphdef, state, tokens, jnp.asarray([len(prompt)]), jnp.zeros((1,), jnp.int32), KVCache.init(config, 1, S),
        jax.random.key(params.seed)[None], rows, ring(prompt, config.n_positions), eot_id, fresh=True,
    )
    yield [int(first[0])]
    remaining = params.max_new_tokens - 1
    while remaining > 0 and not bool(ds.done[0]):
        n = min(block, remaining, DECODE_BLOCK)
        ds, out, n_done = decode(graphdef, state, ds, n, rows, eot_id)
        new = [int(t) for t in out[0, : int(n_done)]]
        if eot_id in new:
            new = new[: new.index(eot_id) + 1]
        remaining -= len(new)
        yield new


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnames=("doc", "cache"))
def ttt_prefill(graphdef, state, tokens, positions, doc, cache, schedule):
    """Whole chunks of a TTT model's prompt from ``doc`` into the KV cache: ``(doc, cache)``."""
    out = nnx.merge(graphdef, state)(tokens, positions, schedule, state=doc, cache=cache)
    return out.state, out.cache


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnames=("doc", "cache"))
def ttt_step(graphdef, state, tokens, positions, doc, cache, schedule):
    """One token per row of a TTT model: ``(logits [B, V], doc, cache)``."""
    logits, cache, doc = nnx.merge(graphdef, state).step(tokens, positions, cache, doc, schedule)
    return logits, doc, cache


def stream_ttt_tokens(
    model: FastWeightLM, prompt: list[int], params: SamplingParams, eot_id: int, schedule: Schedule = Schedule(),
    doc: DocState | None = None,
) -> Iterator[list[int]]:
    """``stream_tokens`` for a fast-weight model (TTT layer, In-Place, LoRA; batch 1, one token per yield).

    The prompt's whole chunks run in one parallel-form forward, the rest token
    by token; generation then steps one token per compiled call, so the fast
    weights keep learning (per ``schedule``) on the generated text too.

    ``doc``: the state to start from, one that has already read earlier
    text of the document (attention sees only ``prompt``; its buffers are
    donated, so pass a copy you want to keep). Default: a fresh document.
    """
    config = model.config.base
    S = cache_length(config, prompt, params)
    if params.max_new_tokens == 0:
        return
    graphdef, state = nnx.split(model)
    cache = KVCache.init(config, 1, S)
    doc = initial_state(model, 1, schedule) if doc is None else doc
    whole = (len(prompt) - 1) // chunk_size(model) * chunk_size(model)  # the last token is stepped
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt) + params.max_new_tokens, dtype=jnp.int32)[None]
    if whole:
        doc, cache = ttt_prefill(graphdef, state, tokens[:, :whole], positions[:, :whole], doc, cache, schedule)
    for t in range(whole, len(prompt)):
        logits, doc, cache = ttt_step(graphdef, state, tokens[:, t], positions[:, t], doc, cache, schedule)
    rows, recent = params.rows(config.n_positions, len(prompt)), ring(prompt, config.n_positions)
    key = jax.random.key(params.seed)
    for position in range(len(prompt), len(prompt) + params.max_new_tokens):
        token = sample(logits, jax.random.fold_in(key, position)[None], rows, recent, np.full((1,), position - 1))
        yield [int(token[0])]
        if int(token[0]) == eot_id:
            return
        recent[0, position % config.n_positions] = int(token[0])
        logits, doc, cache = ttt_step(graphdef, state, token, positions[:, position], doc, cache, schedule)


def stream_text(
    model: GPT | FastWeightLM, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams, block: int = DECODE_BLOCK,
    schedule: Schedule = Schedule(),
) -> Iterator[str | Completion]:
    """Yields text deltas as they become final, then one ``Completion`` (fast weights learn per ``schedule``)."""
    stream = TextStream(tokenizer, params.stop)
    emitted, generated, reason = 0, [], "length"
    if isinstance(model, FastWeightLM):
        pieces = stream_ttt_tokens(model, prompt, params, tokenizer.eot_id, schedule)
    else:
        pieces = stream_tokens(model, prompt, params, tokenizer.eot_id, block)
    for new in pieces:
        ended = new[-1] == tokenizer.eot_id
        generated += new[:-1] if ended else new
        stream.add(new[:-1] if ended else new)
        stop_at, safe = stream.stop_cut()
        if stop_at is not None:
            stream.text, reason = stream.text[:stop_at], "stop"
            break
        if ended:
            reason = "stop"
            break
        if safe > emitted:
            yield stream.text[emitted:safe]
            emitted = safe
    else:
        stream.close()
        stop_at, _ = stream.stop_cut()
        if stop_at is not None:
            stream.text, reason = stream.text[:stop_at], "stop"
    text = stream.text
    if len(text) > emitted:
        yield text[emitted:]
    yield Completion(text=text, tokens=generated, finish_reason=reason)


def generate_text(model: GPT | FastWeightLM, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                  schedule: Schedule = Schedule()) -> Completion:
    """Non-streaming generation: the whole completion at once."""
    *_, completion = stream_text(model, tokenizer, prompt, params, schedule=schedule)
    return completion
