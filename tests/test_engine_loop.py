"""The real engine (its loop, scheduler and session store) on the hand-computable fake runner.

No model and nothing compiled: the tokens of every job are ``REPLY`` cycled,
each chunk of the document closes with λ = ``LAMBDA``, and the fake runner
fails any call handed a state that is not the one for where it starts, so
session reuse, rollback and slot handling are checked exactly and fast.
``test_engine.py`` runs the same engine on a real model.
"""

import math
import threading
import time

import pytest
from fake_runner import CHUNK, FLOPS, LAMBDA, RecordingEngine, budget_updates, chunks_closed, full_queue, lambdas_riding

from ponder.model.gating import Schedule
from ponder.server.sessions import Session, python_bytes
from ponder.server.types import DoneEvent, Job, NotReady, QueueFull, RequestError, TokenEvent

REPLY = [11, 12, 13]


@pytest.fixture(params=[1, 3], ids=["one-step", "lone-steps-3"])
def engine(request):
    """The engine; a lone stream in slot 0 decodes 1 or 3 tokens per runner call."""
    engine = RecordingEngine(REPLY, slots=3, queue_size=4, max_new_tokens=32)
    engine.runner.lone_steps = request.param
    yield engine
    engine.stop(drain_s=1)


def doc(n: int, start: int = 100) -> list[int]:
    return [0, *range(start, start + n - 1)]


def run(engine, tokens, session="s", max_new=6, **kw):
    """Submits a job and collects ``(events, done)``."""
    job = Job(kw.pop("key", ""), session, kw.pop("document_id", None), list(tokens), max_new, **kw)
    engine.submit(job)
    events = []
    while not isinstance(event := job.next_event(timeout=10), DoneEvent):
        assert isinstance(event, TokenEvent), event
        events.append(event)
    return events, event


def reply(n: int) -> list[int]:
    return [REPLY[i % len(REPLY)] for i in range(n)]


@pytest.mark.parametrize("prompt_tokens", [1, 3, 4, 10, 12])
def test_a_fresh_session_gets_the_reply_and_every_chunks_lambda(engine, prompt_tokens):
    events, done = run(engine, doc(prompt_tokens), max_new=7)
    assert [t for e in events for t in e.token_ids] == reply(7)
    assert [len(e.chunk_lambda) for e in events] == [lambdas_riding(prompt_tokens, k) for k in range(1, 8)]
    closed = chunks_closed(prompt_tokens, 7)
    assert [lam for e in events for lam in e.chunk_lambda] == [LAMBDA] * closed
    u = done.usage
    assert (done.finish_reason, u.prompt_tokens, u.cached_tokens, u.generated_tokens) == ("length", prompt_tokens, 0, 7)
    assert (u.chunks_updated, u.chunks_skipped, u.ttt_flops) == (closed, 0, FLOPS * closed)
    steps = engine.runner.lone_steps  # a lone stream took that many tokens per call (none past its end)
    assert engine.runner.steps_per_call[steps] >= 7 // steps and u.context_tokens == prompt_tokens + 6


def test_a_warm_session_computes_only_what_changed(engine):
    text = doc(30)
    run(engine, text[:18])
    assert engine.committed_tokens("", "s") == text[:16]  # whole chunks, the last token kept open
    events, done = run(engine, text[:27])  # extends the history: only the new tokens run
    assert done.usage.cached_tokens == 16 and [t for e in events for t in e.token_ids] == reply(6)
    assert len(events[0].chunk_lambda) == 27 // CHUNK - 16 // CHUNK
    # Snapshots are taken where prefill calls end (calls of up to 4 chunks): at 16, then 24.
    edited = text[:20] + [7] + text[21:27]
    _, done = run(engine, edited)  # an edit at 20: back to the snapshot at 16
    assert done.usage.cached_tokens == 16 and engine.committed_tokens("", "s") == edited[:24]
    _, done = run(engine, text[:10] + [7] + text[11:27])  # an edit at 10: before every snapshot
    assert done.usage.cached_tokens == 0
    _, done = run(engine, text[:27], session="s", reset=True)
    assert done.usage.cached_tokens == 0


