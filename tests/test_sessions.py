"""The session store on its own: LRU order, byte accounting, eviction, rollback, prompt plans.

States are plain ints here (the number of tokens a state has read) and
measure 8 bytes each, so the arrays' part of every byte count is worked out
by hand; the Python objects around them are checked against what Python
allocated (tracemalloc).
"""

import gc
import os
import subprocess
import sys
import tracemalloc

import pytest

from ponder.server import sessions
from ponder.server.metrics import ServerMetrics
from ponder.server.sessions import SessionStore, common_prefix, plan_prompt, python_bytes
from ponder.server.types import Job

C = 4  # tokens per chunk
EOT = 0


def state_bytes(tree) -> int:
    if tree is None:
        return 0
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(t) for t in tree)
    return 8


RATE = 0.5  # the default budget


def store(memory_bytes: float = 1e9, snapshots: int = 3, trim_heap=lambda: None) -> SessionStore:
    return SessionStore(C, EOT, memory_bytes, snapshots, lambda rate: 0, state_bytes, ServerMetrics.create(), RATE,
                        trim_heap)


def job(tokens, session="s", key="", **kw) -> Job:
    return Job(key, session, kw.pop("document_id", None), list(tokens), kw.pop("max_new_tokens", 4), **kw)


def committed(s: SessionStore, session, tokens: list[int]) -> None:
    """Commits ``tokens`` a chunk at a time, as the engine's prefill does, and counts the session."""
    for end in range(len(session.tokens) + C, len(tokens) + 1, C):
        session.commit(tokens[:end], end, s.snapshots)
    s.count(session)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0


def test_sessions_are_created_found_and_kept_in_lru_order():
    s = store()
    a = s.session_for(job([EOT, 1, 2], "a"))
    b = s.session_for(job([EOT, 1, 2], "b"))
    assert (a.tokens, a.doc, a.cache) == ([], 0, None) and len(s) == 2
    assert s.session_for(job([EOT, 1, 2, 3], "a")) is a  # found, and now the most recently used
    assert list(s) == [b, a]
    assert s.get("", "a") is a and s.get("other-key", "a") is None
    assert s.metrics.session_lookups.labels("hit")._value.get() == 1
    assert s.metrics.session_lookups.labels("miss")._value.get() == 2


def test_reset_document_change_and_end_of_document_start_afresh():
    s = store()
    a = s.session_for(job([EOT, 1, 2], "a", document_id="a.py"))
    assert s.session_for(job([EOT, 1], "a")) is a  # no document id: the same document
    assert s.session_for(job([EOT, 1], "a", document_id="b.py")) is not a
    b = s.get("", "a")
    c = s.session_for(job([EOT, 1, EOT, 5], "a"))
    assert b.document_id == "b.py" and c is not b and s.get("", "a") is c
    assert s.session_for(job([EOT, 1], "a", reset=True)) is not c
    reasons = s.metrics.sessions_reset
    assert [reasons.labels(r)._value.get() for r in ("document", "end_of_document", "explicit")] == [1, 1, 1]
    assert s.reset("", "a") and not s.reset("", "a") and len(s) == 0


def test_an_anonymous_job_joins_the_session_sharing_a_chunk_with_it():
    s = store()
    first = s.session_for(job([EOT, 1, 2, 3, 4, 5], None))
    assert first.session_id == "anonymous-1"
    committed(s, first, [EOT, 1, 2, 3, 4, 5, 6, 7])
    assert s.session_for(job([EOT, 1, 2, 3, 9, 9], None)) is first  # shares 4 tokens: a chunk
    assert s.session_for(job([EOT, 1, 2, 9], None)).session_id == "anonymous-2"  # 3: not enough
    assert s.session_for(job([EOT, 1, 2, 3, 4], None, key="k")).session_id == "anonymous-3"  # another key's


