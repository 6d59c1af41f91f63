"""ponder's gRPC contract, version 1: messages and stubs generated from ``completion.proto``.

``completion_pb2*.py`` are generated code, committed so that an install needs
no compiler; ``bash scripts/gen_protos.sh`` regenerates them after an edit of
the ``.proto``, and ``tests/test_protos.py`` fails while they disagree with it.
"""
