"""``POST /infill`` as an editor plug-in uses it: llama.cpp's time limit and figures, and what a session reuses.

A real uvicorn server on the real service and engine, the test runner behind
them (``tests/fake_runner.py``: the tokens of "hello world\\n" cycled, 4 per
line; ``prompt_delay_s`` slows the prompt phase, ``delay_s`` each token).
Each llama.cpp field is checked for what llama.cpp's server means by it
(``server.http.llama``); the prompt layout (``server.prompts``) for what a
request shares with the one before it when the cursor moves.
"""

from __future__ import annotations

import itertools
import threading
import time

import httpx
import pytest
from fake_runner import RecordingEngine
from test_http import REPLY, TOKENIZER, Server, reply

from ponder.model.tokenizer import Tokenizer
from ponder.server import prompts
from ponder.server.http.app import build_app
from ponder.server.metrics import ServerMetrics
from ponder.server.service import CompletionService
from ponder.server.types import Job


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(TOKENIZER)


@pytest.fixture(scope="module")
def stack(tokenizer):
    engine = RecordingEngine(tokenizer.encode(REPLY), metrics=ServerMetrics.create())
    server = Server(build_app(CompletionService(engine, tokenizer), engine, engine.metrics, model_name="tiny"))
    yield server.url, engine
    server.stop()
    engine.stop(drain_s=1)


@pytest.fixture
def server(stack):
    url, engine = stack
    return url, engine.fresh()


def infill(url: str, **body) -> dict:
    r = httpx.post(url + "/infill", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# --- t_max_predict_ms: a limit on generation, from the first token, applied at a newline.


def test_time_limit_leaves_the_prompt_phase_out(server, tokenizer):
    """A prompt phase longer than the limit: llama.cpp starts counting at the first token, so the whole
    completion comes back (the limit used to run from the request's arrival: nothing came back)."""
    url, engine = server
    engine.runner.prompt_delay_s, engine.runner.delay_s = 0.5, 0.005  # half a second per prompt call
    got = infill(url, input_prefix="def f(", input_suffix="):\n", n_predict=6, t_max_predict_ms=400)
    assert got["content"] == reply(tokenizer, 6) and got["timings"]["predicted_n"] == 6
    assert got["timings"]["prompt_ms"] >= 1000  # far past the limit


def test_time_limit_ends_generation_at_a_newline(server):
    """Past the limit, generation goes on until a token brings a newline, and stops there."""
    url, engine = server
    engine.runner.delay_s = 0.03
    got = infill(url, input_prefix="x = ", n_predict=40, t_max_predict_ms=1)
    assert (got["content"], got["stop_type"]) == ("hello world\n", "limit")  # 4 tokens, the limit long past at the 2nd
    got = infill(url, input_prefix="x = ", n_predict=40, t_max_predict_ms=200)
    lines = got["content"].split("\n")
    assert got["content"].endswith("\n") and set(lines[:-1]) == {"hello world"} and len(lines) - 1 < 10
    assert got["timings"]["predicted_ms"] >= 200 and got["stop_type"] == "limit"


def test_t_max_prompt_ms_is_accepted_and_ignored_as_in_llama_cpp(server, tokenizer):
    url, engine = server
    engine.runner.prompt_delay_s = 0.1
    got = infill(url, input_prefix="x = ", n_predict=4, t_max_prompt_ms=1)
    assert got["content"] == reply(tokenizer, 4)


# --- timings, tokens_cached: llama.cpp's server_slot figures.


def test_figures_of_a_request_that_reuses_its_session(server):
    url, engine = server
    engine.runner.prompt_delay_s, engine.runner.delay_s = 0.05, 0.01
    session = {"session_id": "fig", "document_id": "fig.py"}
    head = "".join(f"value_{i} = {i}\n" for i in range(30))
    infill(url, input_prefix=head, n_predict=0, **session)
    held = len(engine.committed_tokens("", "fig"))
    got = infill(url, input_prefix=head + "total = ", input_suffix="\n", n_predict=3, **session)
    evaluated, timings = got["tokens_evaluated"], got["timings"]
    assert evaluated == len(engine.jobs[-1].tokens) and 0 < held < evaluated
    assert timings["cache_n"] == held and timings["prompt_n"] == evaluated - held  # reused + computed = the prompt
    assert got["tokens_cached"] == evaluated + 3 - 1  # the context: the prompt, then 2 of the 3 tokens fed back
    assert timings["prompt_ms"] >= 50 and timings["predicted_ms"] >= 2 * 10  # each phase as the engine timed it
    assert timings["prompt_per_second"] == pytest.approx(1000 * timings["prompt_n"] / timings["prompt_ms"])
    assert got["truncated"] is False  # the fake runner's window never moves


def test_prompt_ms_leaves_the_queue_out(server):
    url, engine = server
    engine.runner.pause()  # the loop takes the first job and stalls inside the runner
    engine.submit(Job("", None, None, [engine.eot_id, 1, 2], 1))
    assert engine.runner.held.wait(5)
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(infill(url, input_prefix="x = ", n_predict=2)))
    thread.start()
    end = time.monotonic() + 10
    while not engine._waiting:  # the request is in the queue
        assert time.monotonic() < end
        time.sleep(0.01)
    time.sleep(0.5)
    engine.runner.resume()
    thread.join(30)
    assert answer["timings"]["prompt_ms"] < 400  # the half second in the queue is not prompt processing


