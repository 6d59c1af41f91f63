"""``ponder bench-code``: pass@k on HumanEval, MBPP or ClassEval (``ponder humaneval`` is its HumanEval form).

A thin command over ``ponder.train.code_bench``; ``ponder.cli`` adds it to
its parser with ``add_bench_commands``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.cli_schedule import add_schedule_arguments, schedule_from_args


def _bench_code(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.generate import SamplingParams, generate_text
    from ponder.train import code_bench

    suite = code_bench.SUITES[args.suite]
    problems = suite.load(args.data)[: args.max_problems]  # a missing or malformed file fails before the model loads
    if args.allow_code_execution and not args.unsafe_no_sandbox:
        code_bench.check_sandbox()  # so does a machine without the sandbox
    model, tokenizer = checkpoint.load(args.checkpoint)
    schedule = schedule_from_args(args)

    def generate(prompt: str, stop: tuple[str, ...], index: int) -> str:
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=0.95,
                                seed=index, stop=stop)
        return generate_text(model, tokenizer, tokenizer.encode_document(prompt), params, schedule=schedule).text

    if args.unsafe_no_sandbox and args.allow_code_execution:
        print("warning: --unsafe-no-sandbox: the model's code runs without isolation, with this user's access to "
              "the network, files and processes", file=sys.stderr)
    report = code_bench.run(suite, problems, generate, args.out, args.samples, args.k or [1], args.allow_code_execution,
                            unsafe_no_sandbox=args.unsafe_no_sandbox, about={"schedule": args.schedule})
    print(json.dumps(report, indent=2))
    if not args.allow_code_execution:
        print(f"wrote {args.out}/samples.jsonl without running it: pass --allow-code-execution to execute the "
              "model-written code (in a bubblewrap sandbox) and score pass@k", file=sys.stderr)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, help="the suite's official problem file (HumanEval: the bundled one "
                        "by default; MBPP: mbpp.jsonl or sanitized-mbpp.json; ClassEval: ClassEval_data.json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=1, help="completions per problem")
    parser.add_argument("--k", type=int, action="append", help="k of pass@k (repeatable; default 1)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per generation (ClassEval: per method)")
    parser.add_argument("--max-problems", type=int)
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="execute the completions, each in a bubblewrap (bwrap) sandbox: no network, no host "
                             "processes or files, limited CPU, memory and processes")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="with --allow-code-execution where bwrap is missing: run the completions in a plain "
                             "subprocess, without isolation")
    add_schedule_arguments(parser)
    parser.set_defaults(run=_bench_code, k=None)


def add_bench_commands(commands) -> None:
    from ponder.train.code_bench import SUITES

    bench = commands.add_parser("bench-code", help="pass@k on HumanEval, MBPP or ClassEval (runs model-written code "
                                "only when allowed)")
    bench.add_argument("--suite", required=True, choices=list(SUITES))
    _add_arguments(bench)
    humaneval = commands.add_parser("humaneval", help="HumanEval pass@k: bench-code --suite humaneval")
    _add_arguments(humaneval)
    humaneval.set_defaults(suite="humaneval")
