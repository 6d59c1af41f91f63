"""The sampler against direct NumPy computations of llama.cpp's and OpenAI's definitions.

The reference here reads a row's token sequence as a plain list (no ring),
and walks the chain token by token as llama.cpp's samplers do; the sampler
must give the same adjusted logits for every control alone and together,
in both chain orders, on rings that are partly filled and that wrapped.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder.model.sampling import (
    SamplerRows,
    Sampling,
    SamplingError,
    accept,
    adjusted_logits,
    penalize,
    ring,
    sample,
)

V, W = 40, 16


def numpy_penalize(logits: np.ndarray, seq: list[int], s: Sampling, prompt_end: int, window: int) -> np.ndarray:
    """llama.cpp's ``llama_sampler_penalties_apply`` over the last ``repeat_last_n`` tokens of ``seq``; presence and
    frequency count only ``seq[prompt_end:]`` under ``penalty_scope="generated"`` (OpenAI)."""
    last_n = window if s.repeat_last_n == -1 else min(s.repeat_last_n, window)
    out = logits.astype(np.float64).copy()
    if last_n == 0:
        return out
    start = max(0, len(seq) - last_n)
    first = prompt_end if s.penalty_scope == "generated" else 0
    for token in set(seq[start:]):
        count = sum(1 for q in range(max(start, first), len(seq)) if seq[q] == token)
        out[token] = out[token] * s.repeat_penalty if out[token] <= 0 else out[token] / s.repeat_penalty
        out[token] -= count * s.frequency_penalty + (count > 0) * s.presence_penalty
    return out


def numpy_chain(z: np.ndarray, s: Sampling) -> np.ndarray:
    """top-k, top-p, min-p and temperature on penalised logits, one sampler after another: what the draw reads."""
    filtered = z if s.temperature_last else z / s.temperature
    order = sorted(range(len(z)), key=lambda i: -filtered[i])
    kept = order[: s.top_k] if s.top_k > 0 else order
    if s.top_p < 1:
        p = np.exp(filtered[kept] - filtered[kept].max())
        p /= p.sum()
        cum, cut = 0.0, len(kept)
        for i, pi in enumerate(p):  # keep tokens until their mass reaches top_p (the one crossing it included)
            cum += pi
            if cum >= s.top_p:
                cut = i + 1
                break
        kept = kept[:cut]
    if s.min_p > 0:
        kept = [i for i in kept if filtered[i] >= filtered[kept[0]] + math.log(s.min_p)]
    out = np.full_like(z, -np.inf)
    out[kept] = z[kept] / s.temperature
    return out


def _rows(settings: list[Sampling], prompt_end: list[int], window: int = W) -> SamplerRows:
    parts = [s.rows(window, end) for s, end in zip(settings, prompt_end)]
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def _case(rng, n: int):
    """A token sequence of n tokens over a small alphabet (so tokens repeat) and logits of both signs."""
    seq = [int(t) for t in rng.integers(0, 12, n)]
    return seq, rng.normal(0, 3, V).astype(np.float32)


PENALTIES = [
    Sampling(repeat_penalty=1.3),
    Sampling(repeat_penalty=0.7, repeat_last_n=5),
    Sampling(presence_penalty=0.8, repeat_last_n=8),
    Sampling(frequency_penalty=0.45, repeat_last_n=-1),
    Sampling(frequency_penalty=-0.3, presence_penalty=1.1),
    Sampling(repeat_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=100),  # > W: all W count
    Sampling(repeat_penalty=1.2, presence_penalty=2.0, frequency_penalty=0.5, repeat_last_n=-1, penalty_scope="generated"),
    Sampling(frequency_penalty=0.7, repeat_last_n=6, penalty_scope="generated"),
    Sampling(repeat_penalty=1.4, repeat_last_n=0),  # off
    Sampling(),
]


@pytest.mark.parametrize("length", [1, 7, W, 37])  # a partly filled ring, a full one, one that wrapped twice
def test_penalties_equal_numpy(length):
    rng = np.random.default_rng(length)
    cases = [_case(rng, length) for _ in PENALTIES]
    prompt_end = [int(rng.integers(0, length + 1)) for _ in PENALTIES]
    recent = np.concatenate([ring(seq, W) for seq, _ in cases])
    logits = np.stack([z for _, z in cases])
    rows = _rows(PENALTIES, prompt_end)
    got = np.asarray(jax.jit(penalize)(jnp.asarray(logits), rows, jnp.asarray(recent), jnp.full((len(cases),), length - 1)))
    for i, ((seq, z), s) in enumerate(zip(cases, PENALTIES)):
        np.testing.assert_allclose(got[i], numpy_penalize(z, seq, s, prompt_end[i], W), rtol=1e-6, atol=1e-6, err_msg=str(s))
    assert not np.array_equal(got[0], logits[0])  # the penalties did something


def test_ring_and_accept_agree():
    seq = [int(t) for t in np.random.default_rng(0).integers(0, V, 45)]
    recent = jnp.asarray(ring(seq[:3], W))
    for q in range(3, len(seq)):
        recent = accept(recent, jnp.asarray([q]), jnp.asarray([seq[q]]))
        assert np.array_equal(np.asarray(recent), ring(seq[: q + 1], W)), q


CHAINS = [
    Sampling(temperature=0.7, top_k=5),
    Sampling(temperature=1.3, top_p=0.6),
    Sampling(temperature=0.5, top_p=0.6, temperature_last=True),
    Sampling(temperature=1.0, min_p=0.1),
    Sampling(temperature=2.0, min_p=0.3, temperature_last=True),
    Sampling(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, temperature_last=True),
    Sampling(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05),
    Sampling(temperature=1.5, top_k=20, top_p=0.8, min_p=0.2, repeat_penalty=1.3, presence_penalty=0.4,
             frequency_penalty=0.3, repeat_last_n=10, temperature_last=True),
    Sampling(temperature=0.9, top_p=0.95, min_p=0.02, repeat_penalty=1.2, frequency_penalty=0.6, repeat_last_n=-1,
             penalty_scope="generated"),
    Sampling(temperature=1.0),
]


def test_adjusted_logits_equal_numpy():
    rng = np.random.default_rng(7)
    length = 23
    cases = [(seq, z / 3) for seq, z in (_case(rng, length) for _ in CHAINS)]  # flatter: the filters keep several
    prompt_end = [15] * len(CHAINS)
    recent = np.concatenate([ring(seq, W) for seq, _ in cases])
    logits = np.stack([z for _, z in cases])
    got = np.asarray(adjusted_logits(jnp.asarray(logits), _rows(CHAINS, prompt_end), jnp.asarray(recent),
                                     jnp.full((len(cases),), length - 1)))
    for i, ((seq, z), s) in enumerate(zip(cases, CHAINS)):
        want = numpy_chain(numpy_penalize(z, seq, s, prompt_end[i], W), s)
        assert np.array_equal(np.isfinite(got[i]), np.isfinite(want)), s
        np.testing.assert_allclose(got[i][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5, err_msg=str(s))
    kept = np.isfinite(got).sum(axis=1)
    assert 1 < kept.min() and kept[:-1].max() < V  # every filter cut something, none cut everything


def test_temperature_position_changes_what_top_p_and_min_p_keep():
    """llama.cpp's chain filters untempered probabilities; with temperature first a hot draw keeps more tokens."""
    z = jnp.asarray(np.random.default_rng(3).normal(0, 3, (1, V)).astype(np.float32))
    recent, newest = jnp.zeros((1, W), jnp.int32), jnp.asarray([-1])
    for control in ({"top_p": 0.7}, {"min_p": 0.1}):
        first, last = (_rows([Sampling(temperature=3.0, temperature_last=t, **control)], [0]) for t in (False, True))
        assert np.isfinite(np.asarray(adjusted_logits(z, first, recent, newest))).sum() > \
            np.isfinite(np.asarray(adjusted_logits(z, last, recent, newest))).sum()