def test_a_job_without_a_session_id_never_joins_a_named_session():
    """Issue 21: a sessionless request sharing a document's start with a named session rolled it back and
    learnt its id. It gets an anonymous session of its own; the named one is untouched."""
    s = store()
    tokens = [EOT, *range(1, 16)]
    named = s.session_for(job(tokens, "k1-doc-B", key="k1"))
    committed(s, named, tokens)
    other = s.session_for(job(tokens[:9] + [99], None, key="k1"))
    assert other is not named and other.session_id == "anonymous-1" and other.anonymous and not named.anonymous
    assert named.tokens == tokens and s.get("k1", "k1-doc-B") is named
    committed(s, other, tokens[:9] + [99])
    assert s.session_for(job(tokens[:8] + [7], None, key="k1")) is other  # anonymous sessions are still joined
    assert s.session_for(job(tokens, "anonymous-1", key="k1")) is other  # and reached by the id a reply gave


def test_a_new_rate_restarts_the_document_and_is_remembered_until_the_session_is_forgotten():
    s = store()
    tokens = [EOT, *range(1, 12)]
    a = s.session_for(job(tokens, "a"))
    committed(s, a, tokens)
    assert a.rate == RATE and s.committed(job(tokens, "a")) == 12
    assert s.committed(job(tokens, "a", update_rate=RATE)) == 12 and s.committed(job(tokens, "a", update_rate=0.25)) == 0
    assert s.session_for(job(tokens, "a", update_rate=0.25)) is a  # the same session, from an empty document
    assert (a.rate, a.tokens, a.doc, a.snapshots) == (0.25, [], 0, [])
    assert s.metrics.sessions_reset.labels("rate")._value.get() == 1
    committed(s, a, tokens)
    assert s.session_for(job(tokens, "a")) is a and a.tokens == tokens  # no rate: the session's last one
    assert s.session_for(job(tokens, "a", update_rate=0.25)) is a and a.tokens == tokens  # the same rate: kept
    assert s.session_for(job(tokens, "a", document_id="b.py")).rate == 0.25  # a new document keeps the rate
    s.memory_bytes = 0
    s.evict(keep=s.session_for(job(tokens, "other")), busy=[])  # "a" is evicted ...
    assert s.get("", "a") is None and s.session_for(job(tokens, "a")).rate == 0.25  # ... and rebuilt at its rate
    assert s.reset("", "a") and s.session_for(job(tokens, "a")).rate == RATE  # forgotten with the session
    assert s.metrics.sessions_reset.labels("rate")._value.get() == 1


def test_bytes_are_counted_when_a_prefill_ends():
    s = store(snapshots=2)
    a = s.session_for(job([EOT, *range(1, 8)], "a"))
    a.cache = 8  # one cache (8 bytes here)
    committed(s, a, [EOT, *range(1, 8)])  # 8 tokens: 2 chunks, 2 snapshots
    assert s.measure(a) == 8 + 2 * 8 + 8 + python_bytes(a)  # cache, snapshots, state; the Python objects
    assert s.bytes == a.counted == s.measure(a) == s.key_bytes[""]
    eight = python_bytes(a)
    committed(s, a, [EOT, *range(1, 12)])  # 12 tokens: 3 snapshots, 2 kept
    assert [b for b, _ in a.snapshots] == [8, 12]
    assert s.bytes == 8 + 2 * 8 + 8 + python_bytes(a) and python_bytes(a) == eight + 4 * (8 + sessions.INT_BYTES)
    s.reset("", "a")
    assert s.bytes == 0 and s.metrics.session_bytes._value.get() == 0 and not s.key_bytes


def test_bytes_count_every_object_a_session_keeps():
    """Issue 21: sessions with 4 MB ids raised RSS 12x more than the bytes counted. Every object a session
    keeps (ids, committed tokens, snapshots, its entry in the store) is counted: the count covers what
    Python allocated for them, and overstates it by little."""
    s = store(snapshots=3)
    warm = s.session_for(job([EOT, 1], "warm"))  # the metrics' first use allocates their children
    s.reset("", warm.session_id)
    del warm

    def fill():
        for i in range(50):
            tokens = [EOT, *range(1000 + 100 * i, 1063 + 100 * i)]  # 64 tokens, ids past the ints Python shares
            session = s.session_for(job(tokens, f"{i:0400d}", document_id=f"{i:0397d}.py"))
            committed(s, session, tokens)

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    arrays = sum(state_bytes((x.cache, [st for _, st in x.snapshots], x.doc)) for x in s)  # no memory here: ints
    counted = s.bytes - arrays
    assert kept <= counted <= 1.25 * kept, (kept, counted)


