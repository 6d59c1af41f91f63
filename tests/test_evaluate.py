"""ponder eval: the table's numbers recomputed independently (the token-by-token decode path, whole-document
runs for the greedy oracle), the bootstrap against RANDOM, the files and the command line."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.document import DocumentRun, run_document
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
RATES = (0.5,)  # one rate keeps the fixture to one compilation per schedule; the curve's layout is tested apart


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
    return model, docs, evaluate.evaluate(model, docs, WINDOW, fixed_lambda=0.5, rates=RATES, random_seeds=2)


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


def _expected_rows(model):
    unbudgeted = [(name, None) for name in ("SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4", "FIXED_0.5", "LEARNED")]
    methods = ["RANDOM", "THRESHOLD", "LEARNED_BUDGET", "RANDOM_LEARNED", "ORACLE", "GREEDY_ORACLE"]
    if getattr(model, "policy", None) is not None:
        methods.append("POLICY")
    return set(unbudgeted) | {(name, rate) for name in methods for rate in RATES}


def test_table_is_recomputed_by_the_decode_path(fixture):
    model, docs, table = fixture
    row = functools.partial(evaluate.find_row, table)
    assert {(r["method"], r["rate"]) for r in table["methods"]} == _expected_rows(model)
    assert len(table["methods"]) == len(_expected_rows(model)) and table["rates"] == list(RATES)
    assert table["tokens"] == 2 * 63
    ce, lams = {}, {}
    for name, schedule in [("SKIP", Schedule("skip")), ("UPDATE_1", Schedule("update")), ("LEARNED", Schedule("learned"))]:
        runs = [_decode_nll(model, doc, schedule) for doc in docs]
        ce[name] = float(np.concatenate([nll for nll, _ in runs]).mean())
        lams[name] = np.concatenate([lam for _, lam in runs])
        assert abs(row(name)["ce"] - ce[name]) <= 1e-5, name
        assert math.isclose(row(name)["perplexity"], math.exp(row(name)["ce"]))
    assert ce["UPDATE_1"] != ce["SKIP"]  # the fixture's TTT layer changes predictions
    updated = lams["LEARNED"] >= CONFIG.gate.threshold
    assert row("LEARNED")["updated"] == pytest.approx(updated.mean())
    # FLOPs are counted per updated chunk, the same for every single-step method.
    assert row("LEARNED")["flops_vs_update_1"] == pytest.approx(updated.mean())
    assert row("SKIP")["flops_vs_update_1"] == 0 and row("UPDATE_1")["flops_vs_update_1"] == 1
    assert row("UPDATE_2")["flops_vs_update_1"] > 1
    gain = (ce["SKIP"] - ce["LEARNED"]) / (ce["SKIP"] - ce["UPDATE_1"])
    assert row("LEARNED")["gain_vs_update_1"] == pytest.approx(gain, abs=1e-4)
    assert row("LEARNED")["gain_vs_oracle"] is None and row("LEARNED")["minus_random"] is None
    for rate in RATES:  # a budgeted row's shares are against ORACLE at its own rate
        greedy, oracle = row("GREEDY_ORACLE", rate), row("ORACLE", rate)
        share = (ce["SKIP"] - greedy["ce"]) / (ce["SKIP"] - oracle["ce"])
        assert greedy["gain_vs_oracle"] == pytest.approx(share, abs=1e-4) and oracle["gain_vs_oracle"] == 1
        assert oracle["updated"] == rate and oracle["flops_vs_update_1"] == pytest.approx(rate)


def test_budgeted_rows_report_their_realised_rate_and_random_is_a_mean_over_seeds(fixture):
    model, docs, table = fixture
    rate = RATES[0]
    # LEARNED_BUDGET's row is its schedule from the rate alone, recomputed token by token.
    runs = [_decode_nll(model, doc, Schedule("learned_budget", rate=rate)) for doc in docs]
    row = evaluate.find_row(table, "LEARNED_BUDGET", rate)
    assert row["ce"] == pytest.approx(float(np.concatenate([nll for nll, _ in runs]).mean()), abs=1e-5)
    assert row["updated"] == pytest.approx(np.mean(np.concatenate([lam for _, lam in runs]) > 0))
    # RANDOM: each seed its own coins; the row is their mean, and the reference of every row at that rate.
    seeds = [[run_document(model, doc, Schedule("random", rate=rate, seed=s), WINDOW) for doc in docs] for s in range(2)]
    row = evaluate.find_row(table, "RANDOM", rate)
    assert row["seed_ce"] == pytest.approx([evaluate.cross_entropy(rs) for rs in seeds], abs=1e-6)
    assert row["ce"] == pytest.approx(np.mean(row["seed_ce"]), abs=1e-6)
    assert row["updated"] == pytest.approx(np.mean([evaluate.update_rate(rs) for rs in seeds]))
    assert row["minus_random"] == {"difference": 0.0, "ci95": [0.0, 0.0]} and not row["beats_random"]
    oracle = evaluate.find_row(table, "ORACLE", rate)
    assert oracle["minus_random"]["difference"] == pytest.approx(oracle["ce"] - row["ce"], abs=1e-5)
    assert oracle["beats_random"] == (oracle["minus_random"]["ci95"][1] < 0)


def test_oracle_updates_the_chunks_with_the_largest_own_gain(fixture):
    model, docs, _ = fixture
    C = CONFIG.gate.chunk
    for doc in docs:
        skip, _ = _decode_nll(model, doc, Schedule("skip"))
        update, _ = _decode_nll(model, doc, Schedule("update"))
        per_chunk = lambda nll: np.concatenate([[0.0], nll]).reshape(-1, C).mean(-1)
        gain = per_chunk(skip) - per_chunk(update)
        measured = evaluate.isolated_gain(run_document(model, doc, Schedule("skip"), WINDOW),
                                          run_document(model, doc, Schedule("update"), WINDOW), C)
        np.testing.assert_allclose(measured, gain, atol=1e-5)
        for rate in (0.25, 0.5, 0.75):
            chosen = evaluate.oracle_lambda(gain, rate) > 0
            assert chosen.sum() == int(round(rate * len(gain)))
            assert gain[chosen].min(initial=np.inf) >= gain[~chosen].max(initial=-np.inf)


@pytest.fixture(scope="module")
def long_document():
    return np.random.default_rng(2).integers(0, 512, 4 * WINDOW).astype(np.int32)  # 8 chunks over 4 windows


def test_greedy_oracle_gain_is_measured_from_the_state_its_choices_left(fixture, long_document):
    """Each gain of a greedy walk, recomputed from whole-document runs: the choices made so far, then
    chunk c updated or skipped, then the lookahead updated; the loss of the predictions made in chunks
    c..c+lookahead (the next chunk's first token included; across a window boundary too)."""
    model, *_ = fixture
    doc, C = long_document, CONFIG.gate.chunk
    oracle = evaluate.GreedyOracle(model, doc, WINDOW, lookahead=1)
    chosen, gains = oracle.walk(0.0)
    assert 0 < chosen.sum() < len(chosen) and np.array_equal(chosen, gains >= 0.0)
    for c in range(oracle.n_chunks):
        loss = []
        for branch in (1.0, 0.0):
            lam = np.concatenate([chosen[:c], [branch], np.ones(oracle.n_chunks - c - 1)]).astype(np.float32)
            nll = run_document(model, doc, Schedule("skip"), WINDOW, lam).nll  # nll[p]: token p + 1, predicted at p
            loss.append(nll[c * C : (c + 2) * C].mean())
        assert gains[c] == pytest.approx(loss[1] - loss[0], abs=1e-5), c
    # A walk that reuses the previous one's states until their choices part equals a walk from scratch.
    again, _ = oracle.walk(0.005)
    fresh, fresh_gains = evaluate.GreedyOracle(model, doc, WINDOW, lookahead=1).walk(0.005)
    assert np.array_equal(again, fresh) and not np.array_equal(again, chosen)
    np.testing.assert_allclose(oracle.walk(0.005)[1], fresh_gains, atol=1e-6)


def test_greedy_oracle_holds_the_rate_and_beats_skip(fixture, long_document):
    model, *_ = fixture
    doc = long_document
    oracle = evaluate.GreedyOracle(model, doc, WINDOW)
    skip = run_document(model, doc, Schedule("skip"), WINDOW).nll.mean()
    for rate in (0.25, 0.5, 0.75):
        lam = oracle.choose(rate)
        assert set(np.unique(lam)) <= {0.0, 1.0}
        assert abs(lam.mean() - rate) <= 1 / oracle.n_chunks
        assert run_document(model, doc, Schedule("skip"), WINDOW, lam).nll.mean() <= skip
    with pytest.raises(ValueError, match="whole chunks of 16"):
        evaluate.GreedyOracle(model, doc[:40], WINDOW)


def test_paired_difference_is_token_weighted_and_paired_over_documents():
    tokens = np.asarray([100, 300, 50, 200, 150, 80, 120, 60])
    loss = np.random.default_rng(0).uniform(1.0, 4.0, len(tokens)) * tokens  # documents of very different CE
    same = evaluate.paired_difference(loss, loss, tokens)
    assert same == {"difference": 0.0, "ci95": [0.0, 0.0]}
    lower = evaluate.paired_difference(loss - 0.1 * tokens, loss, tokens)
    assert lower["difference"] == pytest.approx(-0.1) and lower["ci95"] == pytest.approx([-0.1, -0.1])
    alone = evaluate.paired_difference(loss[:1] - 0.1 * tokens[:1], loss[:1], tokens[:1])  # no spread to measure
    assert alone["difference"] == pytest.approx(-0.1) and np.isnan(alone["ci95"]).all()
    # About 0.1 lower on every document: the interval is about the difference, not the spread between
    # documents (unpaired, the CE per document varies by nats and the interval would hold 0).
    noise = np.random.default_rng(1).normal(0.0, 0.01, len(tokens)) * tokens
    got = evaluate.paired_difference(loss - 0.1 * tokens + noise, loss, tokens)
    assert got["difference"] == pytest.approx((-0.1 * tokens + noise).sum() / tokens.sum())
    low, high = got["ci95"]
    assert -0.13 < low < got["difference"] < high < -0.07


def _run(nll, updated, flops_per_chunk=1.0):
    return DocumentRun(np.asarray(nll), np.asarray(updated, np.float32), np.asarray(updated, bool),
                       flops_per_chunk * float(np.sum(updated)))


def test_markdown_json_and_plot_have_a_row_per_method_and_rate(fixture, tmp_path):
    """The layout of a three-rate curve, from runs made up by hand: 2 documents of 4 chunks, CE falling with
    the chunks updated; then the fixture's table, whose rows ``write`` keeps one by one."""
    model, _, fixture_table = fixture
    rng = np.random.default_rng(0)
    base = [rng.uniform(2.0, 3.0, 63) for _ in range(2)]
    made_up = lambda share, updated, flops=1.0: [_run(b - 0.1 * share, updated, flops) for b in base]
    runs = {("SKIP", None): made_up(0.0, [0, 0, 0, 0]), ("UPDATE_1", None): made_up(1.0, [1, 1, 1, 1]),
            ("UPDATE_2", None): made_up(1.1, [1, 1, 1, 1], 2.0), ("LEARNED", None): made_up(0.8, [1, 0, 1, 1])}
    for rate, updated in ((0.25, [1, 0, 0, 0]), (0.5, [1, 0, 1, 0]), (0.75, [1, 1, 1, 0])):
        for i, name in enumerate(("RANDOM", "LEARNED_BUDGET", "ORACLE", "GREEDY_ORACLE")):
            runs[name, rate] = made_up(rate * (1 + 0.2 * i), updated)
    table = evaluate.summarize(runs)
    row = functools.partial(evaluate.find_row, table)
    assert table["rates"] == [0.25, 0.5, 0.75] and len(table["methods"]) == len(runs) == 16
    assert row("UPDATE_2")["flops_vs_update_1"] == 2.0 and row("UPDATE_2")["gain_vs_update_1"] == pytest.approx(1.1)
    assert row("ORACLE", 0.5)["minus_random"]["difference"] == pytest.approx(-0.1 * 0.5 * 0.4, abs=1e-6)
    assert row("ORACLE", 0.5)["beats_random"] and row("LEARNED_BUDGET", 0.25)["updated"] == 0.25
    assert row("GREEDY_ORACLE", 0.75)["gain_vs_oracle"] == pytest.approx(1.6 / 1.4)
    assert [(r["method"], r["rate"]) for r in table["methods"]][3:7] == [
        ("LEARNED", None), ("RANDOM", 0.25), ("RANDOM", 0.5), ("RANDOM", 0.75)]  # unbudgeted first, then by method
    for table, expected in ((table, set(runs)), (fixture_table, _expected_rows(model))):
        out = evaluate.write(table, tmp_path / str(len(expected)))
        rows = json.loads((out / "eval.json").read_text())["methods"]
        assert len(rows) == len(expected) and {(r["method"], r["rate"]) for r in rows} == expected
        lines = [line for line in (out / "eval.md").read_text().splitlines() if line.startswith("| ")][1:]
        assert len(lines) == len(rows)
        for r in rows:
            rate = "—" if r["rate"] is None else f"{r['rate']:g}"
            assert sum(line.startswith(f"| {r['method']} | {rate} |") for line in lines) == 1
        assert (out / "ce_vs_compute.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_parses_rates():
    from ponder import cli

    parse = lambda *args: cli.build_parser().parse_args(["eval", "--corpus", "c", "--out", "o", *args])
    args = parse()
    assert args.rates is None and args.rate is None and args.random_seeds == 3 and args.lookahead == 1
    assert parse("--rates", "0.1,0.5, 0.9").rates == (0.1, 0.5, 0.9) and parse("--rate", "0.3").rate == 0.3
    for bad in (["--rates", "0.5,1"], ["--rates", "half"], ["--rates", "0.5", "--rate", "0.5"]):
        with pytest.raises(SystemExit):
            parse(*bad)


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
    schedule = evaluate.unbudgeted(0.5)[method]
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
