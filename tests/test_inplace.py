"""In-Place TTT (model.inplace): SKIP is the base, decoding equals the parallel form, which equals a chunk-by-chunk reference."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.gating import Schedule
from ponder.model.gpt2 import KVCache
from ponder.model.inplace import InPlaceConfig, InPlaceLM, InPlaceLMConfig

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=256, n_embd=64, n_layer=2, n_head=2)
C = 16


def make_model(clip=0.0, layers=2, eot_id=None):
    config = InPlaceLMConfig(BASE, InPlaceConfig(layers=layers, chunk=C, eta=0.05, clip=clip, conv_width=3), eot_id=eot_id)
    model = InPlaceLM(config, rngs=nnx.Rngs(0))
    # A trained-looking target (it starts at zero, which would make every update vanish).
    model.W_target[...] = jax.random.normal(jax.random.key(1), model.W_target.shape) * 0.5
    model.conv[...] = jax.random.normal(jax.random.key(2), model.conv.shape)
    return model


def forward(model, tokens, positions, schedule=Schedule("update"), **kwargs):
    """``model(...)`` compiled (eager dispatch of every op is several times slower)."""
    return nnx.jit(lambda m, t, p, kw: m(t, p, schedule, **kw))(model, tokens, positions, kwargs)


def tokens_of(B, T, seed=3):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, BASE.vocab_size)
    return tokens, jnp.broadcast_to(jnp.arange(T), (B, T))


def test_skip_is_the_base():
    model = make_model()
    tokens, positions = tokens_of(2, 3 * C)
    base_logits, _, _ = model.base(tokens, positions)
    out = forward(model, tokens, positions, Schedule("skip"))
    np.testing.assert_allclose(out.logits, base_logits, atol=1e-5)
    updated = forward(model, tokens, positions).logits
    assert not np.allclose(updated[:, C:], base_logits[:, C:], atol=1e-3)  # updates do change later chunks
    np.testing.assert_allclose(updated[:, :C], base_logits[:, :C], atol=1e-5)  # but never the first


def reference_logits(model, tokens, positions, lam):
    """Chunk by chunk under explicit weights W_c, earlier chunks' keys kept in a cache (as computed then)."""
    cfg, B, T = model.config.inplace, *tokens.shape
    W = model.init_state(B).W  # [B, L, F, D]
    x0 = model.base.wte(tokens)  # [B, T, D]
    padded = jnp.pad(x0, ((0, 0), (cfg.conv_width - 2, 1), (0, 0)))  # window of t: x0[t+2-w .. t+1]
    out, cache = [], KVCache.init(BASE, B)
    for c in range(T // C):
        end = (c + 1) * C
        zs = []

        def fast_mlp(l, z):
            zs.append(z)
            return jnp.einsum("btf,bfd->btd", z, W[:, l])

        part = slice(c * C, end)
        x, cache = model._forward(tokens[:, part], positions[:, part], cache, None, None, fast_mlp)
        out.append(model.base.logits(model.base.ln_f(x)))
        windows = jnp.stack([padded[:, t: t + cfg.conv_width] for t in range(c * C, end)], 1)  # [B, C, w, D] oldest first
        scored = (jnp.arange(c * C, end) < T - 1)[None, :, None]  # the last token has no next token yet
        for l, z in enumerate(zs):
            targets = jnp.einsum("bcjd,jd->bcd", windows, model.conv[...][::-1]) @ model.W_target[...][l]  # [B, C, D]
            d = lam[:, c, None, None] * cfg.eta * jnp.einsum("bcf,bcd->bfd", z, targets * scored)
            norm = jnp.linalg.norm(d, axis=(1, 2))[:, None, None]
            if cfg.clip:
                d = jnp.where(norm > cfg.clip, d * cfg.clip / norm, d)
            W = W.at[:, l].add(d)
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_parallel_form_equals_chunk_by_chunk_reference(clip):
    model = make_model(clip=clip)
    tokens, positions = tokens_of(2, 3 * C)
    lam = jnp.asarray([[1.0, 0.5, 1.0], [0.0, 1.0, 0.7]])
    out = forward(model, tokens, positions, chunk_lambda=lam)
    np.testing.assert_allclose(out.logits, reference_logits(model, tokens, positions, lam), atol=2e-4)
    if clip:
        assert int(out.state.clipped.sum()) > 0  # the cap was reached and counted


def test_decoding_equals_the_full_forward_and_calls_continue():
    model = make_model(clip=0.05)
    B, T = 2, 3 * C
    tokens, positions = tokens_of(B, T)
    full = forward(model, tokens, positions)
    step = nnx.jit(lambda m, t, p, c, s: m.step(t, p, c, s, Schedule("update")))
    cache, state, logits = KVCache.init(BASE, B), model.init_state(B), []
    for t in range(T):
        out, cache, state = step(model, tokens[:, t], positions[:, t], cache, state)
        logits.append(out)
    np.testing.assert_allclose(jnp.stack(logits, 1), full.logits, atol=2e-4)
    np.testing.assert_array_equal(state.clipped, full.state.clipped)
    np.testing.assert_allclose(state.W, full.state.W, atol=1e-5)
    # A session that ingests the document one chunk per call ends where one call does.
    cache, state, pieces = KVCache.init(BASE, B), None, []
    for c in range(T // C):
        part = slice(c * C, (c + 1) * C)
        out = forward(model, tokens[:, part], positions[:, part], state=state, cache=cache)
        pieces.append(out.logits)
        cache, state = out.cache, out.state
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full.logits, atol=2e-4)


def test_a_document_boundary_resets():
    model = make_model(layers=1)
    B, T = 1, 4 * C
    tokens, _ = tokens_of(B, T)
    segments = jnp.asarray([[0] * (2 * C) + [1] * (2 * C)])
    positions = jnp.asarray([list(range(2 * C)) * 2])
    packed = forward(model, tokens, positions, segment_ids=segments)
    alone = forward(model, tokens[:, 2 * C:], positions[:, 2 * C:])
    np.testing.assert_allclose(packed.logits[:, 2 * C:], alone.logits, atol=2e-4)
    np.testing.assert_allclose(packed.state.W, alone.state.W, atol=1e-5)
    np.testing.assert_array_equal(packed.state.count, [2 * C])
    # Decoding: reset() at the boundary continues as a cold start.
    reset = model.reset(packed.state, jnp.asarray([True]))
    fresh = model.init_state(B)
    for a, b in zip(jax.tree.leaves(reset), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(a, b)


def test_pulse_training_through_the_cli(tmp_path, tiny_corpus_and_base):
    """`ponder train ttt --fast-weights inplace`: two steps on a base checkpoint; the checkpoint says which kind."""
    from ponder import cli as ponder_cli
    from ponder.model import checkpoint

    data, base_dir = tiny_corpus_and_base
    base, _ = checkpoint.load(base_dir)
    run = tmp_path / "run"
    assert ponder_cli.main(["train", "ttt", "--fast-weights", "inplace", "--base", str(base_dir),
                            "--corpus", str(data), "--run-dir", str(run), "--steps", "2", "--batch-size", "1",
                            "--seq-len", "64", "--chunk", "16", "--schedule", "update", "--lr", "0.01",
                            "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--no-progress"]) == 0
    model, _ = checkpoint.load(run / "final")
    assert isinstance(model, InPlaceLM) and model.config.inplace.chunk == 16
    assert float(jnp.abs(model.W_target[...]).max()) > 0  # the target trained away from zero
    np.testing.assert_array_equal(model.base.h[0].mlp.c_proj.kernel[...], base.h[0].mlp.c_proj.kernel[...])  # frozen
    # `ponder eval` of it: one CE per schedule on the held-out split.
    assert ponder_cli.main(["generate", "--checkpoint", str(run / "final"), "--max-tokens", "4", "def"]) == 0
    assert ponder_cli.main(["eval", "--checkpoint", str(run / "final"), "--corpus", str(data), "--out",
                            str(tmp_path / "eval"), "--window", "32", "--min-tokens", "64", "--max-tokens", "64",
                            "--max-documents", "2", "--rate", "0.5", "--lines-per-file", "0"]) == 0
    table = json.loads((tmp_path / "eval" / "eval-inplace.json").read_text())
    assert set(table) == {"SKIP", "UPDATE_1", "FIXED_1", "RANDOM@0.5", "ORACLE@0.5", "VALUE@0.5"}
    assert table["SKIP"]["tokens"] == 2 * 63


def test_held_out_cross_entropy_by_windows():
    """train.evaluate.fast_weight_cross_entropy: SKIP scores the base window by window; UPDATE differs."""
    from ponder.train.evaluate import fast_weight_cross_entropy

    model = make_model(layers=1)
    doc = np.asarray(tokens_of(1, 4 * C, seed=5)[0][0])
    table = fast_weight_cross_entropy(model, [doc], 2 * C, {"skip": Schedule("skip"), "update": Schedule("update")})
    windows = [model.base(jnp.asarray(doc[None, s:s + 2 * C]), jnp.arange(2 * C)[None])[0][0] for s in (0, 2 * C)]
    logits = jnp.concatenate(windows)[:-1]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.asarray(doc[1:, None]), -1)[:, 0]
    assert table["skip"]["tokens"] == 4 * C - 1
    np.testing.assert_allclose(table["skip"]["ce"], float(nll.mean()), rtol=1e-5)
    assert abs(table["update"]["ce"] - table["skip"]["ce"]) > 1e-4