def test_ingest_commits_whole_chunks_and_generated_tokens_are_never_committed(engine):
    events, done = run(engine, doc(14), max_new=0)
    assert [e.token_ids for e in events] == [[]] and len(events[0].chunk_lambda) == 3
    assert (done.finish_reason, done.usage.generated_tokens) == ("length", 0)
    assert engine.committed_tokens("", "s") == doc(14)[:12]
    run(engine, doc(14), max_new=9)
    assert engine.committed_tokens("", "s") == doc(14)[:12]


def test_fill_in_the_middle_suffix_is_scratch(engine):
    prompt = doc(9) + [5, 6, 7, 8, 9, 10]
    events, _ = run(engine, prompt, commit_limit=9)
    assert engine.committed_tokens("", "s") == prompt[:8]
    assert [t for e in events for t in e.token_ids] == reply(6)


def test_anonymous_jobs_share_the_session_of_their_prefix(engine):
    _, first = run(engine, doc(12), session=None)
    _, second = run(engine, doc(14), session=None)
    _, other = run(engine, doc(14, start=300), session=None)
    assert first.session_id == second.session_id == "anonymous-1" and other.session_id == "anonymous-2"
    assert second.usage.cached_tokens == 8 and engine.session_count() == 2


def test_jobs_in_every_slot_decode_together_exactly(engine):
    engine.runner.delay_s = 0.002  # they overlap
    results = {}

    def go(i):
        results[i] = run(engine, doc(5 + 7 * i, start=100 * i), session=f"c{i}", max_new=10 + i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(5)]  # 5 jobs, 3 slots: two wait
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (events, done) in results.items():
        assert [t for e in events for t in e.token_ids] == reply(10 + i)
        assert done.usage.chunks_updated == chunks_closed(5 + 7 * i, 10 + i)


def test_a_long_prompt_is_prefilled_in_slices_and_equals_a_cold_start(engine):
    events, done = run(engine, doc(1000), session="long")
    assert [t for e in events for t in e.token_ids] == reply(6) and len(events[0].chunk_lambda) == 1000 // CHUNK
    assert done.usage.chunks_updated == chunks_closed(1000, 6)


def test_a_newer_job_of_the_session_supersedes_the_older(engine):
    engine.runner.delay_s = 0.01
    old = Job("", "typing", None, doc(10), 32)
    engine.submit(old)
    assert isinstance(old.next_event(timeout=10), TokenEvent)
    _, done = run(engine, doc(11), session="typing")
    while not isinstance(event := old.next_event(timeout=10), DoneEvent):
        pass
    assert event.finish_reason == "cancelled" and old.cancel_reason == "superseded"
    assert done.finish_reason == "length" and done.usage.cached_tokens == 8


def test_cancel_and_deadline_free_the_slot(engine):
    import time

    engine.runner.delay_s = 0.01
    job = Job("", "c", None, doc(10), 32)
    engine.submit(job)
    assert isinstance(job.next_event(timeout=10), TokenEvent)
    job.cancel()
    seen = 0
    while not isinstance(event := job.next_event(timeout=10), DoneEvent):
        seen += len(event.token_ids)
    assert event.finish_reason == "cancelled" and seen <= 1  # at most the step already under way
    _, done = run(engine, doc(10), session="d", max_new=32, deadline=time.monotonic() + 0.1)
    assert done.finish_reason == "deadline" and 0 < done.usage.generated_tokens < 32
    engine.wait_idle()
    assert engine.metrics.running._value.get() == 0


def _final(job: Job):
    while not isinstance(event := job.next_event(timeout=5), DoneEvent):
        pass
    return event