def test_remembered_rates_are_counted_and_kept_per_key(monkeypatch):
    monkeypatch.setattr(sessions, "RATES_KEPT", 2)
    s = store()
    for name in ("a1", "a2"):
        s.session_for(job([EOT, 1], name, key="a", update_rate=0.25))
    s.session_for(job([EOT, 1], "b1", key="b", update_rate=0.75))
    entry = sessions.RATE_BYTES + len("a1") + 49  # the float and its entry, the session id (an ASCII str)
    assert s.key_bytes == {"a": 2 * entry, "b": entry} and s.bytes == 3 * entry  # before any prefill ends
    for name in ("a3", "a4"):  # key a's least recently given rate goes; key b's is kept
        s.session_for(job([EOT, 1], name, key="a", update_rate=0.25))
    s.memory_bytes = 0
    s.evict(keep=None, busy=[])  # the sessions go, their rates stay
    assert len(s) == 0 and s.key_bytes == {"a": 2 * entry, "b": entry}
    assert s.rate("a", "a1") == s.rate("a", "a2") == RATE and s.rate("b", "b1") == 0.75
    assert s.rate("a", "a3") == s.rate("a", "a4") == 0.25
    s.reset("a", "a3")
    assert s.rate("a", "a3") == RATE and s.key_bytes == {"a": entry, "b": entry}


def test_a_key_over_its_fair_share_is_evicted_first():
    """Issue 21: one key filling the cache evicted every other key's sessions. Over the cap, the keys holding
    more than the cap split among the keys go first; within a key, the least recently used."""
    s = store()

    def add(key, name):
        session = s.session_for(job([EOT, 1, 2, 3, 4], name, key=key))
        committed(s, session, [EOT, 1, 2, 3])
        s.evict(keep=session, busy=[])
        return session

    a = [add("a", f"a{i}") for i in range(2)]  # the least recently used of all
    per_session = s.measure(a[0])
    s.memory_bytes = 6 * per_session
    b = [add("b", f"b{i}") for i in range(10)]
    assert list(s) == [*a, *b[-4:]] and s.bytes == 6 * per_session  # a's two stay; b keeps the rest of the cap
    assert s.fair_share() == 3 * per_session and s.key_bytes == {"a": 2 * per_session, "b": 4 * per_session}
    c = add("c", "c0")  # a third key: b, now over its share (2 sessions), gives way
    assert list(s) == [*a, *b[-3:], c]
    s.reset("a", "a0"), s.reset("a", "a1")
    assert s.fair_share() == 3 * per_session


def test_eviction_drops_least_recently_used_but_never_the_kept_or_busy():
    trims = []
    s = store(trim_heap=lambda: trims.append(len(s)))
    made = []
    for name in "abcd":
        session = s.session_for(job([EOT, 1, 2, 3, 4], name))
        session.cache = 8
        committed(s, session, [EOT, 1, 2, 3])
        made.append(session)
    a, b, c, d = made
    per_session = 8 + 8 + 8 + python_bytes(a)  # cache, one snapshot, state; the Python objects
    s.memory_bytes = 3 * per_session
    assert s.bytes == 4 * per_session
    s.evict(keep=a, busy=[b])  # a and b stay though least recently used; c goes, then the cap holds
    assert list(s) == [a, b, d] and s.bytes == 3 * per_session
    assert trims == [3]  # after the drop, the heap is trimmed once
    s.evict(keep=a, busy=[])  # within the cap: nothing dropped, no trim
    assert trims == [3]
    s.memory_bytes = 2 * per_session
    s.evict(keep=d, busy=[])  # a is no longer busy or kept: the least recently used goes
    assert list(s) == [b, d] and s.bytes == 2 * per_session
    assert s.metrics.sessions_evicted._value.get() == 2 and s.metrics.sessions_active._value.get() == 2
    s.count(c)  # an evicted session's late count changes nothing
    assert s.bytes == 2 * per_session


