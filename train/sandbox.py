"""Where model-written code runs: ``run_candidate`` executes one program inside a bubblewrap sandbox.

``ponder bench-code`` (``train.code_bench``) executes the programs it builds
only when the caller passes ``--allow-code-execution``, and then here, in a
bubblewrap (``bwrap``) sandbox: new network, PID, IPC and UTS namespaces
(no network at all, no host process visible, the whole tree killed with its
PID 1 at the timeout), a root that holds only read-only binds of the shared
libraries and this interpreter (no shell or ``/usr/bin`` tools, no ``/etc``,
no home), a small tmpfs as the work directory, an empty environment, a new
session, no capabilities, no new privileges, and limits on CPU time, address
space, file size and processes. The process limit needs a user other than
root (the kernel exempts root from it): run as root, bwrap keeps only
CAP_SETUID/CAP_SETGID and the candidate's interpreter becomes ``nobody``
before the candidate's code is reached; run as anyone else, bwrap maps the
caller to ``nobody`` in a new user namespace. Without bwrap, code runs only
when the caller passes ``unsafe_no_sandbox`` (``--unsafe-no-sandbox``): a
limited subprocess with no isolation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NOBODY = 65534
WORKDIR = "/tmp"  # inside the sandbox: a tmpfs of WORKDIR_MB, the only writable place
WORKDIR_MB = 16
# The environment of bwrap itself (its PID 1 is the candidate's parent) and of the candidate.
ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8"}
OR_UNSAFE = "or pass --unsafe-no-sandbox to run the model's code without isolation"


class SandboxUnavailable(RuntimeError):
    """bwrap is missing, or cannot make a sandbox on this machine."""


def _prelude(cpu_s: int, memory_mb: int, processes: int | None) -> str:
    """Python that runs before the candidate's code: its limits, and in the sandbox (``processes`` given) RLIMIT_NPROC
    and the step from root to nobody.

    The limits are set here, not in the parent between fork and exec, because the parent may have threads
    (JAX's). RLIMIT_NPROC set inside the sandbox's user namespace counts the sandbox's processes, not every
    process of the caller's user; root, whom the kernel exempts from it, gives up root.
    """
    limits = {"RLIMIT_CPU": cpu_s, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": 1 << 20, "RLIMIT_CORE": 0}
    if processes is not None:
        limits["RLIMIT_NPROC"] = processes
    lines = ["import os as _os, resource as _resource"]
    lines += [f"_resource.setrlimit(_resource.{name}, ({value}, {value}))" for name, value in limits.items()]
    if processes is not None:
        lines += ["if _os.getuid() == 0:", f"    _os.setgroups([]); _os.setgid({NOBODY}); _os.setuid({NOBODY})"]
    return "\n".join([*lines, "del _os, _resource", ""])


def _read_only_binds() -> list[str]:
    """bwrap arguments that show the sandbox the shared libraries and this interpreter, read-only, and nothing else."""
    args = []
    for top in ("/lib", "/lib32", "/lib64", "/libx32"):  # merged /usr: symlinks into /usr
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    # The base interpreter (not a venv's link to it), libpython and the standard library.
    wanted = ["/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32", os.path.realpath(sys.executable),
              sysconfig.get_config_var("LIBDIR"), os.path.dirname(os.__file__)]
    bound: list[str] = []
    made: set[str] = set()
    for path in sorted({os.path.realpath(p) for p in wanted if p and os.path.exists(p)}):
        if any(path.startswith(b + os.sep) for b in bound):
            continue
        bound.append(path)
        for parent in reversed(Path(path).parents[:-1]):  # bwrap would make them 0700: unreadable once nobody
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", path, path]
    return args


def _sandbox_argv(bwrap: str, source: str) -> list[str]:
    if os.geteuid() == 0:  # privileged bwrap: no capability but the two the prelude needs to become nobody
        identity = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        identity = ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    environment = [arg for name, value in ENV.items() for arg in ("--setenv", name, value)]
    return [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            *identity, "--die-with-parent", "--new-session", *_read_only_binds(), "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(WORKDIR_MB << 20), "--tmpfs", WORKDIR, "--remount-ro", "/",
            "--chdir", WORKDIR, "--clearenv", *environment,
            "--", os.path.realpath(sys.executable), "-I", "-c", source]


@functools.cache
def _sandbox_works(bwrap: str) -> None:
    """Runs an empty program in the sandbox once per process; SandboxUnavailable with bwrap's own message if it fails."""
    returncode, stderr = _execute(_sandbox_argv(bwrap, _prelude(10, 1024, processes=8) + "pass"), 30.0)
    if returncode != 0:
        raise SandboxUnavailable(f"bwrap could not make a sandbox here (it needs user namespaces, or root): "
                                 f"{stderr.strip() or f'exit status {returncode}'}; fix that, {OR_UNSAFE}")


def check_sandbox() -> str:
    """The path of ``bwrap`` once it has run a sandbox on this machine; ``SandboxUnavailable`` says why not."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("running model-written code needs the bubblewrap sandbox and `bwrap` is not on "
                                 "PATH: install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: "
                                 f"dnf install bubblewrap), {OR_UNSAFE}")
    _sandbox_works(bwrap)
    return bwrap


def _execute(argv: list[str], timeout_s: float, cwd: str = "/") -> tuple[int | None, str]:
    """``(returncode, stderr)`` of ``argv`` in a new session; at the timeout its process group is killed: ``(None, "")``."""
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, errors="replace", cwd=cwd, env=ENV, start_new_session=True) as proc:
        try:
            stderr = proc.communicate(timeout=timeout_s)[1]
        except subprocess.TimeoutExpired:
            # The group is bwrap and the sandbox's PID 1 (the candidate is in a session of its own): once
            # PID 1 dies the kernel kills everything else in its namespace, and the pipe reaches EOF when
            # the last process holding it is gone. Unsandboxed, a process that left the group can hold it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=2.0)
            return None, ""
    return proc.returncode, stderr


def run_candidate(program: str, timeout_s: float = 10.0, cpu_s: int = 5, memory_mb: int = 1024,
                  processes: int = 64, unsafe_no_sandbox: bool = False) -> tuple[bool, str]:
    """Runs ``program`` in the sandbox: ``(passed, why)`` (why: "passed", "timed out" or the error's last line).

    Args:
        processes: RLIMIT_NPROC inside the sandbox (threads count too; run as root, it counts every
            process of the host's ``nobody``).
        unsafe_no_sandbox: without bwrap, run ``program`` anyway in a plain subprocess (a temporary
            directory, the same CPU, memory and file limits, its process group killed at the timeout)
            that can reach the network, the host's files and processes.

    Raises:
        SandboxUnavailable: bwrap is missing or cannot make a sandbox here, and ``unsafe_no_sandbox`` is false.
    """
    if unsafe_no_sandbox:
        with tempfile.TemporaryDirectory() as workdir:
            source = _prelude(cpu_s, memory_mb, processes=None) + program
            returncode, stderr = _execute([sys.executable, "-I", "-c", source], timeout_s, cwd=workdir)
    else:
        source = _prelude(cpu_s, memory_mb, processes) + program
        returncode, stderr = _execute(_sandbox_argv(check_sandbox(), source), timeout_s)
    if returncode is None:
        return False, "timed out"
    if returncode == 0:
        return True, "passed"
    lines = stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit status {returncode}"

