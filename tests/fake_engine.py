"""A test engine whose outputs can be worked out by hand (JetStream's habit).

It answers every job with the tokens of ``REPLY`` (cycled) up to the job's
``max_new_tokens``, one token per event, and closes one "chunk" with
λ = 0.5 every ``CHUNK`` tokens. The front ends' tests drive it through the
real ``CompletionService``, so they check wire formats, errors and
streaming without a model; tests against the real engine live elsewhere.
"""

from __future__ import annotations

import threading
import time

from ponder.server.types import DoneEvent, Job, NotReady, QueueFull, TokenEvent, Usage

REPLY = "hello world\n"
CHUNK = 4


class FakeEngine:
    def __init__(self, tokenizer, delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.reply = tokenizer.encode(REPLY)
        self.delay_s = delay_s
        self.ready = True
        self.full = False  # True: every submit answers QueueFull
        self.jobs: list[Job] = []
        self.resets: list[tuple[str, str]] = []
        self.model_name = "fake"

    def submit(self, job: Job) -> None:
        if not self.ready:
            raise NotReady("the engine is warming up")
        if self.full:
            raise QueueFull("the queue is full (1 waiting, limit 1)")
        self.jobs.append(job)
        threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def _run(self, job: Job) -> None:
        usage = Usage(prompt_tokens=len(job.tokens))
        reason = "length"
        for i in range(job.max_new_tokens):
            if job.cancelled.is_set():
                reason = "cancelled"
                break
            if job.deadline is not None and time.monotonic() > job.deadline:
                reason = "deadline"
                break
            if self.delay_s:
                time.sleep(self.delay_s)
            lam = [0.5] if (i + 1) % CHUNK == 0 else []
            usage.chunks_updated += len(lam)
            usage.generated_tokens += 1
            job.put(TokenEvent([self.reply[i % len(self.reply)]], lam))
        job.put(DoneEvent(reason, usage, job.session_id or "anonymous-1"))

    def reset_session(self, api_key: str, session_id: str) -> bool:
        self.resets.append((api_key, session_id))
        return True
