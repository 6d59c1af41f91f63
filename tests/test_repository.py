"""Rules of the repository itself: documents the code cites exist, and imports point one way."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("ponder", "model", "train", "server", "clients", "protos", "bench", "tests")
           for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name]
# A path to a .md file, optionally followed by the quoted name of one of its sections (as code cites the design document).
CITATION = re.compile(r'([\w./-]+\.md)(?:,\s*"([^"]+)")?')


def test_every_document_the_code_cites_is_in_the_repository():
    sections = {m.group(1) for m in re.finditer(r"^## (.+)$", (ROOT / "docs/design.md").read_text(), re.M)}
    cited = 0
    for path in SOURCES:
        text = path.read_text()
        old = "DESIGN" + ".md"  # spelled apart so that this file does not cite it
        assert old not in text, f"{path.relative_to(ROOT)} cites {old}, which is not in the repository"
        for match in CITATION.finditer(text):
            document, section = match.groups()
            if "/" not in document:
                continue  # a file name in prose or a test's own data, not a citation
            assert (ROOT / document).is_file(), f"{path.relative_to(ROOT)} cites {document}, which does not exist"
            if section and document == "docs/design.md":
                first = section.split('" to "')[0]
                assert first in sections, f"{path.relative_to(ROOT)} cites section {first!r} of docs/design.md"
            cited += 1
    assert cited > 10  # the pattern does find the citations


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_imports_point_down():
    """entry points -> server / train / client -> model; the client needs neither JAX nor the server."""
    forbidden = {
        "model": ("ponder.server", "ponder.train", "ponder.client", "ponder.cli"),
        "train": ("ponder.server", "ponder.client", "ponder.cli"),
        "server": ("ponder.train", "ponder.client", "ponder.cli"),
        "clients/python": ("ponder.model", "ponder.server", "ponder.train", "ponder.cli", "jax", "flax", "numpy"),
    }
    for folder, banned in forbidden.items():
        files = list((ROOT / folder).rglob("*.py"))
        assert files
        for path in files:
            bad = sorted(name for name in _imports(path) if any(name == b or name.startswith(b + ".") for b in banned))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
