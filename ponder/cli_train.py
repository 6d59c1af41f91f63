"""``ponder train``: corpus, base (stage 1), ttt (stage 2), gate, policy and plot.

Thin commands over ``ponder.train``; each imports what it runs, and
``ponder.cli`` adds them to its parser with ``add_train_commands``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ponder.cli_schedule import add_schedule_arguments, schedule_from_args


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


def _join_processes(args: argparse.Namespace) -> None:
    """Multi-process training joins JAX's runtime before anything touches a device."""
    from ponder.train.sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def _train_base(args: argparse.Namespace) -> None:
    from ponder.model import checkpoint
    from ponder.model.config import GPTConfig
    from ponder.model.gpt2 import init_model
    from ponder.model.tokenizer import Tokenizer
    from ponder.train.stages import BaseStage

    _join_processes(args)
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

    _join_processes(args)
    _check_corpus(args.corpus)
    if (args.base is None) == (args.init_from is None):
        raise ValueError("give one of --base (a new TTT layer on a base) and --init-from (continue a TTT checkpoint)")
    if args.new_gate and args.init_from is None:
        raise ValueError("--new-gate goes with --init-from (a new TTT layer from --base has a new gate anyway)")
    if args.gate_only and args.init_from is None:
        raise ValueError("--gate-only goes with --init-from (it trains a gate for a TTT layer that is already trained)")
    schedule = schedule_from_args(args)
    if args.fast_weights != "ttt":
        return _train_fast_weights(args, schedule)
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
            gate=GateConfig(chunk=args.chunk or GateConfig.chunk, output="clip"),
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


def _train_fast_weights(args: argparse.Namespace, schedule) -> None:
    """Stage 2 of In-Place TTT (``model.inplace``) or LoRA fast weights (``model.lora``) on a frozen base."""
    from flax import nnx

    from ponder.model import checkpoint
    from ponder.model.inplace import SCHEDULES, InPlaceConfig, InPlaceLM, InPlaceLMConfig
    from ponder.model.lora import LoRAConfig, LoRALM, LoRALMConfig
    from ponder.train.stages import InPlaceStage, LoRAStage

    kind = args.fast_weights
    if schedule.kind not in SCHEDULES:
        raise ValueError(f"--fast-weights {kind} trains under --schedule {' / '.join(SCHEDULES)}, not {schedule.kind}")
    cls, stage_class = {"inplace": (InPlaceLM, InPlaceStage), "lora": (LoRALM, LoRAStage)}[kind]
    if args.init_from is not None:
        model, tokenizer = checkpoint.load(args.init_from)
        if not isinstance(model, cls):
            raise ValueError(f"--init-from {args.init_from} is not a --fast-weights {kind} checkpoint")
    else:
        model, tokenizer = checkpoint.load(args.base)
        base = model if not hasattr(model, "base") else model.base  # a fast-weight checkpoint lends its base
        cap = lambda default: default if args.max_update_norm is None else args.max_update_norm
        if kind == "inplace":
            config = InPlaceLMConfig(base.config, InPlaceConfig(
                layers=args.inplace_layers, chunk=args.chunk or InPlaceConfig.chunk, eta=args.inplace_eta,
                clip=cap(InPlaceConfig.clip)), eot_id=tokenizer.eot_id)
        else:
            config = LoRALMConfig(base.config, LoRAConfig(
                layers=args.lora_layers, rank=args.lora_rank,
                chunk=args.chunk or LoRAConfig.chunk, lr=args.lora_lr, clip=cap(LoRAConfig.clip),
                optimizer=args.lora_optimizer, targets=tuple(args.lora_targets.split(",")),
                objective=args.lora_objective), eot_id=tokenizer.eot_id)
        model = cls(config, rngs=nnx.Rngs(args.seed), base=base)
    if args.seq_len > model.config.base.n_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the base's context of {model.config.base.n_positions}")
    chunk = model.config.settings.chunk
    stage = stage_class(seq_len=args.seq_len, chunk=chunk, schedule=schedule)
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

    _join_processes(args)
    if _fast_weight_kind(args.init_from) == "lora":
        return _train_read_gate(args)
    model, tokenizer = _trained_ttt(args)
    config = model.config
    gate = GateConfig(chunk=config.gate.chunk, hidden=args.gate_hidden)
    model.config = dataclasses.replace(config, gate=gate)
    model.gate = GatingNetwork(gate, rngs=nnx.Rngs(args.seed))
    stage = ValueGateStage(seq_len=args.seq_len, chunk=gate.chunk, window=args.window, rates=(args.min_rate, args.max_rate))
    _train_run(args, stage, model, tokenizer)


def _fast_weight_kind(path: Path) -> str | None:
    """The fast-weight kind of a checkpoint (``ttt``, ``inplace``, ``lora``), None for a base checkpoint."""
    from ponder.model import checkpoint
    from ponder.model.config import GPTConfig

    config = checkpoint.load_config(path)
    return None if isinstance(config, GPTConfig) else getattr(config, "KIND", "ttt")


