"""Cached decoding equals the full forward pass; the decode loop and sampling behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.generate import (
    Completion,
    SamplingParams,
    generate_text,
    stream_text,
    stream_tokens,
)
from ponder.model.gpt2 import KVCache, forward, init_model


@pytest.fixture(scope="module")
def model(small_config):
    return init_model(small_config, seed=0)


def _full_logits(model, tokens):
    tokens = jnp.asarray(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(tokens, positions)[0])


def test_token_by_token_and_mixed_prefill_equal_full_forward(model, small_config):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, small_config.vocab_size, (2, 100))
    full = _full_logits(model, tokens)
    graphdef, state = nnx.split(model)
    cache = KVCache.init(small_config, batch_size=2)
    # Several switches between multi-token prefill and single-token decode.
    splits = [0, 7, 8, 9, 30, 31, 32, 33, 64, 65, 99, 100]
    for start, end in zip(splits[:-1], splits[1:]):
        positions = jnp.broadcast_to(jnp.arange(start, end), (2, end - start))
        logits, _, cache = forward(graphdef, state, jnp.asarray(tokens[:, start:end]), positions, cache)
        assert np.abs(np.asarray(logits) - full[:, start:end]).max() <= 1e-5, (start, end)


def test_long_prefill_then_decode_equals_full_forward(code_tokenizer):
    """Block-causal prefill into the cache, then cached decoding, against one full forward."""
    import dataclasses

    from ponder.model.config import GPTConfig
    from ponder.model.gpt2 import ATTN_BLOCK

    config = dataclasses.replace(GPTConfig.tiny(vocab_size=len(code_tokenizer)), n_positions=2 * ATTN_BLOCK + 8)
    model = init_model(config, seed=5)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (1, 2 * ATTN_BLOCK + 8))
    full = _full_logits(model, tokens)
    graphdef, state = nnx.split(model)
    cache = KVCache.init(config, batch_size=1)
    for start, end in [(0, 2 * ATTN_BLOCK), (2 * ATTN_BLOCK, 2 * ATTN_BLOCK + 1), (2 * ATTN_BLOCK + 1, 2 * ATTN_BLOCK + 8)]:
        positions = jnp.arange(start, end)[None]
        logits, _, cache = forward(graphdef, state, jnp.asarray(tokens[:, start:end]), positions, cache)
        assert np.abs(np.asarray(logits) - full[:, start:end]).max() <= 1e-5, (start, end)


def test_prefill_known_to_start_the_document_equals_the_tested_one(model, small_config):
    """``attend_keys=0`` (no past, known when compiling) skips the cache: same logits and cache, then decoding agrees."""
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, small_config.vocab_size, (2, 41)))
    full = _full_logits(model, tokens)
    positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
    cache = KVCache.init(small_config, batch_size=2)
    tested_logits, _, tested_cache = model(tokens[:, :40], positions, cache)
    # Stale contents from another document: never read.
    junk = jnp.asarray(np.random.default_rng(5).integers(0, small_config.vocab_size, (2, 60)))
    _, _, stale = model(junk, jnp.broadcast_to(jnp.arange(60), (2, 60)), KVCache.init(small_config, batch_size=2))
    logits, _, cache = model(tokens[:, :40], positions, stale, attend_keys=0)
    assert np.abs(np.asarray(logits) - full[:, :40]).max() <= 1e-5
    assert np.abs(np.asarray(tested_logits) - full[:, :40]).max() <= 1e-5
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(tested_cache)):  # [B, H, S, hd]: the 40 slots written
        np.testing.assert_allclose(np.asarray(a)[:, :, :40], np.asarray(b)[:, :, :40], rtol=0, atol=1e-5)
    step, _, _ = model(tokens[:, 40:], jnp.full((2, 1), 40), cache, attend_keys=41)
    assert np.abs(np.asarray(step) - full[:, 40:]).max() <= 1e-5


def test_rows_at_different_positions_and_stale_slots(model, small_config):
    """Each row writes at its own position; slots past a row's position are never attended."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, small_config.vocab_size, (2, 40))
    graphdef, state = nnx.split(model)
    cache = KVCache.init(small_config, batch_size=2)
    # Fill both rows with 40 unrelated tokens first: stale contents for row 1.
    junk = jnp.asarray(rng.integers(0, small_config.vocab_size, (2, 40)))
    _, _, cache = forward(graphdef, state, junk, jnp.broadcast_to(jnp.arange(40), (2, 40)), cache)
    # Row 0 continues its junk at position 40; row 1 restarts a document at position 0.
    tokens = jnp.asarray(np.stack([a[:8], b[:8]]))
    positions = jnp.stack([jnp.arange(40, 48), jnp.arange(0, 8)])
    logits, _, cache = forward(graphdef, state, tokens, positions, cache)
    expected_row0 = _full_logits(model, np.concatenate([np.asarray(junk[0]), a[:8]])[None])[0, 40:]
    expected_row1 = _full_logits(model, b[None, :8])[0]
    assert np.abs(np.asarray(logits[0]) - expected_row0).max() <= 1e-5
    assert np.abs(np.asarray(logits[1]) - expected_row1).max() <= 1e-5