def test_a_stopped_engine_ends_every_job_it_holds(engine):
    """Decoding, parked between prefill slices, or waiting for a slot: each job still here when the drain
    ends gets its final event (the front ends answer 503 / UNAVAILABLE), so that no reader waits forever."""
    engine.runner.delay_s = 0.02  # per decode step: the long prompt takes ~20 of them
    jobs = [Job("", f"decoding-{i}", None, doc(5), 32) for i in range(2)]
    jobs.append(Job("", "parked", None, doc(5000), 32))  # the third slot
    for job in jobs:
        engine.submit(job)
    end = time.monotonic() + 10
    while len(engine._running) < 2 or not engine._prefilling:
        assert time.monotonic() < end, "the jobs never took their slots"
        time.sleep(0.005)
    jobs += [Job("", f"waiting-{i}", None, doc(5), 32) for i in range(2)]
    for job in jobs[3:]:
        engine.submit(job)
    with engine._lock:
        assert len(engine._running) == 2 and len(engine._prefilling) == 1 and len(engine._waiting) == 2
    engine.stop(drain_s=0.05)
    for job in jobs:
        assert _final(job).finish_reason == "cancelled" and job.cancel_reason == "shutdown", job.session_id
    assert engine.committed_tokens("", "parked")  # what its prefill committed stays
    assert engine.metrics.registry.get_sample_value("ponder_cancellations_total", {"reason": "shutdown"}) == 5


def test_an_engine_stuck_in_a_model_call_still_ends_its_jobs(engine, monkeypatch):
    import ponder.server.engine

    monkeypatch.setattr(ponder.server.engine, "STOP_JOIN_S", 0.2)
    engine.runner.delay_s = 0.02
    job = Job("", "s", None, doc(5), 32)
    engine.submit(job)
    assert isinstance(job.next_event(timeout=10), TokenEvent)
    engine.runner.pause()  # the next model call never returns
    assert engine.runner.held.wait(5)
    engine.stop(drain_s=0)
    assert _final(job).finish_reason == "cancelled" and job.cancel_reason == "shutdown"
    engine.runner.resume()  # the loop ends the job again: the second final event is dropped
    engine._thread.join(timeout=5)
    assert not engine._thread.is_alive() and job.delivered() == []


def test_a_burst_arriving_during_a_call_fills_the_free_slots_before_the_queue():
    """The queue bounds jobs waiting for a slot: jobs that free slots will take count against it only once they don't fit."""
    engine = RecordingEngine(REPLY, slots=3, queue_size=1, max_new_tokens=32, delay_s=0.05)  # 50 ms a step
    try:
        first = Job("", "first", None, doc(4), 30)
        engine.submit(first)
        assert isinstance(first.next_event(timeout=10), TokenEvent)  # decoding in slot 0
        engine.runner.pause()
        assert engine.runner.held.wait(5)  # the loop is inside a runner call
        burst = [Job("", f"b{i}", None, doc(4, start=200 + 10 * i), 2) for i in range(3)]
        for job in burst:  # two free slots and one place in the queue
            engine.submit(job)
        with pytest.raises(QueueFull, match="1 requests waiting for a slot, limit 1"):
            engine.submit(Job("", "over", None, doc(4), 2))
        engine.runner.resume()
        for job in burst:
            while not isinstance(event := job.next_event(timeout=10), DoneEvent):
                pass
            assert event.finish_reason == "length"
    finally:
        engine.runner.resume()
        first.cancel()
        engine.stop(drain_s=1)


