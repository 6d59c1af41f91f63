"""The engine's scheduling policy as pure functions: no model, no engine, no threads."""

from ponder.server.scheduler import PATIENCE_S, SLICE_TOKENS, clashes, dispatch, free_slots, pick_next
from ponder.server.types import Job


def job(n: int, session: str | None = "s", key: str = "", arrival: float = 100.0) -> Job:
    return Job(key, session, None, [0] * n, 4, arrival=arrival)


def test_free_slots_are_the_lowest_neither_running_nor_reserved():
    assert free_slots(4, {0: "a", 2: "b"}, {1}) == [3]
    assert free_slots(3, {}, set()) == [0, 1, 2]
    assert free_slots(2, {0: "a"}, {1}) == []


def test_clashes_by_key_and_session():
    assert clashes(job(1, "a"), job(1, "a"))
    assert not clashes(job(1, "a"), job(1, "b"))
    assert clashes(job(1, None), job(1, "b")) and clashes(job(1, "a"), job(1, None))  # anonymous may match any
    assert not clashes(job(1, "a", key="k1"), job(1, "a", key="k2"))


def test_least_prompt_to_compute_goes_first_in_arrival_order_among_equals():
    cold, warm, also_warm = job(900, "cold"), job(40, "warm"), job(40, "other")
    committed = {"warm": 36, "cold": 0, "other": 36}
    pick = pick_next([cold, warm, also_warm], [], lambda j: committed[j.session_id], now=100.1)
    assert pick is warm  # 4 tokens of work, the first of two equals
    assert pick_next([cold, also_warm], [], lambda j: 0, now=100.1) is also_warm  # 40 < 900


def test_a_job_waiting_past_patience_goes_first_however_long():
    cold, warm = job(900, "cold", arrival=100.0), job(10, "warm", arrival=100.0 + PATIENCE_S)
    assert pick_next([cold, warm], [], lambda j: 0, now=100.0 + PATIENCE_S - 0.01) is warm
    assert pick_next([cold, warm], [], lambda j: 0, now=100.0 + PATIENCE_S) is cold


def test_while_a_prompt_is_parked_long_and_clashing_jobs_wait():
    parked = [job(2000, "long")]
    long, same, anonymous, short = job(SLICE_TOKENS + 1, "x"), job(5, "long"), job(5, None), job(SLICE_TOKENS, "y")
    assert pick_next([long, same, anonymous], parked, lambda j: 0, now=100.0) is None
    assert pick_next([long, same, anonymous, short], parked, lambda j: 0, now=200.0) is short  # patience cannot override
    # What the session already holds does not count: a warm long prompt is short work.
    assert pick_next([long], parked, lambda j: 10, now=100.0) is long


def test_dispatch_waits_for_a_burst_to_join_then_steps():
    assert not dispatch(running=0, prefilling=0, waiting=3, admitted=False, slots=4)  # nothing decodes
    assert not dispatch(running=1, prefilling=0, waiting=2, admitted=True, slots=4)  # more can join first
    assert dispatch(running=1, prefilling=0, waiting=0, admitted=True, slots=4)
    assert dispatch(running=3, prefilling=1, waiting=2, admitted=True, slots=4)  # every slot busy
    assert dispatch(running=1, prefilling=0, waiting=2, admitted=False, slots=4)  # the waiting cannot start now
