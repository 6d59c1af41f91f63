"""The engine on a small random TTT model whose fast weights and gate are live.

Exactness is checked against the model's own offline generation and against
cold starts: session reuse (extend, edit, long documents past the window,
ingest, reset), other sessions' traffic and eviction never change a
session's tokens. Then the serving behaviour: cancellation, superseding,
the bounded queue, and no compilation after warm-up.
"""

import dataclasses
import queue
import threading
import time

import numpy as np
import pytest
from flax import nnx
from test_ttt_lm import _trained_looking, _with_random_gate

from ponder.model.config import GPTConfig
from ponder.model.gating import GateConfig, Schedule
from ponder.model.generate import SamplingParams, stream_ttt_tokens
from ponder.model.ttt import TTTConfig
from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM
from ponder.server.engine import Engine, EngineConfig
from ponder.server.runner import HEAD_ROWS
from ponder.server.types import DoneEvent, Job, QueueFull, Sampling, TokenEvent

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=512, n_embd=64, n_layer=2, n_head=2)
CONFIG = TTTLMConfig(base=BASE, ttt=TTTConfig(width=64, n_head=4), gate=GateConfig(chunk=16, threshold=0.3), eot_id=0,
                     policy_hidden=16)  # test_ttt_lm's _with_random_gate perturbs an update policy too
MAX_NEW = 64


