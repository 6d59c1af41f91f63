"""The gRPC stubs, generated from ``protos/ponder/v1/completion.proto`` on first import.

The ``.proto`` is the contract; the generated ``*_pb2.py`` files are build
output, never edited or committed. They are written by ``grpc_tools.protoc``
into ``protos/gen/`` (git-ignored; for an installed wheel whose folder is
read-only, into ``$XDG_CACHE_HOME/ponder/protos-gen``) whenever they are
missing or older than the ``.proto``; generation goes to a temporary
directory that is renamed into place, so processes starting together cannot
see half-written files.

Usage: ``from server.protos import completion_pb2, completion_pb2_grpc``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from server.assets import bundled

PROTO = bundled("protos") / "ponder" / "v1" / "completion.proto"


def _output() -> Path:
    if os.access(PROTO.parents[2], os.W_OK):
        return PROTO.parents[2] / "gen"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ponder" / "protos-gen"


GENERATED = _output()


def _stale() -> bool:
    out = GENERATED / "completion_pb2.py"
    return not out.exists() or out.stat().st_mtime < PROTO.stat().st_mtime


def generate() -> Path:
    """(Re)generates the stubs if needed; returns their directory."""
    if not _stale():
        return GENERATED
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    GENERATED.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=GENERATED.parent))
    try:
        args = [
            "protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO)
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        if _stale():  # another process may have finished first
            old = GENERATED.parent / f".old-{os.getpid()}"
            if GENERATED.exists():
                GENERATED.rename(old)
            tmp.rename(GENERATED)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GENERATED


sys.path.insert(0, str(generate()))  # the generated grpc module imports ``completion_pb2`` by that name
completion_pb2 = importlib.import_module("completion_pb2")
completion_pb2_grpc = importlib.import_module("completion_pb2_grpc")