def _draw(logits, settings: Sampling, n: int, seed: int, recent=None, newest=-1):
    keys = jax.random.split(jax.random.key(seed), n)
    rows = jax.tree.map(lambda a: np.repeat(a, n, 0), settings.rows(W, 0))
    recent = np.zeros((1, W), np.int32) if recent is None else recent
    return np.asarray(sample(jnp.broadcast_to(logits, (n, logits.shape[-1])), keys, rows,
                             jnp.asarray(np.repeat(recent, n, 0)), jnp.full((n,), newest)))


def test_sampling_is_seeded_and_draws_from_the_adjusted_distribution():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
    draw = lambda seed, **kw: _draw(logits, Sampling(**{"temperature": 1.0, **kw}), 2000, seed)
    assert np.array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))
    assert set(draw(0, top_k=2)) == {0, 1}
    assert set(draw(0, top_p=0.65)) == {0, 1}  # 0.4 + 0.3 reaches 0.65
    assert set(draw(0, top_p=0.3)) == {0}
    assert set(draw(0, min_p=0.6)) == {0, 1}  # 0.2 < 0.6 * 0.4 <= 0.3
    assert set(draw(0, temperature=0.0)) == {0}
    frequencies = np.bincount(draw(5), minlength=4) / 2000
    assert np.abs(frequencies - [0.4, 0.3, 0.2, 0.1]).max() < 0.05
    # Token 0 seen twice: its probability follows the penalised logits' softmax.
    seen = ring([0, 3, 0], W)
    penalised = _draw(logits, Sampling(temperature=1.0, frequency_penalty=0.5), 2000, 2, recent=seen, newest=2)
    z = np.log([0.4, 0.3, 0.2, 0.1]) - np.array([1.0, 0, 0, 0.5])
    assert np.abs(np.bincount(penalised, minlength=4) / 2000 - np.exp(z) / np.exp(z).sum()).max() < 0.05


