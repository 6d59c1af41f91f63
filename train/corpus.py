"""Python source corpora found on this machine (no downloads).

For now this yields the texts the code tokenizer is trained on; the
training-data pipeline (deduplication, splits, packing) grows here.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def default_roots() -> list[Path]:
    """The interpreter's standard library."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def python_sources(roots: list[Path], max_bytes: int | None = None) -> Iterator[str]:
    """Yields the text of every UTF-8 ``.py`` file under ``roots``, in a stable order.

    Files that are not valid UTF-8 are skipped; iteration stops after ``max_bytes``.
    """
    total = 0
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            yield text
            total += len(text)
            if max_bytes is not None and total >= max_bytes:
                return
