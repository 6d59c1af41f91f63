"""The λ viewer: a document's text with each TTT chunk shaded by its λ, as one HTML page.

``clients.viewer.data`` runs a checkpoint over a document (the schedule's pass
and a SKIP pass) and returns an ``Inspection``: per chunk its text span, λ,
whether it was updated, and its cross-entropy with and without updates, plus
totals. ``clients.viewer.page.render_html`` turns that into a self-contained
page. ``ponder inspect FILE`` (``read_text``, then ``inspect_tokens``) and the server's ``GET /ui?session_id=ID`` are
thin front ends over the two.

This module holds only the CLI hook; the work is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _inspect(args: argparse.Namespace) -> None:
    from clients.viewer.data import inspect_tokens, read_text
    from clients.viewer.page import render_html
    from model import checkpoint
    from model.gating import schedule_from_arguments

    text = read_text(args.file)  # a file that cannot be shown fails before the model loads
    model, tokenizer = checkpoint.load(args.checkpoint)
    inspection = inspect_tokens(model, tokenizer, tokenizer.encode_document(text), schedule_from_arguments(args),
                                str(args.file))
    out = args.out if args.out is not None else Path(args.file.name + ".lambda.html")
    out.write_text(render_html(inspection, note=f"Checkpoint {args.checkpoint}."), encoding="utf-8")
    print(f"wrote {out}: {len(inspection.chunks)} chunks, {inspection.chunks_updated} updated, "
          f"mean λ {inspection.mean_lambda:.3f}", file=sys.stderr)


def add_command(commands, default_checkpoint: Path) -> None:
    """Adds ``ponder inspect`` to the ``ponder`` command's subparsers (``--checkpoint`` defaulting to
    ``default_checkpoint``, the server's bundled one)."""
    from model.gating import add_schedule_arguments

    p = commands.add_parser("inspect", help="render a file's per-chunk λ and loss (with / without updates) as an HTML page")
    p.add_argument("file", type=Path, help="a UTF-8 text file, read as one document")
    p.add_argument("--checkpoint", type=Path, default=default_checkpoint, help="a TTT checkpoint (default: the bundled one)")
    p.add_argument("--out", type=Path, help="the page to write (default: FILE's name + .lambda.html, here)")
    add_schedule_arguments(p)
    p.set_defaults(run=_inspect)
