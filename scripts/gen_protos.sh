#!/usr/bin/env bash
# Regenerates the committed gRPC code (protos/ponder/v1/completion_pb2*.py[i]) from the .proto,
# importable as ponder.v1.completion_pb2. Run after editing protos/ponder/v1/completion.proto;
# tests/test_protos.py fails while the two disagree. Needs grpcio-tools (the test extra).
# The generated code asks for protobuf and grpcio at least as new as the generator: keep the
# lower bounds in pyproject.toml at the versions it names.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos --pyi_out=protos \
  protos/ponder/v1/completion.proto
grep -h "Protobuf Python Version\|^GRPC_GENERATED_VERSION" protos/ponder/v1/completion_pb2.py protos/ponder/v1/completion_pb2_grpc.py
