"""The ``ponder`` command: thin subcommands over the library packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "default"


def _generate(args: argparse.Namespace) -> None:
    from model import checkpoint
    from model.generate import Completion, SamplingParams, stream_text

    model, tokenizer = checkpoint.load(args.checkpoint)
    params = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
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
    from model import checkpoint
    from model.config import GPTConfig
    from model.gpt2 import init_model
    from model.tokenizer import Tokenizer
    from train.corpus import default_roots, python_sources

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
    from model import checkpoint, hf

    if args.from_hf:
        model, tokenizer = hf.import_hf(args.from_hf)
        path = checkpoint.save(args.out, model, tokenizer, overwrite=args.overwrite)
    else:
        model, tokenizer = checkpoint.load(args.to_hf)
        path = hf.export_hf(model, tokenizer, args.out)
    print(f"wrote {path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete a prompt with a checkpoint")
    gen.add_argument("prompt", nargs="?", default="", help="text to continue (default: start a new document)")
    gen.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
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
    source.add_argument("--to-hf", type=Path, help="ponder checkpoint to export")
    conv.add_argument("--out", type=Path, required=True)
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.checkpoint import CheckpointError
    from model.hf import ConversionError

    try:
        args.run(args)
    except (CheckpointError, ConversionError, ValueError, FileNotFoundError) as err:
        print(f"ponder {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
