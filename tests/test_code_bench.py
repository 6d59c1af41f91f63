"""``ponder bench-code``: HumanEval, MBPP and ClassEval prompts, programs and pass@k; execution only when asked.

MBPP and ClassEval are not shipped by any package here: ``tests/fixtures``
holds a few problems of our own in each benchmark's official file format.
The known-good solutions of every suite pass in the sandbox and wrong ones
fail, which checks that the programs built around a solution run the
benchmark's tests.
"""

import json
from pathlib import Path

import pytest

from ponder import cli as ponder_cli
from ponder.train import code_bench, sandbox
from ponder.train.code_bench import SUITES

FIXTURES = Path(__file__).parent / "fixtures"


def passes(suite, problem, completion) -> bool:
    return sandbox.run_candidate(suite.program(problem, completion))[0]


def canned(answers: dict[str, str], prompts: list[str]):
    """A generator that records its prompts and answers by the name of the function the prompt ends in."""
    def generate(prompt, stop, index):
        prompts.append(prompt)
        return next(answer for key, answer in answers.items() if prompt.rsplit("def ", 1)[-1].startswith(key))
    return generate


def test_humaneval_canonical_solutions_pass_and_pass_at_k(sandboxed):
    suite = SUITES["humaneval"]
    problems = suite.load(None)
    assert len(problems) == 164
    for p in problems[:3]:
        assert passes(suite, p, p["canonical_solution"]), p["task_id"]
        assert not passes(suite, p, "    return None\n"), p["task_id"]
    assert code_bench.pass_at_k({"a": [True, False], "b": [False, False]}, [1, 2]) == {"pass@1": 0.25, "pass@2": 0.5}
    assert suite.solve(problems[0], lambda *a: "    return x\n\ndef other():\n    pass", 0) == "    return x\n"


def test_mbpp_reads_the_test_split_and_prompts_with_the_first_test(sandboxed):
    suite = SUITES["mbpp"]
    problems = suite.load(FIXTURES / "mbpp.jsonl")
    assert [p["task_id"] for p in problems] == [11, 12]  # task 3 is outside the test split (11-510)
    first = problems[0]
    assert suite.prompt(first) == ('"""\nWrite a function to return the sum of the squares of a list of numbers.\n'
                                   'assert sum_squares([1, 2, 3]) == 14\n"""\n')
    for p in problems:  # the reference code passes every test, with the task's setup code run first
        assert passes(suite, p, p["code"].replace("\r\n", "\n")), p["task_id"]
    wrong = "def sum_squares(xs):\n    return sum(xs)\n"  # passes the first test only
    assert not passes(suite, first, wrong)
    generated = "def sum_squares(xs):\n    return sum(x * x for x in xs)\n\nassert sum_squares([2]) == 0\n"
    assert suite.solve(first, lambda *a: generated, 0) == "def sum_squares(xs):\n    return sum(x * x for x in xs)\n"


def test_mbpp_sanitized_format_and_bad_files(tmp_path):
    suite = SUITES["mbpp"]
    sanitized = [{"task_id": 11, "prompt": "Square a number.", "code": "def sq(x):\n    return x * x",
                  "test_imports": ["import math"], "test_list": ["assert sq(3) == 9"]}]
    (tmp_path / "sanitized-mbpp.json").write_text(json.dumps(sanitized))
    [problem] = suite.load(tmp_path / "sanitized-mbpp.json")
    assert suite.prompt(problem) == '"""\nSquare a number.\nassert sq(3) == 9\n"""\n'
    assert suite.program(problem, problem["code"]).startswith("\nimport math\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": 11, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="MBPP task 11 lacks test_list"):
        suite.load(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="--suite mbpp needs --data"):
        suite.load(None)