def test_a_request_cut_short_in_its_prompt_reports_what_it_did(server, tokenizer):
    """Superseded while its long prompt is prefilled a slice at a time: its answer says what it reused and
    computed, and how far its context got (it used to say 0 cached and every token computed)."""
    url, engine = server
    session = {"session_id": "cut", "document_id": "cut.py"}
    head = "".join(f"value_{i} = {i}\n" for i in range(40))
    infill(url, input_prefix=head, n_predict=0, **session)
    held = len(engine.committed_tokens("", "cut"))
    engine.runner.prompt_delay_s = 0.02
    # Far more than one slice (256 tokens) to compute, in fewer lines than a prefix keeps whole (KEEP_LINES).
    long = head + "".join(f"other_{i} = compute({i}, {i * 3}, {i * 7}, {i * 11})\n" for i in range(50))
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(infill(url, input_prefix=long, n_predict=5, **session)))
    thread.start()
    end = time.monotonic() + 10
    while not engine._prefilling:  # parked between its slices
        assert time.monotonic() < end
        time.sleep(0.01)
    infill(url, input_prefix=long, n_predict=1, **session)  # supersedes it
    thread.join(30)
    timings = answer["timings"]
    assert answer["ponder"]["finish_reason"] == "cancelled" and answer["content"] == ""
    assert timings["cache_n"] == held and 0 < timings["prompt_n"] < answer["tokens_evaluated"] - held
    assert answer["tokens_cached"] == held + timings["prompt_n"] and timings["predicted_n"] == 0


# --- What neighbouring requests share.


def test_warm_up_request_answers_an_empty_object_and_primes_the_snippets(server, tokenizer):
    """llama.vim's ring update (exactly as it sends it): ``{}`` back, and the snippets are kept, so the
    next completion, which sends them before its prefix, reuses them."""
    url, _ = server
    extra = [{"text": "".join(f"import module_{i}\n" for i in range(20)), "time": 1.5, "filename": "a.py"}]
    warm = {"input_prefix": "", "input_suffix": "", "input_extra": extra, "prompt": "", "n_predict": 0, "temperature": 0.0,
            "stream": False, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1,
            "response_fields": [""]}
    assert infill(url, **warm) == {}
    got = infill(url, input_prefix="def f():\n    ", input_suffix="\n", input_extra=extra, n_predict=2)
    snippet = len(tokenizer.encode(prompts.snippet_text("a.py", extra[0]["text"])))
    assert got["timings"]["cache_n"] >= snippet // 4 * 4  # the snippet's whole chunks (and more)


