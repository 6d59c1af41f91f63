"""The committed gRPC code (``ponder.v1``) is what the ``.proto`` compiles to today."""

import importlib
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT_DIR = Path(__file__).resolve().parent.parent

PROTO = "ponder/v1/completion.proto"


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def test_the_committed_stubs_match_the_proto(tmp_path):
    """A ``.proto`` edited without ``bash scripts/gen_protos.sh`` fails here, naming what differs."""
    out = tmp_path / "descriptor.pb"
    include = ROOT_DIR / "protos"
    assert protoc.main(["protoc", f"-I{include}", f"--descriptor_set_out={out}", str(include / PROTO)]) == 0
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    _drop_json_names(compiled.message_type)  # protoc's Python output leaves the defaults out
    pb = importlib.import_module("ponder.v1.completion_pb2")
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed.name == compiled.name == PROTO
    assert committed == compiled, "protos/ponder/v1/completion_pb2.py is stale: run bash scripts/gen_protos.sh"
    stubs = importlib.import_module("ponder.v1.completion_pb2_grpc")
    (service,) = compiled.service
    with grpc.insecure_channel("127.0.0.1:9") as channel:  # a stub connects lazily: nothing is dialled
        stub = stubs.CompletionStub(channel)
        for method in service.method:  # every RPC has a client stub method and a servicer method
            assert callable(getattr(stub, method.name)) and hasattr(stubs.CompletionServicer, method.name), method.name