def test_classeval_generates_method_by_method_and_runs_the_class_tests(sandboxed):
    suite = SUITES["classeval"]
    [problem] = suite.load(FIXTURES / "classeval.json")
    bodies = {m["method_name"]: m["solution_code"][len(m["method_description"]):].lstrip("\n") for m in problem["methods_info"]}
    prompts: list[str] = []
    solution = suite.solve(problem, canned({name + "(": body + "\n    def next(self):\n" for name, body in
                                            bodies.items()}, prompts), 0)
    assert len(prompts) == 2
    assert prompts[0].startswith("from collections import Counter\n\nclass Tally:")
    assert prompts[0].endswith(problem["methods_info"][0]["method_description"] + "\n")
    assert "self.counts[key] += 1" in prompts[1]  # the second method sees the first one as generated
    assert "def next" not in solution  # each method is cut where the next member begins
    assert passes(suite, problem, solution)
    assert passes(suite, problem, problem["solution_code"])
    broken = solution.replace("return top[0][0] if top else None", "return None")
    assert not passes(suite, problem, broken)  # one failing test fails the class
    assert not passes(suite, problem, suite.header(problem))  # methods missing: an error, not a pass


def test_classeval_refuses_a_file_without_its_fields(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"task_id": "C0", "test": ""}]))
    with pytest.raises(ValueError, match="ClassEval class C0 lacks import_statement, class_constructor, methods_info"):
        SUITES["classeval"].load(tmp_path / "c.json")


def _fake_model(monkeypatch, prompts=None):
    from ponder.model.generate import Completion

    monkeypatch.setattr("ponder.model.checkpoint.load", lambda path: (None, type("T", (), {"encode_document": lambda s, t: [0]})()))

    def generate_text(model, tokenizer, prompt, params, schedule):
        if prompts is not None:
            prompts.append((params.stop, schedule.kind))
        return Completion("    return 1\n", [1], "stop")

    monkeypatch.setattr("ponder.model.generate.generate_text", generate_text)


def test_cli_does_not_execute_without_the_flag(tmp_path, capsys, monkeypatch):
    calls, prompts = [], []
    monkeypatch.setattr(code_bench, "run_candidate", lambda *a, **k: calls.append(a) or (True, "passed"))
    _fake_model(monkeypatch, prompts)
    assert ponder_cli.main(["humaneval", "--out", str(tmp_path), "--max-problems", "2"]) == 0
    assert not calls and "--allow-code-execution" in capsys.readouterr().err
    assert json.loads((tmp_path / "humaneval.json").read_text())["executed"] is False
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(code_bench, "check_sandbox", lambda: None)
    command = ["bench-code", "--suite", "mbpp", "--data", str(FIXTURES / "mbpp.jsonl"), "--out", str(tmp_path),
               "--allow-code-execution", "--schedule", "skip"]
    assert ponder_cli.main(command) == 0
    report = json.loads((tmp_path / "mbpp.json").read_text())
    assert len(calls) == 2 and report["pass@1"] == 1.0 and report["schedule"] == "skip"
    assert prompts[-1] == (SUITES["mbpp"].stop, "skip")  # the suite's stop sequences and the schedule asked for


def test_cli_refuses_to_execute_without_bwrap_unless_unsafe(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(code_bench, "run_candidate", lambda program, **k: calls.append(k) or (True, "passed"))
    _fake_model(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    command = ["humaneval", "--out", str(tmp_path / "out"), "--max-problems", "2", "--allow-code-execution"]
    assert ponder_cli.main(command) == 2
    err = capsys.readouterr().err
    assert "ponder humaneval: error:" in err and "bwrap" in err and "--unsafe-no-sandbox" in err
    assert not calls and not (tmp_path / "out" / "samples.jsonl").exists()  # refused before generating
    assert ponder_cli.main([*command, "--unsafe-no-sandbox"]) == 0
    assert calls == [{"unsafe_no_sandbox": True}] * 2 and "without isolation" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "humaneval.json").read_text())["sandbox"] == "none"


def test_cli_needs_the_data_of_suites_not_shipped_here(tmp_path, capsys):
    assert ponder_cli.main(["bench-code", "--suite", "classeval", "--out", str(tmp_path)]) == 2
    assert "--suite classeval needs --data" in capsys.readouterr().err
