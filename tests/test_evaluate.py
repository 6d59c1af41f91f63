"""ponder eval: the table's numbers recomputed independently, through the token-by-token decode path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.document import run_document
from ponder.model.gating import GateConfig, Schedule
from ponder.model.gpt2 import KVCache
from ponder.model.ttt import TTTConfig
from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM
from ponder.train import evaluate
from ponder.train.data import Batch
from ponder.train.stages import TTTStage

BASE = GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2)
CONFIG = TTTLMConfig(base=BASE, ttt=TTTConfig(width=64, n_head=4), gate=GateConfig(chunk=16))
WINDOW = 32


@pytest.fixture(scope="module")
def fixture():
    model = TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(nnx.state(model.ttt))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model.ttt, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    for layer in model.ttt:
        layer.tau_offset[...] = jnp.abs(layer.tau_offset[...])
    leaves, treedef = jax.tree.flatten(nnx.state(model.gate))
    nnx.update(model.gate, jax.tree.unflatten(treedef, [x + 0.5 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 512, 64).astype(np.int32) for _ in range(2)]
    return model, docs, evaluate.evaluate(model, docs, WINDOW, fixed_lambda=0.5)


def _decode_nll(model, doc, schedule):
    """Per-token loss of one document, token by token: windows reset attention, the TTT state carries on."""
    step = nnx.jit(lambda model, *args: model.step(*args, schedule))
    state, nll, logp, lams = model.init_state(1, schedule), [], None, []
    for start in range(0, len(doc), WINDOW):
        cache = KVCache.init(BASE, 1)
        for offset in range(WINDOW):
            token = int(doc[start + offset])
            if logp is not None:
                nll.append(-logp[token])
            logits, cache, state = step(model, jnp.asarray([token]), jnp.asarray([offset]), cache, state)
            logp = np.asarray(jax.nn.log_softmax(logits[0]))
            if (start + offset) % CONFIG.gate.chunk == 0:
                lams.append(float(state.lam[0]))
    return np.asarray(nll), np.asarray(lams)


def test_table_is_recomputed_by_the_decode_path(fixture):
    model, docs, table = fixture
    rows = table["methods"]
    assert set(rows) == {"SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4", "FIXED_0.5", "RANDOM", "THRESHOLD", "LEARNED", "ORACLE"}
    assert table["tokens"] == 2 * 63
    ce, lams = {}, {}
    for name, schedule in [("SKIP", Schedule("skip")), ("UPDATE_1", Schedule("update")), ("LEARNED", Schedule("learned"))]:
        runs = [_decode_nll(model, doc, schedule) for doc in docs]
        ce[name] = float(np.concatenate([nll for nll, _ in runs]).mean())
        lams[name] = np.concatenate([lam for _, lam in runs])
        assert abs(rows[name]["ce"] - ce[name]) <= 1e-5, name
        assert math.isclose(rows[name]["perplexity"], math.exp(rows[name]["ce"]))
    assert ce["UPDATE_1"] != ce["SKIP"]  # the fixture's TTT layer changes predictions
    updated = lams["LEARNED"] >= CONFIG.gate.threshold
    assert 0 < updated.mean() < 1  # the gate skips some chunks and updates others
    assert rows["LEARNED"]["updated"] == pytest.approx(updated.mean())
    assert table["rate"] == pytest.approx(updated.mean())
    # FLOPs are counted per updated chunk, the same for every single-step method.
    assert rows["LEARNED"]["flops_vs_update_1"] == pytest.approx(updated.mean())
    assert rows["SKIP"]["flops_vs_update_1"] == 0 and rows["UPDATE_1"]["flops_vs_update_1"] == 1
    assert rows["UPDATE_2"]["flops_vs_update_1"] > 1
    gain = (ce["SKIP"] - ce["LEARNED"]) / (ce["SKIP"] - ce["UPDATE_1"])
    assert rows["LEARNED"]["gain_vs_update_1"] == pytest.approx(gain, abs=1e-4)
    oracle_gain = (ce["SKIP"] - ce["LEARNED"]) / (ce["SKIP"] - rows["ORACLE"]["ce"])
    assert rows["LEARNED"]["gain_vs_oracle"] == pytest.approx(oracle_gain, abs=1e-4)


def test_learned_gate_under_a_budget_is_set_on_calibration_documents(fixture):
    model, docs, _ = fixture
    calibration = [np.random.default_rng(1).integers(0, 512, 64).astype(np.int32)]
    table = evaluate.evaluate(model, docs, WINDOW, rate=0.5, calibration=calibration)
    rows, budget = table["methods"], table["budget"]
    assert {"LEARNED_BUDGET", "RANDOM_LEARNED"} <= set(rows) and budget["calibration_documents"] == 1
    # The controller starts at the median of the learned gate's lam on the calibration document.
    _, lams = _decode_nll(model, calibration[0], Schedule("learned"))
    assert budget["initial_threshold"] == pytest.approx(np.quantile(lams, 0.5), abs=1e-6)
    assert budget["gain"] in evaluate.CONTROLLER_GAINS
    # Its row is that schedule on the held-out documents, recomputed token by token.
    schedule = Schedule("learned_budget", rate=0.5, initial_threshold=budget["initial_threshold"], gain=budget["gain"])
    runs = [_decode_nll(model, doc, schedule) for doc in docs]
    assert rows["LEARNED_BUDGET"]["ce"] == pytest.approx(float(np.concatenate([nll for nll, _ in runs]).mean()), abs=1e-5)
    assert rows["LEARNED_BUDGET"]["updated"] == pytest.approx(np.mean(np.concatenate([lam for _, lam in runs]) > 0))
    assert "LEARNED_BUDGET: threshold on lam starting at" in evaluate.markdown(table)


def test_oracle_updates_the_chunks_with_the_largest_own_gain(fixture):
    model, docs, table = fixture
    rate = table["rate"]
    C = CONFIG.gate.chunk
    for doc in docs:
        skip, _ = _decode_nll(model, doc, Schedule("skip"))
        update, _ = _decode_nll(model, doc, Schedule("update"))
        per_chunk = lambda nll: np.concatenate([[0.0], nll]).reshape(-1, C).mean(-1)
        gain = per_chunk(skip) - per_chunk(update)
        chosen = evaluate.oracle_lambda(model, doc, WINDOW, rate) > 0
        k = int(round(rate * len(gain)))
        assert chosen.sum() == k
        assert gain[chosen].min(initial=np.inf) >= gain[~chosen].max(initial=-np.inf) - 1e-6


def test_markdown_and_plot(fixture, tmp_path):
    *_, table = fixture
    out = evaluate.write(table, tmp_path)
    text = (out / "eval.md").read_text()
    assert "| LEARNED |" in text and "| ORACLE |" in text
    assert (out / "ce_vs_compute.png").read_bytes()[:4] == b"\x89PNG"


def test_line_completion_targets_and_scores(fixture, code_tokenizer):
    from ponder.train import line_completion as lc

    model, *_ = fixture
    text = "".join(f"x{i} = {i}\n" for i in range(40))
    tokens = np.asarray(code_tokenizer.encode_document(text))
    tokens = tokens[tokens < BASE.vocab_size][:64]  # the fixture's vocabulary is 512 ids
    targets = lc.target_lines(code_tokenizer, tokens, every=10, start=20)
    assert targets and targets[0] >= 20 and all(code_tokenizer.decode_bytes([int(tokens[t - 1])]).endswith(b"\n") for t in targets)
    assert all(b - a >= 10 for a, b in zip(targets, targets[1:]))
    # Indented lines count too: the target starts after the indentation, whatever token holds it.
    nested = np.asarray(code_tokenizer.encode_document("class A:\n    def f(self):\n        return 1\n\n    x = 2\n"))
    found = lc.target_lines(code_tokenizer, nested, 1, 1)
    assert all(not code_tokenizer.decode(nested[:t]).rsplit("\n", 1)[1].strip() for t in found)  # only blanks before
    lines = [code_tokenizer.decode(nested[t:]).split("\n")[0].strip() for t in found]
    assert lines == ["def f(self):", "return 1", "x = 2"]  # the lines after the first, indented or not
    # The context and the generated tokens fit the window, and the context starts on a chunk boundary.
    assert lc.attention_start(100, window=64, max_new_tokens=8, chunk=16) == 48  # 100 + 8 - 64 = 44, up to 48
    assert lc.attention_start(40, window=64, max_new_tokens=8, chunk=16) == 0
    C = CONFIG.gate.chunk
    at_start = [t for t in targets if lc.attention_start(t, WINDOW, 4, C) == 0]
    later = [t for t in targets if lc.attention_start(t, WINDOW, 4, C) > 0]
    assert at_start and later
    fresh = lc.complete_lines(model, code_tokenizer, tokens, targets, WINDOW, persistent=False, max_new_tokens=4)
    kept = lc.complete_lines(model, code_tokenizer, tokens, targets, WINDOW, persistent=True, max_new_tokens=4)
    for target, a, b in zip(targets, fresh, kept):
        assert a.expected == b.expected == code_tokenizer.decode(tokens[target:]).split("\n")[0]
        if target in at_start:  # the window starts at the file's start: nothing to carry
            assert a.generated == b.generated and a.nll == b.nll
    assert lc.summarize([lc.LineResult("a = 1", "a = 1 ", 1.0), lc.LineResult("abcd", "abxy", 2.0)]) == {
        "lines": 2, "exact_match": 0.5, "edit_similarity": 0.75, "line_ce": 1.5
    }
    assert all(np.isfinite(r.nll) and r.nll > 0 for r in fresh + kept)
    # ponder eval's table: the lines past the first window, read both ways.
    past_first = lc.target_lines(code_tokenizer, tokens, 10, WINDOW)[:3]
    table = lc.compare_variants(model, code_tokenizer, [tokens], WINDOW, 10, 3,
                                {"persistent": (True, Schedule()), "fresh": (False, Schedule())}, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens 48"):
        lc.complete_lines(model, code_tokenizer, tokens, past_first, WINDOW, persistent=True)
    assert len(past_first) >= 2 and past_first[0] >= WINDOW
    assert table["persistent"]["lines"] == table["fresh"]["lines"] == table["persistent_minus_fresh"]["lines"] == len(past_first)
    cut = tokens[: targets[-1] + 2]  # the file ends inside the last target line, with no newline
    (last,) = lc.complete_lines(model, code_tokenizer, cut, targets[-1:], WINDOW, persistent=True, max_new_tokens=4)
    assert last.expected == code_tokenizer.decode(cut[targets[-1]:]) and np.isfinite(last.nll)


def test_line_completion_compare_is_a_paired_difference_with_an_interval():
    from ponder.train import line_completion as lc

    hit, miss = lc.LineResult("x = 1", "x = 1", nll=0.5), lc.LineResult("x = 1", "y", nll=2.0)
    persistent, fresh = [hit, hit, miss, hit] * 10, [miss, hit, miss, miss] * 10
    got = lc.compare(persistent, fresh)
    em = got["exact_match"]
    assert got["lines"] == 40 and em["difference"] == pytest.approx(0.5)
    assert got["line_ce"]["difference"] == pytest.approx(-0.75)  # (-1.5 + 0 + 0 - 1.5) / 4: the line got cheaper
    assert got["line_ce"]["ci95"][1] < 0
    assert 0.2 < em["ci95"][0] < 0.5 < em["ci95"][1] < 0.8
    same = lc.compare([hit, miss], [hit, miss])
    assert same["exact_match"] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same lines"):
        lc.compare([hit], [hit, miss])


@pytest.mark.parametrize("method", ["UPDATE_1", "LEARNED"])
def test_windowed_training_rows_equal_evaluation_window_by_window(fixture, method):
    """Stage 2 with ``window``: a packed row of two documents of two windows each gives, token for
    token, the losses that evaluation computes window by window with the TTT state carried across."""
    model, docs, _ = fixture
    schedule = evaluate.methods(0.5, 0.5)[method]
    row = np.concatenate(docs)[None]  # [1, 128]: two documents, each two windows of 32
    batch = Batch(row, np.concatenate([np.arange(64)] * 2)[None].astype(np.int32),
                  np.repeat([0, 1], 64)[None].astype(np.int32), np.ones_like(row, bool))
    stage = TTTStage(seq_len=128, chunk=16, schedule=schedule, window=WINDOW)
    positions, attention = stage.attention(batch)
    assert positions.max() == WINDOW - 1 and len(np.unique(attention)) == 4
    out = model(jnp.asarray(row), jnp.asarray(positions), schedule, segment_ids=jnp.asarray(batch.segment_ids),
                attention_ids=jnp.asarray(attention))
    logp = np.asarray(jax.nn.log_softmax(out.logits[0], axis=-1))
    for d, doc in enumerate(docs):
        trained = -logp[64 * d + np.arange(63), doc[1:]]
        evaluated = run_document(model, doc, schedule, WINDOW).nll
        np.testing.assert_allclose(trained, evaluated, atol=2e-4)
    _, metrics = stage.loss(model, batch)
    both = np.concatenate([run_document(model, doc, schedule, WINDOW).nll for doc in docs])
    assert float(metrics["ce"]) == pytest.approx(both.mean(), abs=1e-5)
