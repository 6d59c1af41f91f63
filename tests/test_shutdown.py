"""What SIGTERM and Ctrl-C do to ``ponder serve`` (``server/main.py``'s ``Shutdown``), on the engine and the fake runner.

The whole process under load is ``test_server.py``'s: gRPC calls that outlive
the drain end UNAVAILABLE and the process exits in time.
"""

import signal
import threading
import time

from fake_runner import RecordingEngine

from ponder.server.main import Shutdown
from ponder.server.types import DoneEvent, Job, TokenEvent

REPLY = [11, 12, 13]


def _final(job: Job, timeout: float) -> DoneEvent:
    end = time.monotonic() + timeout
    while not isinstance(event := job.next_event(timeout=max(0.0, end - time.monotonic())), DoneEvent):
        pass
    return event


def test_the_first_signal_drains_and_a_second_ends_the_drain_at_once():
    engine = RecordingEngine(REPLY, delay_s=0.02, max_new_tokens=256)
    exits = []
    shutdown = Shutdown(engine, drain_s=60, exit=exits.append)
    job = Job("", "s", None, [0, 1, 2], 256)  # ~5 s of generation
    engine.submit(job)
    assert isinstance(job.next_event(timeout=10), TokenEvent)
    shutdown.signal(signal.SIGTERM)
    assert engine.draining and not shutdown.stopped.wait(0.5)  # the job runs on
    start = time.monotonic()
    shutdown.signal(signal.SIGINT)
    assert shutdown.stopped.wait(5)
    assert time.monotonic() - start < 1
    assert _final(job, 1).finish_reason == "cancelled" and job.cancel_reason == "shutdown"
    assert not exits  # it stopped by itself: the watchdog had nothing to do


def test_the_watchdog_ends_a_process_whose_drain_never_ends():
    class StuckEngine:
        draining = False

        def stop(self, drain_s):
            threading.Event().wait()  # a stop that never returns

    exits = []
    shutdown = Shutdown(StuckEngine(), drain_s=0.2, exit=exits.append)
    shutdown.GRACE_S = 0.3
    start = time.monotonic()
    shutdown.signal(signal.SIGTERM)
    end = start + 5
    while not exits:
        assert time.monotonic() < end, "the watchdog never fired"
        time.sleep(0.01)
    assert exits == [1] and 0.5 <= time.monotonic() - start < 2
