"""Where the files that ship beside the code live: the ``.proto`` and the bundled checkpoint.

A checkout (and an editable install) has them at the repository root,
``protos/`` and ``checkpoints/``; a wheel (``pip install .``) carries the
same folders as the packages ``ponder_protos`` and ``ponder_checkpoints``
(``[tool.setuptools.package-dir]`` in pyproject.toml).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def bundled(folder: str) -> Path:
    """The ``folder`` (``"protos"`` or ``"checkpoints"``) of the checkout, else of the installed wheel."""
    checkout = Path(__file__).resolve().parent.parent / folder
    spec = None if checkout.is_dir() else importlib.util.find_spec(f"ponder_{folder}")
    if spec is None:
        return checkout  # missing both ways: callers name this path in their error
    return Path(next(iter(spec.submodule_search_locations)))  # a folder without __init__.py: a namespace package