@pytest.mark.parametrize("prompt_length", [1, 5, 16, 17, 40])
def test_greedy_generation_equals_repeated_full_forward(model, small_config, prompt_length):
    rng = np.random.default_rng(prompt_length)
    prompt = [int(t) for t in rng.integers(0, small_config.vocab_size, prompt_length)]
    eot = -1  # never produced: generation runs to max_new_tokens
    generated = [t for block in stream_tokens(model, prompt, SamplingParams(max_new_tokens=70), eot) for t in block]
    sequence = list(prompt)
    for _ in range(70):
        # Right-padded to one length (one compilation); causal, so padding changes nothing before it.
        padded = sequence + [0] * (small_config.n_positions - len(sequence))
        sequence.append(int(np.argmax(_full_logits(model, [padded])[0, len(sequence) - 1])))
    assert generated == sequence[prompt_length:]


@pytest.mark.parametrize("scope", ["window", "generated"])
def test_greedy_generation_with_penalties_equals_numpy_on_full_forward(model, small_config, scope):
    """The decode loop's ring of recent tokens: each token is the argmax of the full forward's logits penalised
    in NumPy over the sequence so far (llama.cpp's window, or OpenAI's generated tokens)."""
    from test_sampling import numpy_penalize

    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 50, 30)]  # a small alphabet: tokens repeat
    params = SamplingParams(max_new_tokens=40, repeat_penalty=1.3, repeat_last_n=24, presence_penalty=0.3,
                            frequency_penalty=0.2, penalty_scope=scope)
    generated = [t for block in stream_tokens(model, prompt, params, -1, block=7) for t in block]
    sequence = list(prompt)
    for _ in range(40):
        padded = sequence + [0] * (small_config.n_positions - len(sequence))
        logits = _full_logits(model, [padded])[0, len(sequence) - 1]
        sequence.append(int(np.argmax(numpy_penalize(logits, sequence, params, len(prompt), small_config.n_positions))))
    assert generated == sequence[len(prompt):]
    plain = [t for block in stream_tokens(model, prompt, SamplingParams(max_new_tokens=40), -1) for t in block]
    assert plain != generated  # the penalties changed the text


def test_streaming_block_size_does_not_change_tokens(model):
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    big = [t for b in stream_tokens(model, prompt, params, -1) for t in b]
    small_blocks = list(stream_tokens(model, prompt, params, -1, block=3))
    assert [t for b in small_blocks for t in b] == big
    assert max(len(b) for b in small_blocks) == 3


def test_stop_sequences_cut_the_text_and_stream_matches(model, code_tokenizer):
    prompt = code_tokenizer.encode_document("def add(a, b):\n")
    params = SamplingParams(max_new_tokens=40)
    free = generate_text(model, code_tokenizer, prompt, params)
    assert free.finish_reason == "length" and len(free.tokens) == 40
    # Stop at a piece of text the model is known to produce, possibly spanning tokens.
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    pieces = list(stream_text(model, code_tokenizer, prompt, SamplingParams(max_new_tokens=40, stop=(stop,)), block=1))
    final = pieces[-1]
    assert isinstance(final, Completion) and final.finish_reason == "stop"
    assert final.text == free.text[: free.text.index(stop)]
    assert "".join(pieces[:-1]) == final.text


def test_end_of_document_ends_generation(model, small_config, code_tokenizer):
    prompt = [5, 6, 7]
    first = next(stream_tokens(model, prompt, SamplingParams(max_new_tokens=5), -1))[0]
    # Declare the first greedy token to be the end-of-document id.
    blocks = list(stream_tokens(model, prompt, SamplingParams(max_new_tokens=5), first))
    assert blocks == [[first]]


def test_limits_are_checked(model, small_config):
    with pytest.raises(ValueError, match="context window"):
        list(stream_tokens(model, [1] * 100, SamplingParams(max_new_tokens=29), 0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)
