"""ponder: a code-completion server whose model keeps learning while it reads.

Everything installs under this one package (docs/design.md, "Layout"):

- ``ponder.model``: the GPT-2 base, the TTT layer and gate, tokenizers, checkpoints (repository folder ``model/``);
- ``ponder.train``: corpora, the two training stages, evaluation (``train/``);
- ``ponder.server``: the engine, HTTP and gRPC front ends, metrics, the λ viewer (``server/``);
- ``ponder.client``: the Python client and the commands that talk to a server, without JAX (``clients/python/``);
- ``ponder.v1``: the gRPC messages and stubs generated from ``protos/ponder/v1/completion.proto``;
- ``ponder.checkpoints``: the bundled default checkpoint (``checkpoints/``);
- ``ponder.cli``: the ``ponder`` command.
"""

__version__ = "0.1.0"