@pytest.mark.parametrize(
    "prompt_end, edit_at, kept",
    [
        (16, None, 16),  # the prompt extends the history: nothing rolls back
        (12, None, 12),  # a shorter prompt: back to the snapshot at its end
        (16, 13, 12),  # an edit inside the last chunk: back to the snapshot before it
        (16, 6, 4),  # an edit inside the second chunk
        (16, 2, 0),  # before every snapshot kept: the empty state
    ],
)
def test_rollback_to_the_last_snapshot_before_the_difference(prompt_end, edit_at, kept):
    s = store(snapshots=4)
    tokens = [EOT, *range(1, 16)]
    session = s.session_for(job(tokens, "a"))
    committed(s, session, tokens)
    prompt = tokens[:prompt_end]
    if edit_at is not None:
        prompt[edit_at] = 99
    assert s.rollback(session, prompt) == kept
    assert session.tokens == tokens[:kept] and session.doc == kept  # the state after exactly those tokens
    assert [b for b, _ in session.snapshots] == [b for b in (4, 8, 12, 16) if b <= kept]


def test_rollback_past_the_snapshots_kept_starts_from_the_empty_state():
    s = store(snapshots=2)
    tokens = [EOT, *range(1, 16)]
    session = s.session_for(job(tokens, "a"))
    committed(s, session, tokens)
    assert [b for b, _ in session.snapshots] == [12, 16]
    prompt = tokens[:10] + [99]
    assert s.rollback(session, prompt) == 0 and (session.tokens, session.doc, session.snapshots) == ([], 0, [])


@pytest.mark.parametrize(
    "tokens, max_new, commit_limit, want",
    [
        ([EOT, *range(1, 10)], 4, None, (10, 8, 8)),  # the last token stays open for extend
        ([EOT, *range(1, 8)], 4, None, (8, 4, 4)),  # a whole last chunk still keeps its last token
        ([EOT, *range(1, 8)], 0, None, (8, 8, 8)),  # an ingestion commits every whole chunk
        ([EOT, *range(1, 14)], 4, 6, (14, 4, 12)),  # a fill-in-the-middle suffix after 6 is scratch
        ([EOT, 1, 2, EOT, *range(3, 12)], 4, 7, (10, 4, 8)),  # a new document starts at the last EOT
    ],
)
def test_prompt_plans(tokens, max_new, commit_limit, want):
    plan = plan_prompt(job(tokens, max_new_tokens=max_new, commit_limit=commit_limit), C, EOT)
    assert (len(plan.tokens), plan.commit_end, plan.scratch_end) == want
    assert plan.tokens == tokens[len(tokens) - want[0]:]


def test_the_heap_trimmer_gives_freed_memory_back_at_most_every_interval():
    """Issue 21: under ponder's malloc policy (freed memory kept), what evicted sessions held stayed resident."""
    script = """
from ponder.runtime import HeapTrimmer, configure_process
configure_process()
import numpy as np
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
held, pinned = [np.ones(2**18) for _ in range(200)], []  # 400 MiB in 2 MiB blocks ...
for i in range(0, 200, 2):
    pinned.append(np.ones(16))  # ... with small live blocks between them, as sessions leave them
before = rss()
del held
kept = rss()
trim = HeapTrimmer(interval_s=60)
assert trim() and not trim(), "a second call within the interval must not trim"
print(before >> 20, kept >> 20, rss() >> 20)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    before, kept, trimmed = map(int, run.stdout.split())
    assert kept > before - 100, f"the policy keeps freed memory resident: {before} -> {kept} MiB"
    assert trimmed < kept - 300, f"trimmed: {kept} -> {trimmed} MiB"