def test_greedy_takes_the_argmax_of_the_penalised_logits():
    logits = jnp.asarray([[2.0, 1.9, -1.0, 0.5]])
    seen = ring([0, 1, 0], W)
    assert list(_draw(logits, Sampling(), 1, 0, seen, 2)) == [0]
    assert list(_draw(logits, Sampling(repeat_penalty=1.1), 1, 0, seen, 2)) == [0]  # both seen: 2.0/1.1 > 1.9/1.1
    assert list(_draw(logits, Sampling(repeat_penalty=1.1, repeat_last_n=1), 1, 0, seen, 2)) == [1]  # token 0 alone
    assert list(_draw(logits, Sampling(presence_penalty=1.0, frequency_penalty=0.5), 1, 0, seen, 2)) == [3]


def test_new_values_never_recompile():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, V)).astype(np.float32))
    recent, newest = jnp.asarray(np.concatenate([ring([1, 2, 3], W)] * 2)), jnp.asarray([2, 2])
    keys = jax.random.split(jax.random.key(0), 2)
    settings = [Sampling(), Sampling(temperature=0.5), Sampling(repeat_penalty=1.3, repeat_last_n=2, min_p=0.1),
                Sampling(temperature=1.2, top_k=3, top_p=0.5, presence_penalty=-1, frequency_penalty=2,
                         penalty_scope="generated", temperature_last=True)]
    sample(logits, keys, _rows(settings[:2], [0, 0]), recent, newest)
    compiled = sample._cache_size()
    for a in settings:
        for b in settings:
            sample(logits, keys, _rows([a, b], [1, 2]), recent, newest).block_until_ready()
    assert sample._cache_size() == compiled


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("temperature", -0.5, "between 0 and 100"),
        ("temperature", float("nan"), "between 0 and 100"),
        ("top_k", -1, ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("min_p", 1.5, "[0, 1]"),
        ("min_p", -0.1, "[0, 1]"),
        ("repeat_penalty", 0.0, "positive"),
        ("repeat_penalty", float("inf"), "positive"),
        ("repeat_last_n", -2, ">= -1"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", float("nan"), "[-2, 2]"),
        ("penalty_scope", "prompt", "one of"),
    ],
)
def test_out_of_range_values_name_the_field_and_the_limit(field, value, words):
    Sampling(**{field: value})  # built as sent; the service (or SamplingParams) checks
    with pytest.raises(SamplingError) as caught:
        Sampling(**{field: value}).check()
    assert caught.value.field == field and words in caught.value.message
    assert str(caught.value).startswith(f"{field}: must be")


def test_rows_resolve_the_window():
    assert Sampling(repeat_last_n=-1).rows(W, 5).last_n.tolist() == [W]
    assert Sampling(repeat_last_n=10 * W).rows(W, 5).last_n.tolist() == [W]
    assert Sampling(penalty_scope="generated").rows(W, 5).first.tolist() == [5]
    assert Sampling().rows(W, 5).first.tolist() == [0]
    assert dataclasses.replace(Sampling(), repeat_penalty=1.1).rows(W, 0).penalising().tolist() == [True]
    assert Sampling(repeat_penalty=1.1, repeat_last_n=0).rows(W, 0).penalising().tolist() == [False]
