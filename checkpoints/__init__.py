"""The checkpoints that ship with ponder (data only; repository folder ``checkpoints/``).

``DEFAULT_CHECKPOINT`` is what ``ponder serve``, ``generate``, ``eval``,
``humaneval`` and ``inspect`` load when no ``--checkpoint`` is given. This
module imports nothing heavy, so the commands' parsers can name it.
"""

import importlib.resources
from pathlib import Path

DEFAULT_CHECKPOINT = Path(str(importlib.resources.files(__name__) / "default"))