def _train_read_gate(args: argparse.Namespace) -> None:
    """``ponder train gate`` of a LoRA checkpoint: a fresh read gate (``model.read_gate``), regressed on
    what updating each chunk is worth (``train.stages.ReadGateStage``); the adapters' ``A0`` stays."""
    from flax import nnx

    from ponder.model import checkpoint
    from ponder.model.gating import GatingNetwork
    from ponder.model.lora import LoRALMConfig
    from ponder.train.stages import ReadGateStage

    _check_corpus(args.corpus)
    model, tokenizer = checkpoint.load(args.init_from)
    config, context = model.config, model.config.base.n_positions
    if args.seq_len > context:
        print(f"--seq-len {args.seq_len} is longer than the base's context: LoRA reads rows of {context} tokens",
              file=sys.stderr)
        args.seq_len = context
    model.config = dataclasses.replace(config, gate=LoRALMConfig.read_gate(config.lora.chunk, args.gate_hidden))
    model.gate = GatingNetwork(model.config.gate, rngs=nnx.Rngs(args.seed))
    model.gate.out.bias[...] = 0.0 * model.gate.out.bias[...]  # the worth is small: the fit starts at 0
    stage = ReadGateStage(seq_len=args.seq_len, chunk=config.lora.chunk, min_after=args.min_after)
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


def add_train_commands(commands) -> None:
    from ponder.model.gating import GateConfig
    from ponder.model.inplace import InPlaceConfig
    from ponder.model.lora import OBJECTIVES, OPTIMIZERS, LoRAConfig
    from ponder.model.ttt import TTTConfig
    from ponder.model.ttt_lm import TTTLMConfig
    from ponder.train.policy import PolicyConfig
    from ponder.train.stages import ReadGateStage, TTTStage, ValueGateStage
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
        p.add_argument("--coordinator", metavar="HOST:PORT",
                       help="multi-process training: process 0's address, which it serves (README 'Training on several machines')")
        p.add_argument("--num-processes", type=int, help="multi-process training: processes in all")
        p.add_argument("--process-id", type=int, help="multi-process training: this process's index, 0 to N-1")
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
    ttt.add_argument("--fast-weights", default="ttt", choices=["ttt", "inplace", "lora"],
                     help="ttt: a TTT layer on the base; inplace: the top blocks' MLP down projections (In-Place TTT); "
                          "lora: low-rank adapters of the top blocks, trained on the text read (dynamic evaluation)")
    ttt.add_argument("--inplace-layers", type=int, default=InPlaceConfig.layers,
                     help="--fast-weights inplace: how many top blocks have fast W_down")
    ttt.add_argument("--inplace-eta", type=float, default=InPlaceConfig.eta, help="--fast-weights inplace: step size")
    ttt.add_argument("--lora-layers", type=int, default=LoRAConfig.layers,
                     help="--fast-weights lora: how many top blocks have adapters (at most the base's blocks)")
    ttt.add_argument("--lora-rank", type=int, default=LoRAConfig.rank, help="--fast-weights lora: adapter rank")
    ttt.add_argument("--lora-lr", type=float, default=LoRAConfig.lr, help="--fast-weights lora: step size (times lam)")
    ttt.add_argument("--lora-optimizer", default=LoRAConfig.optimizer, choices=OPTIMIZERS,
                     help="--fast-weights lora: the per-document optimizer")
    ttt.add_argument("--lora-objective", default=LoRAConfig.objective, choices=OBJECTIVES,
                     help="--fast-weights lora: what each update descends: lm, the chunk's next-token cross-entropy; "
                          "ssl, the cosine distance of the top hidden state to the next token's embedding (no LM head)")
    ttt.add_argument("--lora-targets", default=",".join(LoRAConfig.targets),
                     help="--fast-weights lora: comma-separated projections with adapters, among q, v, mlp")
    ttt.add_argument("--ttt-kind", default=TTTConfig.kind, choices=["linear", "mlp"])
    ttt.add_argument("--ttt-heads", type=int, default=TTTConfig.n_head)
    ttt.add_argument("--ttt-layers", type=int, default=TTTLMConfig.n_ttt_layers)
    ttt.add_argument("--mini-batch", type=int, default=TTTConfig.mini_batch)
    ttt.add_argument("--ttt-base-lr", type=float,
                     help="base learning rate of the fast weights (eta = base_lr * lam * tau * sigma / head dim; "
                          "default 1, or the --init-from checkpoint's)")
    ttt.add_argument("--chunk", type=int, help=f"tokens per lam (default: {GateConfig.chunk} for ttt and inplace, "
                     f"{LoRAConfig.chunk} for lora)")
    ttt.add_argument("--max-update-norm", type=float, default=TTTConfig.max_update_norm)
    add_schedule_arguments(ttt)
    ttt.add_argument("--beta", type=float, default=TTTStage.beta, help="weight of the TTT reconstruction loss")
    ttt.add_argument("--gamma", type=float, default=TTTStage.gamma, help="weight of mean(lam), the compute penalty")
    ttt.set_defaults(run=_train_ttt)

    gate = stages.add_parser("gate", help="stage 2b: a fresh value gate for a trained TTT layer or LoRA checkpoint "
                                          "(the fast weights' slow parameters stay frozen)")
    common(gate, TrainConfig.ttt(seq_len=2048, batch_size=2, lr=1e-3, warmup=20))
    gate.add_argument("--init-from", type=Path, required=True, help="the TTT or LoRA checkpoint whose gate to replace")
    gate.add_argument("--window", type=int, default=1024,
                      help="base attention window in tokens (rows longer than it run window by window)")
    gate.add_argument("--gate-hidden", type=int, default=GateConfig.hidden, help="width of the gating MLP")
    gate.add_argument("--min-rate", type=float, default=ValueGateStage.rates[0],
                      help="the random behaviour's update rate is drawn per row between --min-rate and --max-rate")
    gate.add_argument("--max-rate", type=float, default=ValueGateStage.rates[1])
    gate.add_argument("--min-after", type=int, default=ReadGateStage.min_after,
                      help="LoRA: a chunk counts when its piece has at least this many scored tokens after it")
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
