"""The sandbox that model-written code runs in, and code execution only when asked.

The sandbox tests run each way out that a candidate once had (a socket to a loopback listener,
``reload(socket)``, the harness's environment through ``/proc``, files outside the work directory,
a shell, a grandchild that outlives the timeout, a fork bomb) and check on the host that it failed.
"""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ponder.train import sandbox


def processes_with(marker: str) -> list[int]:
    """Host PIDs whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def test_sandbox_passes_good_code_and_contains_bad_code(sandboxed):
    assert sandbox.run_candidate("assert sum([1, 2]) == 3\n") == (True, "passed")
    ok, why = sandbox.run_candidate("assert 1 == 2\n")
    assert not ok and "AssertionError" in why
    assert sandbox.run_candidate("while True:\n    pass\n", timeout_s=3, cpu_s=1)[0] is False
    assert sandbox.run_candidate("x = bytearray(4 << 30)\n", memory_mb=256)[0] is False
    assert sandbox.run_candidate("open('big', 'w').write('x' * (8 << 20))\n")[0] is False
    assert sandbox.run_candidate("open('small', 'w').write('x' * 1000)\n") == (True, "passed")  # the work dir


def test_sandbox_has_no_network(sandboxed):
    """Its own network namespace: the host's loopback listener is out of reach, however the socket is made."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for candidate in (f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))\n",
                          (f"import importlib, socket\nimportlib.reload(socket)\n"
                           f"socket.create_connection(('127.0.0.1', {port}), timeout=5)\n")):
            ok, why = sandbox.run_candidate(candidate)
            assert not ok and "ConnectionRefusedError" in why, (candidate, why)
            with pytest.raises(BlockingIOError):  # nothing reached the listener
                listener.accept()


def test_sandbox_hides_the_harness_environment(sandboxed):
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
    harness = f"from ponder.train import sandbox\nprint(sandbox.run_candidate({candidate!r}))\n"
    result = subprocess.run([sys.executable, "-c", harness], env={**os.environ, "PONDER_TEST_SECRET": marker},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "(True, 'passed')", result.stdout + result.stderr


def test_sandbox_cannot_write_outside_its_work_dir(sandboxed, tmp_path):
    """Nothing a candidate writes lands on the host: the root is read-only and binds no host folder but
    read-only ones (a host path under /tmp, made inside the sandbox, is in the sandbox's own tmpfs)."""
    marker = f"escaped-{uuid.uuid4().hex}"
    outside = tmp_path / marker
    beside = Path(tempfile.gettempdir()) / marker  # next to the old harness's temporary work dir
    try:
        sandbox.run_candidate(f"import os\nos.makedirs({str(tmp_path)!r}, exist_ok=True)\n"
                                f"open({str(outside)!r}, 'w').write('x')\n")
        ok, why = sandbox.run_candidate(f"open('../{marker}', 'w').write('x')\n")
        assert not ok and "Read-only file system" in why, why
        assert not outside.exists() and not beside.exists()
    finally:
        beside.unlink(missing_ok=True)


def test_sandbox_has_no_shell_and_no_privilege(sandboxed):
    """'sh -c id' fails: the sandbox holds no shell (no /bin, /usr/bin or /etc; only the interpreter and the
    shared libraries), and the interpreter, the one program there is, runs as nobody with no capability."""
    for shell in ("sh", "/bin/sh", "/usr/bin/sh"):
        ok, why = sandbox.run_candidate(f"import subprocess\nsubprocess.run([{shell!r}, '-c', 'id'], check=True)\n")
        assert not ok and "FileNotFoundError" in why, why
    identity = ("import os\n"
                "assert (os.getuid(), os.geteuid(), os.getgid()) == (65534, 65534, 65534), os.getuid()\n"
                "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
                "assert int(status['CapEff'], 16) == int(status['CapPrm'], 16) == 0, status['CapEff']\n"
                "assert status['NoNewPrivs'].strip() == '1'\n"
                "assert not any(map(os.path.exists, ('/etc', '/bin/sh', '/usr/bin/sh', '/usr/bin/id', '/usr/sbin')))\n")
    assert sandbox.run_candidate(identity) == (True, "passed")


def test_sandbox_kills_every_process_at_the_timeout(sandboxed):
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
    assert sandbox.run_candidate(candidate, timeout_s=2) == (False, "timed out")
    assert time.monotonic() - start < 5
    assert processes_with(marker) == []


def test_sandbox_contains_a_fork_bomb(sandboxed):
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
    ok, why = sandbox.run_candidate(counted, processes=16)
    assert not ok and why.startswith("refused after") and int(why.split()[-1]) < 16, why
    marker = f"bomb-{uuid.uuid4().hex}"
    bomb = f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    assert sandbox.run_candidate(bomb, timeout_s=3, processes=16) == (False, "timed out")
    assert time.monotonic() - start < 6
    assert processes_with(marker) == []


def test_without_bwrap_code_runs_only_when_unsafe_is_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap.*--unsafe-no-sandbox"):
        sandbox.run_candidate("assert True\n")
    assert sandbox.run_candidate("assert True\n", unsafe_no_sandbox=True) == (True, "passed")
    assert sandbox.run_candidate("assert False\n", unsafe_no_sandbox=True)[0] is False