def test_refusals(engine):
    with pytest.raises(RequestError, match="max_tokens"):
        engine.submit(Job("", "s", None, doc(3), 33))
    with pytest.raises(RequestError, match="prompt"):
        engine.submit(Job("", "s", None, [], 3))
    with full_queue(engine), pytest.raises(QueueFull, match="limit 4"):
        engine.submit(Job("", "s", None, doc(3), 3))
    for bad in (math.nan, -0.1, 1.5, "0.5", True):
        with pytest.raises(RequestError, match=r"update_rate: must be a number in \[0, 1\]"):
            engine.submit(Job("", "s", None, doc(3), 3, update_rate=bad))
    with pytest.raises(RequestError, match="update_rate: the server's schedule 'learned' reads no budget"):
        engine.submit(Job("", "s", None, doc(3), 3, update_rate=0.5))
    assert engine.jobs == []  # nothing refused was queued
    engine.ready = False
    with pytest.raises(NotReady, match="warming up"):
        engine.submit(Job("", "s", None, doc(3), 3))
    engine.ready, engine.draining = True, True
    with pytest.raises(NotReady, match="shutting down"):
        engine.submit(Job("", "s", None, doc(3), 3))


def test_eviction_under_the_memory_cap_rebuilds_transparently():
    like = Session("", "e1", None, [], None, None, 0, [], 0.5)  # a session as the prefill below leaves it:
    like.commit(doc(10)[:8], None, keep=16)  # 8 committed tokens, 1 snapshot (one call of 2 chunks)
    per_session = 8 + 8 + 8 + python_bytes(like)  # cache, snapshot, state; the Python objects
    engine = RecordingEngine(REPLY, slots=2, session_memory_mb=1.5 * per_session / 2**20)
    try:
        first, _ = run(engine, doc(10), session="e1")
        run(engine, doc(10, start=300), session="e2")  # over the cap: e1 goes
        assert engine.committed_tokens("", "e1") is None and engine.metrics.sessions_evicted._value.get() == 1
        again, done = run(engine, doc(10), session="e1")
        assert again == first and done.usage.cached_tokens == 0
        assert engine.metrics.session_bytes._value.get() == per_session == engine.sessions.bytes
    finally:
        engine.stop(drain_s=1)


def test_update_rate_sets_the_sessions_budget_and_reuse_equals_a_cold_start_at_that_rate():
    engine = RecordingEngine(REPLY, slots=2, schedule=Schedule("learned_budget", rate=0.5))
    metrics, runner = engine.metrics, engine.runner
    count = lambda action: metrics.registry.get_sample_value("ponder_chunks_total", {"schedule": "learned_budget", "action": action})
    try:
        events, done = run(engine, doc(33), update_rate=0.25)  # 8 chunks committed, the 9th closed while decoding
        session = engine.sessions.get("", "s")
        assert session.rate == session.doc.target == 0.25 and {s.target for _, s in session.snapshots} == {0.25}
        assert runner.targets[0] == 0.25  # the decode slot's state too
        want = [LAMBDA if budget_updates(k, 0.25) else 0.0 for k in range(9)]
        assert [lam for e in events for lam in e.chunk_lambda] == want == [0, 0, 0, LAMBDA] * 2 + [0]
        assert (done.usage.chunks_updated, done.usage.chunks_skipped) == (2, 7) == (count("updated"), count("skipped"))
        target = lambda stat: metrics.registry.get_sample_value(f"ponder_target_update_rate_{stat}", {"schedule": "learned_budget"})
        assert (target("count"), target("sum")) == (1, 0.25)

        _, done = run(engine, doc(41))  # no rate: the session's last one, and its committed state is reused
        assert done.usage.cached_tokens == 32 and session.doc.target == 0.25 and target("sum") == 0.5
        warm, done = run(engine, doc(41), update_rate=0.75)  # a new rate: computed again from the start ...
        assert done.usage.cached_tokens == 0 and session.doc.target == 0.75
        assert metrics.sessions_reset.labels("rate")._value.get() == 1
        cold, _ = run(engine, doc(41), session="cold", update_rate=0.75)  # ... exactly as a cold start at that rate
        assert warm == cold and [lam for e in cold for lam in e.chunk_lambda][:4] == [0, LAMBDA, LAMBDA, LAMBDA]
        run(engine, doc(9), session="new")
        assert engine.sessions.get("", "new").doc.target == 0.5  # a new session: the schedule's rate
    finally:
        engine.stop(drain_s=1)
