"""LoRA fast weights (model.lora): SKIP is the base, the chunked forward equals a merged-weight reference and decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.gating import Schedule
from ponder.model.gpt2 import KVCache
from ponder.model.lora import LoRAConfig, LoRALM, LoRALMConfig

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=256, n_embd=64, n_layer=2, n_head=2)
C = 16


def make_model(clip=0.0, layers=2, lr=2.0, eot_id=None, targets=("q", "v", "mlp"), optimizer="sgd", objective="lm"):
    lora = LoRAConfig(layers=layers, rank=4, chunk=C, lr=lr, clip=clip, targets=targets, optimizer=optimizer,
                      objective=objective)
    config = LoRALMConfig(BASE, lora, eot_id=eot_id)
    return LoRALM(config, rngs=nnx.Rngs(0))


def forward(model, tokens, positions, schedule=Schedule("update"), **kwargs):
    """``model(...)`` compiled (eager dispatch of every op is several times slower)."""
    return nnx.jit(lambda m, t, p, kw: m(t, p, schedule, **kw))(model, tokens, positions, kwargs)


def tokens_of(B, T, seed=3):
    # A short repeating text, so that reading it teaches the adapters something.
    pattern = jax.random.randint(jax.random.key(seed), (B, 24), 0, BASE.vocab_size)
    tokens = jnp.tile(pattern, (1, T // 24 + 1))[:, :T]
    return tokens, jnp.broadcast_to(jnp.arange(T), (B, T))


def reference_logits(model, tokens, positions, lam, steps=1):
    """Dynamic evaluation written out: the adapters merged into copies of the fast blocks' c_attn kernels.

    One row at a time; chunk c is read with the merged weights after chunks < c
    (earlier chunks' keys kept in a cache as computed then), then ``steps``
    SGD steps on the chunk's own loss (``objective``: next-token CE, or one minus
    the cosine of the hidden state at t and wte's row of token t + 1), each
    step's change capped, then scaled by the chunk's lam.
    """
    cfg = model.config.lora
    graphdef, params = nnx.split(model.base)
    first = BASE.n_layer - cfg.layers

    @jax.jit
    def run(adapters, tok, pos, cache):
        base = nnx.merge(graphdef, params)
        A, B = adapters
        merged = lambda name, l: A[cfg.targets.index(name), l] @ B[cfg.targets.index(name)][l]
        for l in range(cfg.layers):
            block = base.h[first + l]
            q, v = merged("q", l), merged("v", l)
            block.attn.c_attn.kernel = nnx.Param(block.attn.c_attn.kernel[...] + jnp.concatenate([q, 0 * q, v], 1))
            if "mlp" in cfg.targets:
                block.mlp.c_fc.kernel = nnx.Param(block.mlp.c_fc.kernel[...] + merged("mlp", l))
        logits, hidden, cache = base(tok, pos, cache)
        return logits, cache, hidden

    @jax.jit
    @jax.grad
    def chunk_grad(adapters, tok, pos, cache):
        logits, _, hidden = run(adapters, tok, pos, cache)
        if cfg.objective == "lm":
            return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tok[:, 1:, None], -1).mean()
        h, e = hidden[0, :-1], params["wte"]["embedding"][...][tok[0, 1:]]
        return jnp.mean(1 - jnp.sum(h * e, -1) / (jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(e, axis=-1)))

    rows = []
    for b in range(tokens.shape[0]):
        state = model.init_state(1)
        adapters, cache, out = (state.A[0], [b[0] for b in state.B]), KVCache.init(BASE, 1), []
        for c in range(tokens.shape[1] // C):
            tok, pos = tokens[b: b + 1, c * C:(c + 1) * C], positions[b: b + 1, c * C:(c + 1) * C]
            logits, new_cache, _ = run(adapters, tok, pos, cache)
            out.append(logits[0])
            for _ in range(steps if lam[b, c] > 0 else 0):
                change = jax.tree.map(lambda g: -cfg.lr * g, chunk_grad(adapters, tok, pos, cache))
                norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(change)))
                if cfg.clip and norm > cfg.clip:
                    change = jax.tree.map(lambda g: g * cfg.clip / norm, change)
                change = jax.tree.map(lambda g: lam[b, c] * g, change)
                adapters = jax.tree.map(jnp.add, adapters, change)
            cache = new_cache
        rows.append(jnp.concatenate(out))
    return jnp.stack(rows)


def test_skip_is_the_base_and_reading_a_repeated_text_lowers_its_loss():
    tokens, positions = tokens_of(2, 3 * C)
    nll = lambda logits: -jnp.take_along_axis(jax.nn.log_softmax(logits[:, 2 * C:-1]), tokens[:, 2 * C + 1:, None], -1).mean()
    model = make_model()
    base_logits, _, _ = model.base(tokens, positions)
    skip = forward(model, tokens, positions, Schedule("skip")).logits
    np.testing.assert_allclose(skip, base_logits, atol=1e-5)
    updated = forward(model, tokens, positions).logits
    np.testing.assert_allclose(updated[:, :C], base_logits[:, :C], atol=1e-5)  # the first chunk is read before any update
    assert nll(updated) < nll(skip) - 0.1, (nll(updated), nll(skip))
    adam = make_model(lr=0.03, optimizer="adam")  # Adam's moments are per row and document
    assert nll(forward(adam, tokens, positions).logits) < nll(skip) - 0.1
    ssl = make_model(lr=2.0, objective="ssl")  # the hidden state pulled toward the next token's row of the head
    assert nll(forward(ssl, tokens, positions).logits) < nll(skip) - 0.1


@pytest.mark.parametrize("clip, steps, targets, objective", [
    (0.0, 1, ("v", "q"), "lm"), (0.05, 2, ("q", "v", "mlp"), "lm"), (0.05, 2, ("q", "v", "mlp"), "ssl")])
def test_chunked_forward_equals_merged_weight_reference(clip, steps, targets, objective):
    model = make_model(clip=clip, targets=targets, objective=objective)
    tokens, positions = tokens_of(2, 3 * C)
    lam = jnp.array([[1.0, 0.5, 1.0], [0.0, 1.0, 1.0]])
    out = forward(model, tokens, positions, Schedule("update", steps=steps), chunk_lambda=lam)
    np.testing.assert_allclose(out.logits, reference_logits(model, tokens, positions, np.asarray(lam), steps), atol=2e-4)
    if clip:
        assert int(out.state.clipped.sum()) > 0  # the cap was exercised
    assert int(out.state.count[0]) == 3 * C


@pytest.mark.parametrize("objective", ["lm", "ssl"])
def test_decoding_token_by_token_equals_the_chunked_forward(objective):
    model = make_model(clip=0.05, optimizer="adam", lr=0.01, objective=objective)
    tokens, positions = tokens_of(2, 3 * C)
    schedule = Schedule("update", steps=2)
    full = forward(model, tokens, positions, schedule)
    step = nnx.jit(lambda m, t, p, c, s: m.step(t, p, c, s, schedule))
    cache, state, logits = KVCache.init(BASE, 2), model.init_state(2), []
    for t in range(tokens.shape[1]):
        out, cache, state = step(model, tokens[:, t], positions[:, t], cache, state)
        logits.append(out)
    np.testing.assert_allclose(jnp.stack(logits, 1), full.logits, atol=2e-4)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(full.state)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(state.clipped, full.state.clipped)


def test_calls_on_chunk_boundaries_equal_one_call():
    model = make_model()
    tokens, positions = tokens_of(2, 4 * C)
    full = forward(model, tokens, positions)
    first = forward(model, tokens[:, :C], positions[:, :C])
    rest = forward(model, tokens[:, C:], positions[:, C:], state=first.state, cache=first.cache)
    np.testing.assert_allclose(jnp.concatenate([first.logits, rest.logits], 1), full.logits, atol=2e-5)


def test_a_call_without_updates_runs_at_once_and_equals_decoding():
    """From adapters already trained, a SKIP call (one forward, no chunk scan) equals SKIP decoding."""
    model = make_model()
    tokens, positions = tokens_of(2, 3 * C)
    first = forward(model, tokens[:, :C], positions[:, :C], chunk_lambda=jnp.ones((2, 1)))
    assert float(jnp.abs(first.state.B[0]).sum()) > 0
    skip = Schedule("skip")
    rest = forward(model, tokens[:, C:], positions[:, C:], skip, state=first.state, cache=first.cache)
    step = nnx.jit(lambda m, t, p, c, s: m.step(t, p, c, s, skip))
    cache, state, logits = first.cache, first.state, []
    for t in range(C, 3 * C):
        out, cache, state = step(model, tokens[:, t], positions[:, t], cache, state)
        logits.append(out)
    np.testing.assert_allclose(jnp.stack(logits, 1), rest.logits, atol=2e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(rest.state)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_packed_document_starts_cold():
    model = make_model()
    a, _ = tokens_of(1, 2 * C, seed=4)
    b, _ = tokens_of(1, 2 * C, seed=5)
    packed = jnp.concatenate([a, b], 1)
    positions = jnp.tile(jnp.arange(2 * C), 2)[None]
    segments = jnp.repeat(jnp.arange(2), 2 * C)[None]
    out = forward(model, packed, positions, segment_ids=segments)
    alone = forward(model, b, positions[:, :2 * C])
    np.testing.assert_allclose(out.logits[:, 2 * C:], alone.logits, atol=2e-5)


def test_end_of_text_resets_the_adapters_while_decoding():
    eot = 7
    model = make_model(eot_id=eot)
    tokens, positions = tokens_of(1, 2 * C)
    step = nnx.jit(lambda m, t, p, c, s: m.step(t, p, c, s, Schedule("update")))
    cache, state = KVCache.init(BASE, 1), model.init_state(1)
    for t in range(2 * C):
        _, cache, state = step(model, tokens[:, t], positions[:, t], cache, state)
    assert float(jnp.abs(state.B[0]).sum()) > 0
    _, cache, state = step(model, jnp.array([eot]), jnp.array([0]), cache, state)
    assert float(sum(jnp.abs(b).sum() for b in state.B)) == 0 and int(state.count[0]) == 1


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="LoRAConfig.rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="LoRAConfig.objective"):
        LoRAConfig(objective="mse")
    with pytest.raises(ValueError, match="LoRAConfig.layers"):
        LoRALMConfig(BASE, LoRAConfig(layers=3))
    with pytest.raises(ValueError, match="multiple of the LoRA chunk"):
        forward(make_model(), *tokens_of(1, C + 1))


def test_pulse_training_and_eval_through_the_cli(tmp_path, tiny_corpus_and_base):
    """`ponder train ttt --fast-weights lora`: two steps train A0 through the updates; `ponder eval` compares schedules."""
    import json

    from ponder import cli as ponder_cli
    from ponder.model import checkpoint

    data, base_dir = tiny_corpus_and_base
    base, _ = checkpoint.load(base_dir)
    run = tmp_path / "run"
    assert ponder_cli.main(["train", "ttt", "--fast-weights", "lora", "--base", str(base_dir), "--lora-layers", "1",
                            "--lora-rank", "2", "--lora-targets", "v,mlp", "--corpus", str(data), "--run-dir", str(run),
                            "--steps", "2", "--batch-size", "1", "--seq-len", "64", "--schedule", "update", "--lr", "0.01",
                            "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--no-progress"]) == 0
    model, _ = checkpoint.load(run / "final")
    assert isinstance(model, LoRALM) and model.config.lora.chunk == LoRAConfig.chunk
    assert model.config.lora.targets == ("v", "mlp") and model.A0.shape == (2, 1, 32, 2)
    fresh = LoRALM(model.config, rngs=nnx.Rngs(0), base=base)  # the run's seed is 0 too
    assert not np.allclose(model.A0[...], fresh.A0[...])  # A0 trained, through the updates
    np.testing.assert_array_equal(model.base.h[1].attn.c_attn.kernel[...], base.h[1].attn.c_attn.kernel[...])  # frozen
    assert ponder_cli.main(["generate", "--checkpoint", str(run / "final"), "--max-tokens", "4", "def"]) == 0
    assert ponder_cli.main(["eval", "--checkpoint", str(run / "final"), "--corpus", str(data), "--out",
                            str(tmp_path / "eval"), "--window", "16", "--min-tokens", "64", "--max-tokens", "64",
                            "--max-documents", "2", "--rate", "0.5", "--lines-per-file", "0"]) == 0
    table = json.loads((tmp_path / "eval" / "eval-lora.json").read_text())
    assert set(table) == {"SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4", "FIXED_1", "RANDOM@0.5", "ORACLE@0.5", "VALUE@0.5"}
    assert table["ORACLE@0.5"]["updated"] == 0.5 and table["UPDATE_1"]["updated"] == 1.0  # 2 of each document's 4 chunks
    assert table["VALUE@0.5"]["updated"] == 0.5
    assert table["SKIP"]["tokens"] == 2 * 63 and table["UPDATE_2"]["ce"] != table["SKIP"]["ce"]

    # `ponder train gate`: a read gate regressed on what each chunk's update is worth; A0 stays.
    assert ponder_cli.main(["train", "gate", "--init-from", str(run / "final"), "--corpus", str(data), "--run-dir",
                            str(tmp_path / "gate"), "--steps", "2", "--batch-size", "1", "--seq-len", "64",
                            "--min-after", "16", "--lr", "0.01", "--warmup", "1", "--eval-every", "2",
                            "--eval-batches", "1", "--no-progress"]) == 0
    gated, _ = checkpoint.load(tmp_path / "gate" / "final")
    np.testing.assert_array_equal(gated.A0[...], model.A0[...])
    fresh_gate = LoRALM(gated.config, rngs=nnx.Rngs(0), base=base).gate  # the run's seed; its bias set to 0
    assert not np.allclose(gated.gate.hidden.kernel[...], fresh_gate.hidden.kernel[...])  # the gate trained
    assert ponder_cli.main(["eval", "--checkpoint", str(tmp_path / "gate" / "final"), "--corpus", str(data), "--out",
                            str(tmp_path / "eval-gated"), "--window", "16", "--min-tokens", "64", "--max-tokens", "64",
                            "--max-documents", "2", "--rate", "0.5", "--lines-per-file", "0"]) == 0
    table = json.loads((tmp_path / "eval-gated" / "eval-lora.json").read_text())
    assert {"LEARNED", "LEARNED_BUDGET@0.5"} <= set(table) and 0 < table["LEARNED_BUDGET@0.5"]["updated"] < 1


def test_update_value_is_the_window_loss_gradient_by_lam():
    """train.evaluate.update_value: -d(window loss)/d(lam_c), against central differences of the chunked forward."""
    from ponder.train.evaluate import update_value

    model = make_model(lr=2.0)  # no cap: the loss is smooth in lam
    tokens, positions = tokens_of(1, 3 * C)
    value = update_value(model, np.asarray(tokens[0]), window=3 * C, at=0.5)

    def loss(lam):
        logits = forward(model, tokens, positions, chunk_lambda=jnp.asarray([lam], jnp.float32)).logits[0, :-1]
        return float(-jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[0, 1:, None], -1).sum())

    eps = 0.02
    for c in range(3):
        up, down = [0.5] * 3, [0.5] * 3
        up[c] += eps
        down[c] -= eps
        central = -(loss(up) - loss(down)) / (2 * eps)
        np.testing.assert_allclose(value[c], central, rtol=5e-3, atol=1e-3)
    assert value[2] == 0.0 and value[0] > 0.1  # the last chunk's update reaches nothing in its window
