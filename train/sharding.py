"""Data-parallel and sharded training on a JAX device mesh (docs/design.md, "Scaling out").

Sharding is data: parameters carry logical axis names
(``model.gpt2.LOGICAL_AXES``, matched on the end of each parameter's path),
and one rule table maps logical names to mesh axes. Layer code never names a
mesh axis. The default mesh is one device and every rule maps to nothing, so
the default is no sharding.

    mesh = make_mesh("data=2,model=2")
    model, optimizer = shard((model, optimizer), mesh)   # parameters and optimiser moments
    batch = shard_batch(batch, mesh)                     # rows over "data"

Under ``jit`` XLA's SPMD partitioner then splits the step across devices; the
result equals the one-device step up to float reassociation (a test holds it
to 1e-5).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ponder.model.gpt2 import LOGICAL_AXES

# Logical axis -> mesh axis. "heads" and "mlp" split over "model" (Megatron-style
# column/row sharding); everything else is replicated; batch rows split over "data".
DEFAULT_RULES = {"batch": "data", "heads": "model", "mlp": "model", "vocab": None, "embed": None}


def make_mesh(spec: str = "data=1", devices=None) -> Mesh:
    """A mesh from ``"axis=size,..."`` (``data`` and ``model`` axes; a missing one has size 1)."""
    sizes = {"data": 1, "model": 1}
    for part in filter(None, spec.split(",")):
        name, _, size = part.partition("=")
        if name not in sizes or not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh spec {spec!r}: expected entries like data=4 or model=2, got {part!r}")
        sizes[name] = int(size)
    devices = jax.devices() if devices is None else devices
    need = sizes["data"] * sizes["model"]
    if need > len(devices):
        raise ValueError(f"mesh {spec!r} needs {need} devices; {len(devices)} are available")
    return Mesh(np.asarray(devices[:need]).reshape(sizes["data"], sizes["model"]), ("data", "model"))


def logical_axes(path: tuple) -> tuple | None:
    """The logical axis names of the parameter at ``path`` (a state path), or None (replicated)."""
    names = tuple(str(p) for p in path)
    for suffix, axes in LOGICAL_AXES.items():
        if names[-len(suffix) :] == suffix:
            return axes
    return None


def spec_for(path: tuple, ndim: int, rules: dict = DEFAULT_RULES) -> PartitionSpec:
    axes = logical_axes(path)
    if axes is None or len(axes) != ndim:
        return PartitionSpec()
    return PartitionSpec(*(rules.get(a) if a is not None else None for a in axes))


def shard(tree, mesh: Mesh, rules: dict = DEFAULT_RULES):
    """Places every array of an nnx object (or tuple of them) per the rules; returns it, updated in place."""
    state = nnx.state(tree)
    flat = nnx.to_flat_state(state)
    placed = []
    for path, variable in flat:
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        if isinstance(value, jax.Array) and value.ndim:
            value = jax.device_put(value, NamedSharding(mesh, spec_for(path, value.ndim, rules)))
        elif isinstance(value, jax.Array):
            value = jax.device_put(value, NamedSharding(mesh, PartitionSpec()))
        placed.append((path, variable.replace(value)))
    nnx.update(tree, nnx.from_flat_state(placed))
    return tree


def shard_batch(batch, mesh: Mesh, rules: dict = DEFAULT_RULES):
    """Rows of every [B, ...] array over the batch axis."""
    sharding = NamedSharding(mesh, PartitionSpec(rules.get("batch")))
    return jax.tree.map(lambda a: jax.device_put(a, sharding), batch)