@pytest.fixture(scope="module")
def model():
    return _with_random_gate(_trained_looking(TTTTransformerLM(CONFIG, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, EngineConfig(slots=3, max_new_tokens=MAX_NEW, queue_size=4, snapshots=4))
    engine.start()
    yield engine
    engine.stop(drain_s=1)


def _doc(n, seed=0):
    """A document of n tokens: end-of-document, then random non-zero ids."""
    return [0, *np.random.default_rng(seed).integers(1, 512, n - 1).tolist()]


# A guard against a hang, not a speed limit: the first step of a new batch shape compiles, which takes
# minutes on a loaded 2-core machine (a 60 s guard failed under CI with two workers).
EVENT_TIMEOUT_S = 300


def _run(engine, tokens, session="s", max_new=8, key="", **kw):
    """Submits a job and collects ``(tokens, lambdas, done_event)``."""
    job = Job(key, session, kw.pop("document_id", None), list(tokens), max_new, **kw)
    engine.submit(job)
    out, lambdas = [], []
    while True:
        event = job.next_event(timeout=EVENT_TIMEOUT_S)
        if isinstance(event, DoneEvent):
            return out, lambdas, event
        assert isinstance(event, TokenEvent), event
        out += event.token_ids
        lambdas += event.chunk_lambda


def test_greedy_and_sampled_tokens_equal_offline_generation(engine, model):
    for n, sampling in ((5, Sampling()), (40, Sampling(temperature=0.8, top_p=0.9, seed=3)), (64, Sampling())):
        prompt = _doc(n, seed=n)
        params = SamplingParams(max_new_tokens=12, temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
        want = [t for piece in stream_ttt_tokens(model, prompt, params, eot_id=0) for t in piece]
        got, _, done = _run(engine, prompt, session=f"offline-{n}", max_new=12, sampling=sampling)
        assert got == want
        assert done.finish_reason in ("length", "stop") and done.usage.prompt_tokens == n


PENALISED = [
    Sampling(repeat_penalty=1.6, repeat_last_n=24, presence_penalty=0.5, frequency_penalty=0.4),
    Sampling(temperature=0.9, seed=4, min_p=0.05, top_p=0.9, repeat_penalty=1.4, repeat_last_n=-1,
             frequency_penalty=0.8, penalty_scope="generated", temperature_last=True),
    Sampling(repeat_penalty=1.3, repeat_last_n=200, presence_penalty=1.5),
]


def test_penalties_equal_offline_generation(engine, model):
    """Each slot's ring of recent tokens (the prompt's, then each generated one) and controls, with the slots
    busy together, against offline generation; the penalties change the tokens."""
    rng = np.random.default_rng(12)
    prompts = [[0, *rng.integers(1, 24, n - 1).tolist()] for n in (70, 33, 150)]  # a small alphabet: tokens repeat
    jobs = [Job("", f"penalised-{i}", None, prompt, 24, sampling=s) for i, (prompt, s) in enumerate(zip(prompts, PENALISED))]
    for job in jobs:
        engine.submit(job)
    for job, prompt, s in zip(jobs, prompts, PENALISED):
        got = []
        while not isinstance(event := job.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
            got += event.token_ids
        params = SamplingParams(max_new_tokens=24, **dataclasses.asdict(s))
        assert got == [t for piece in stream_ttt_tokens(model, prompt, params, eot_id=0) for t in piece], s
        plain = SamplingParams(max_new_tokens=24, **dataclasses.asdict(dataclasses.replace(s, repeat_last_n=0)))
        assert got != [t for piece in stream_ttt_tokens(model, prompt, plain, eot_id=0) for t in piece], s


def test_session_reuse_equals_cold_start(engine):
    """Extend, edit inside the history, shrink, grow past the window (W=512), ingest: each equals a cold start."""
    doc = _doc(900, seed=1)
    edited = doc[:150] + [7, 8, 9] + doc[153:]
    steps = [doc[:40], doc[:41], doc[:100], doc[:230], edited[:240], edited[:200], doc[:300], doc[:520], doc[:700], doc[:900]]
    lambdas_seen = []
    for i, prompt in enumerate(steps):
        warm, warm_lam, warm_done = _run(engine, prompt, session="reuse")
        cold, cold_lam, cold_done = _run(engine, prompt, session=f"cold-{i}")
        assert warm == cold, f"step {i} ({len(prompt)} tokens)"
        lambdas_seen += cold_lam
        assert cold_done.usage.cached_tokens == 0
        if i in (1, 2, 3, 7, 8, 9):  # the prompt extends the history: only the new tokens run
            assert warm_done.usage.cached_tokens >= len(steps[i - 1]) - 2 * CONFIG.gate.chunk
    assert 0.0 in lambdas_seen and max(lambdas_seen) > 0  # the gate skips some chunks: fast weights really differ per chunk


def test_ingest_then_complete_equals_cold_and_generated_tokens_are_not_committed(engine):
    doc = _doc(200, seed=2)
    _, _, done = _run(engine, doc, session="ingest", max_new=0)
    assert done.usage.generated_tokens == 0
    session = engine.sessions.get("", "ingest")
    assert session.tokens == doc[: 200 // 16 * 16]
    warm, _, _ = _run(engine, doc, session="ingest", max_new=10)
    assert engine.sessions.get("", "ingest").tokens == doc[: len(session.tokens)]  # nothing generated was committed
    cold, _, _ = _run(engine, doc, session="ingest-cold", max_new=10)
    assert warm == cold


def test_fill_in_the_middle_suffix_is_scratch(engine):
    prefix, suffix = _doc(70, seed=3), _doc(50, seed=4)[1:]
    prompt = prefix + [5] + suffix + [6]
    warm, _, _ = _run(engine, prompt, session="fim", commit_limit=len(prefix))
    assert engine.sessions.get("", "fim").tokens == prefix[:64]
    cold, _, _ = _run(engine, prompt, session="fim-cold", commit_limit=len(prefix))
    assert warm == cold


def test_infill_scratch_past_a_block_keeps_the_window_and_equals_a_cold_start(engine):
    """An infill whose suffix crosses a window block (256 tokens; W=512) runs it in the committed end's window:
    the cursor moved three tokens, the next request re-reads nothing to move the window back (it re-read 240
    tokens before), and each answer is a cold start's. Past the block the context no longer holds the start."""
    doc, suffix = _doc(400, seed=21), _doc(40, seed=22)[1:]
    for i, end in enumerate((250, 253, 300)):
        prompt = doc[:end] + [5] + suffix + [6]
        warm, _, warm_done = _run(engine, prompt, session="cursor", commit_limit=end)
        cold, _, cold_done = _run(engine, prompt, session=f"cursor-cold-{i}", commit_limit=end)
        assert warm == cold, end
        assert cold_done.usage.truncated == (end >= 256) and cold_done.usage.computed_tokens == len(prompt)
        if end == 253:
            assert warm_done.usage.cached_tokens == 240 and warm_done.usage.reencoded_tokens == 0
    assert _run(engine, _doc(100, seed=23), session="short")[2].usage.truncated is False


def test_reset_and_document_change_start_fresh(engine):
    a, b = _doc(100, seed=5), _doc(100, seed=6)
    _run(engine, a, session="docs", document_id="a.py")
    got, _, done = _run(engine, b, session="docs", document_id="b.py")
    assert done.usage.cached_tokens == 0
    assert got == _run(engine, b, session="docs-cold")[0]
    assert engine.reset_session("", "docs") and not engine.reset_session("", "docs")
    assert _run(engine, b, session="docs")[2].usage.cached_tokens == 0
    # Sessions of one key are invisible to another.
    _run(engine, a, session="shared", key="k1")
    assert _run(engine, a, session="shared", key="k2")[2].usage.cached_tokens == 0


def test_concurrent_sessions_do_not_change_each_other(engine):
    prompts = {f"c{i}": _doc(30 + 37 * i, seed=10 + i) for i in range(5)}
    want = {name: _run(engine, p, session=name + "-alone", max_new=20)[0] for name, p in prompts.items()}
    results = {}

    def run(name):
        results[name] = _run(engine, prompts[name], session=name, max_new=20)[0]

    threads = [threading.Thread(target=run, args=(name,)) for name in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == want


def test_a_lone_stream_joined_and_left_mid_generation_is_exact(engine):
    # Slot 0 steps on its own one-row state while it runs alone: it must carry over exactly when
    # another job joins (its state goes back among the others) and when that one ends.
    # Sampled: greedy decoding of this random model repeats one token, which a stale state repeats too.
    first, second, sampling = _doc(30, seed=31), _doc(30, seed=32), Sampling(temperature=1.0, seed=5)
    want = [_run(engine, first, session="lone-alone", max_new=MAX_NEW, sampling=sampling)[0],
            _run(engine, second, session="joiner-alone", max_new=16, sampling=sampling)[0]]
    jobs = [Job("", "lone", None, list(first), MAX_NEW, sampling), Job("", "joiner", None, list(second), 16, sampling)]
    got = [[], []]
    engine.submit(jobs[0])
    while len(got[0]) < 3:  # two decode steps alone (the first token comes from the prefill)
        got[0] += jobs[0].next_event(timeout=EVENT_TIMEOUT_S).token_ids
    engine.submit(jobs[1])
    for tokens, job in zip(got, jobs):
        while not isinstance(event := job.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
            tokens += event.token_ids
    assert got == want


def test_head_rows_step_on_their_own_state_and_merge_back_exactly(model):
    """With 6 slots, slot 0 alone steps on a state of its own (``runner.HEAD_ROWS``); jobs joining bring it
    back among all the slots, and jobs ending take it out again. Every job's tokens equal its offline generation. UPDATE_1, not the thresholded gate: a score that lands
    within rounding of the threshold would flip between batch shapes and fork a sampled text."""
    engine = Engine(model, EngineConfig(slots=6, max_new_tokens=MAX_NEW, queue_size=8, schedule=Schedule("update")))
    engine.start()
    try:
        assert engine.runner.head_rows == HEAD_ROWS
        sampling = Sampling(temperature=1.0, seed=7)
        prompts = [_doc(20 + 7 * i, seed=40 + i) for i in range(6)]
        lengths = [MAX_NEW, 40, 24, 12, 20, 8]  # slot 4's and 5's jobs end first, then the 4-row state takes over
        params = lambda n: SamplingParams(max_new_tokens=n, temperature=1.0, seed=7)
        want = [[t for piece in stream_ttt_tokens(model, p, params(n), eot_id=0, schedule=Schedule("update")) for t in piece]
                for p, n in zip(prompts, lengths)]
        jobs = [Job("", f"head-{i}", None, list(p), n, sampling) for i, (p, n) in enumerate(zip(prompts, lengths))]
        got = [[] for _ in jobs]
        engine.submit(jobs[0])
        while len(got[0]) < 3:  # slot 0 alone
            got[0] += jobs[0].next_event(timeout=EVENT_TIMEOUT_S).token_ids
        for job in jobs[1:3]:  # slots 1 and 2: every slot steps together
            engine.submit(job)
        while len(got[1]) < 3:
            got[1] += jobs[1].next_event(timeout=EVENT_TIMEOUT_S).token_ids
        for job in jobs[3:]:  # slots 3 to 5, until 5, 3 and 4 end (then 2 and 1, and slot 0 is alone again)
            engine.submit(job)
        for tokens, job in zip(got, jobs):
            while not isinstance(event := job.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
                tokens += event.token_ids
        assert got == want
    finally:
        engine.stop(drain_s=1)


def test_eviction_rebuilds_transparently(model):
    engine = Engine(model, EngineConfig(slots=2, max_new_tokens=MAX_NEW, session_memory_mb=0.5))
    engine.start(warmup=False)
    try:
        doc = _doc(120, seed=20)
        first = _run(engine, doc, session="e1")[0]
        _run(engine, _doc(120, seed=21), session="e2")  # over the cap: e1 goes
        assert engine.sessions.get("", "e1") is None
        assert engine.metrics.sessions_evicted._value.get() >= 1
        again, _, done = _run(engine, doc, session="e1")
        assert again == first and done.usage.cached_tokens == 0
        _run(engine, doc + _doc(40, seed=22)[1:], session="e1")  # extends it
        kept = sum(engine.sessions.measure(s) for s in engine.sessions)  # the running count matches the sessions kept
        assert engine.metrics.session_bytes._value.get() == kept > 0
    finally:
        engine.stop(drain_s=1)


def test_cancel_frees_the_slot_within_one_step(engine):
    job = Job("", "cancel", None, _doc(20, seed=30), MAX_NEW)
    engine.submit(job)
    first = job.next_event(timeout=EVENT_TIMEOUT_S)
    assert isinstance(first, TokenEvent)
    job.cancel()
    seen = 0
    while True:
        event = job.next_event(timeout=EVENT_TIMEOUT_S)
        if isinstance(event, DoneEvent):
            break
        seen += len(event.token_ids)
    assert event.finish_reason == "cancelled"
    assert seen <= 1  # at most the step already under way
    time.sleep(0.05)
    assert engine.metrics.running._value.get() == 0


def test_a_newer_request_supersedes_the_older(engine):
    old = Job("", "typing", None, _doc(20, seed=31), MAX_NEW)
    engine.submit(old)
    assert isinstance(old.next_event(timeout=EVENT_TIMEOUT_S), TokenEvent)
    got, _, done = _run(engine, _doc(21, seed=31), session="typing")
    while not isinstance(event := old.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
        pass
    assert event.finish_reason == "cancelled" and old.cancel_reason == "superseded"
    assert done.finish_reason in ("length", "stop")


def _wait_until_parked(engine, job):
    """Waits until ``job``'s long prompt is parked between slices (the engine is still prefilling it)."""
    end = time.monotonic() + 60
    while not any(p.job is job for p in engine._prefilling):
        assert time.monotonic() < end and not job.cancelled.is_set(), "the long prompt was never parked"
        time.sleep(0.0005)


def test_a_long_prompt_is_prefilled_in_slices_between_other_work(engine):
    """A keystroke in a warm session is answered while a cold 2,000-token document is being prefilled,
    and the cold document's tokens are the ones of a cold start on its own."""
    warm_doc, cold_doc = _doc(40, seed=40), _doc(2000, seed=41)
    _run(engine, warm_doc, session="warm", max_new=2)
    cold = Job("", "cold", None, cold_doc, 4)
    engine.submit(cold)
    _wait_until_parked(engine, cold)
    keystroke = Job("", "warm", None, warm_doc + [5], 2)
    engine.submit(keystroke)
    first = keystroke.next_event(timeout=EVENT_TIMEOUT_S)
    assert isinstance(first, TokenEvent) and first.token_ids
    with pytest.raises(queue.Empty):  # the cold document has not produced its first token yet
        cold.next_event(timeout=0)
    got = []
    while not isinstance(event := cold.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
        got += event.token_ids
    assert event.usage.cached_tokens == 0
    alone, _, _ = _run(engine, cold_doc, session="cold-alone", max_new=4)
    assert got == alone


def test_a_superseded_long_prompt_keeps_what_it_committed(engine):
    doc = _doc(2000, seed=42)
    old = Job("", "long-typing", None, doc, 4)
    engine.submit(old)
    _wait_until_parked(engine, old)
    got, _, done = _run(engine, doc + [9], session="long-typing", max_new=4)  # waits for the session, then goes on
    while not isinstance(event := old.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
        pass
    assert event.finish_reason == "cancelled" and old.cancel_reason == "superseded"
    assert done.usage.cached_tokens > 0  # the slices the old job committed
    alone, _, _ = _run(engine, doc + [9], session="long-typing-alone", max_new=4)
    assert got == alone


def test_queue_full_is_refused(model):
    engine = Engine(model, EngineConfig(slots=1, max_new_tokens=MAX_NEW, queue_size=1))
    engine.start(warmup=False)
    try:
        jobs = [Job("", f"q{i}", None, _doc(10, seed=i), MAX_NEW) for i in range(2)]
        engine.submit(jobs[0])
        assert isinstance(jobs[0].next_event(timeout=EVENT_TIMEOUT_S), TokenEvent)  # holds the only slot
        engine.submit(jobs[1])  # waits
        with pytest.raises(QueueFull, match="limit 1"):
            engine.submit(Job("", "q2", None, _doc(10), 4))
    finally:
        for job in jobs:
            job.cancel()
        engine.stop(drain_s=1)


def test_no_compilation_after_warm_up(engine):
    before = engine.compilations
    for i, n in enumerate((3, 17, 64, 65, 129, 300, 513, 777)):  # new sampling values (traced) too
        sampling = dataclasses.replace(PENALISED[i % 3], temperature=0.5 * (i % 2), seed=n, min_p=n / 1000)
        _run(engine, _doc(n, seed=n), session=f"shapes-{n}", max_new=3, sampling=sampling)
    _run(engine, _doc(400, seed=1), session="shapes-ingest", max_new=0)
    assert engine.compilations == before


BUDGET = Schedule("learned_budget", rate=0.5, initial_threshold=1.0, gain=2.0)


@pytest.fixture(scope="module")
def budget_engine(model):
    engine = Engine(model, EngineConfig(slots=2, max_new_tokens=MAX_NEW, snapshots=4, schedule=BUDGET))
    engine.start(warmup=False)
    yield engine
    engine.stop(drain_s=1)


def test_the_learned_gate_under_a_budget_serves_exactly(budget_engine, model):
    """learned_budget (the budget's books live in the session state): offline tokens, reuse = cold start, at the
    server's rate and at a session's own ``update_rate``."""
    engine, doc = budget_engine, _doc(300, seed=9)
    # Offline parity while the window has not moved (prompt and generated tokens inside the first 256-token
    # block): past it the engine's base attends to a sliding window, the offline one to the whole text, and
    # a budget's ranking of near-equal gate scores may then choose other chunks.
    for rate in (None, 0.25):
        schedule = BUDGET if rate is None else dataclasses.replace(BUDGET, rate=rate)
        want = [t for piece in stream_ttt_tokens(model, doc[:240], SamplingParams(max_new_tokens=8), eot_id=0,
                                                 schedule=schedule) for t in piece]
        got, lambdas, _ = _run(engine, doc[:240], session=f"budget-offline-{rate}", update_rate=rate)
        assert got == want, rate
        assert 0.0 in lambdas and max(lambdas) > 0  # some chunks skipped, some updated
    for i, n in enumerate((100, 180, 300)):
        warm, _, _ = _run(engine, doc[:n], session="budget-warm")
        assert warm == _run(engine, doc[:n], session=f"budget-cold-{i}")[0]
    # A new rate for a warm session: it computes again from the start, as a cold start at that rate does;
    # then it keeps the rate, and its state is reused.
    for i, (n, rate) in enumerate(((300, 0.25), (310, None), (310, 0.75))):
        warm, warm_lam, done = _run(engine, doc[:n], session="budget-warm", update_rate=rate)
        cold, cold_lam, _ = _run(engine, doc[:n], session=f"budget-rate-cold-{i}", update_rate=rate or 0.25)
        assert warm == cold and warm_lam == cold_lam[len(cold_lam) - len(warm_lam):], i  # λ of the chunks computed
        assert (done.usage.cached_tokens > 0) == (rate is None) and (len(warm_lam) < len(cold_lam)) == (rate is None)


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_the_realised_update_rate_in_the_metrics_follows_the_requested_rate(budget_engine, rate):
    """Over a long document (65 chunks, prefilled a few chunks per call), /metrics' chunk counters give
    the requested rate within 5 points, as the model's budget rule keeps it."""
    engine = budget_engine
    count = lambda action: engine.metrics.registry.get_sample_value(
        "ponder_chunks_total", {"schedule": "learned_budget", "action": action})
    before = count("updated"), count("skipped")
    document = _doc(65 * CONFIG.gate.chunk + 1, seed=50)
    _, _, done = _run(engine, document, session=f"rate-{rate}", max_new=0, update_rate=rate)
    updated, skipped = count("updated") - before[0], count("skipped") - before[1]
    assert (updated, skipped) == (done.usage.chunks_updated, done.usage.chunks_skipped) and updated + skipped == 65
    assert abs(updated / (updated + skipped) - rate) <= 0.05, (updated, skipped)
    assert engine.sessions.get("", f"rate-{rate}").doc.history.target.tolist() == [rate]