def llama_vim(lines: list[str], row: int, col: int) -> dict:
    """The text llama.vim sends for a cursor at (row, col), both 0-based."""
    line = lines[row]
    return {
        "input_prefix": "".join(f"{text}\n" for text in lines[max(0, row - 256) : row]),
        "prompt": line[:col],
        "input_suffix": line[col:] + "\n" + "".join(f"{text}\n" for text in lines[row + 1 : row + 65]),
    }


def source_file(n: int) -> list[str]:
    lines = []
    for i in range(n // 4):
        lines += [f"def function_{i}(argument):", f"    result = argument * {i} + {i * i}", "    return result", ""]
    return lines


@pytest.mark.parametrize("row", [200, 330])  # the prefix starts at the file's top / moves with the cursor
def test_moving_the_cursor_three_lines_recomputes_little(server, row):
    url, _ = server
    lines = source_file(480)
    infill(url, **llama_vim(lines, row, 4), n_predict=4)
    got = infill(url, **llama_vim(lines, row + 3, 4), n_predict=4)
    timings = got["timings"]
    assert timings["prompt_n"] + timings["cache_n"] == got["tokens_evaluated"] > 800
    assert timings["prompt_n"] <= 0.2 * got["tokens_evaluated"], timings


# --- The layout's rules (server.prompts).


def test_the_suffix_is_read_in_whole_lines(tokenizer):
    t = tokenizer
    suffix = "\n" + "".join(f"    total += value_{i}\n" for i in range(40))
    assert t.decode(prompts.suffix_head(t, suffix)) == "".join(suffix.splitlines(True)[: prompts.SUFFIX_LINES])
    wide = "".join(f"value_{i} = compute({', '.join(str(j) for j in range(30))})\n" for i in range(16))
    head = t.decode(prompts.suffix_head(t, wide))  # 16 lines of far more than SUFFIX_TOKENS tokens: fewer lines
    assert head.endswith("\n") and wide.startswith(head) and 0 < len(t.encode(head)) <= prompts.SUFFIX_TOKENS
    assert len(prompts.suffix_head(t, "y = " + "1" * 5000)) == prompts.SUFFIX_TOKENS  # one line past the budget: cut


def test_the_prefix_starts_at_its_anchor_while_it_stays_in_view():
    lines = [f"line_{i} = {i * 7}" for i in range(600)]
    window = lambda first: "".join(f"{line}\n" for line in lines[first : first + 256]) + "    x"
    starts = []
    for first in range(0, 300, 3):  # llama.vim's window, moving down three lines at a time
        anchor = max(range(first, first + prompts.ANCHOR_LINES), key=lambda i: (prompts.anchor_strength(lines[i]), -i))
        assert prompts.stable_prefix(window(first)) == "".join(f"{line}\n" for line in lines[anchor : first + 256]) + "    x"
        starts.append(anchor)
    assert sum(a != b for a, b in itertools.pairwise(starts)) < len(starts) / 4  # the start held through most moves
    # Blank lines are never anchors; short prefixes, and the last KEEP_LINES lines, are never cut.
    assert prompts.anchor_strength(" \t") == -1 and prompts.stable_prefix("\n" * 500 + "x") == "\n" * 500 + "x"
    short = "".join(f"{line}\n" for line in lines[: prompts.KEEP_LINES - 6]) + "x"
    assert prompts.stable_prefix(short) == short
    four_more = "".join(f"{line}\n" for line in lines[: prompts.KEEP_LINES + 4]) + "x"  # 4 candidates
    assert four_more.endswith(prompts.stable_prefix(four_more)) and len(four_more) - len(prompts.stable_prefix(four_more)) < 60
    tail = "".join(f"{line}\n" for line in lines[:200]) + "y"
    assert prompts.stable_prefix(tail).endswith("".join(f"{line}\n" for line in lines[200 - prompts.KEEP_LINES : 200]) + "y")
