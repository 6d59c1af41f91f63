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

Several processes (hosts) form one mesh through JAX's own runtime:
``initialize_distributed`` joins the processes, ``jax.devices()`` is then every
process's devices, and ``make_mesh`` builds the global mesh from them. Each
process builds only the batch rows its own devices hold (``process_rows``) and
``shard_batch`` assembles the global batch from those parts. On the CPU backend
the processes exchange collectives through gloo.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ponder.model.gpt2 import LOGICAL_AXES

# Logical axis -> mesh axis. "heads" and "mlp" split over "model" (Megatron-style
# column/row sharding); everything else is replicated; batch rows split over "data".
DEFAULT_RULES = {"batch": "data", "heads": "model", "mlp": "model", "vocab": None, "embed": None}


# Environments in which ``jax.distributed.initialize()`` finds the coordinator, the process count and this
# process's index by itself (JAX's cluster detection): SLURM (srun: SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID,
# SLURM_STEP_NODELIST), Open MPI (mpirun: OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE/RANK), GKE TPU slices.
CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 30,
    initialization_timeout_s: int = 300,
) -> bool:
    """Joins this process to a multi-process JAX runtime; returns whether it did.

    With ``coordinator`` (``HOST:PORT``, served by process 0), ``num_processes``
    and ``process_id`` it joins those. Without them it joins when the
    environment names a cluster (``CLUSTER_ENV``) and leaves JAX to read it,
    and otherwise stays a single process. A process that stops sending
    heartbeats for ``heartbeat_timeout_s`` counts as dead and the others stop
    with an error instead of waiting in a collective forever.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together: pass all three or none")
    if coordinator is None and not any(name in os.environ for name in CLUSTER_ENV):
        return False
    if coordinator is None and "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) == 1:
        return False  # one task of a SLURM allocation: nothing to join
    if coordinator is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, --num-processes {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    args = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(
        **{k: v for k, v in args.items() if v is not None},
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        initialization_timeout=initialization_timeout_s,
    )
    return True


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


def process_rows(mesh: Mesh, batch_size: int, rules: dict = DEFAULT_RULES) -> range:
    """The rows of a global batch of ``batch_size`` that this process's devices hold (all of them in one process)."""
    sharding = NamedSharding(mesh, PartitionSpec(rules.get("batch")))
    held = sharding.addressable_devices_indices_map((batch_size,)).values()
    starts = sorted({index[0].indices(batch_size)[:2] for index in held})
    rows = range(starts[0][0], starts[-1][1])
    if sum(stop - start for start, stop in starts) != len(rows):
        raise ValueError(f"this process's devices hold rows {starts} of the batch: not one contiguous block")
    return rows


def shard_batch(batch, mesh: Mesh, rules: dict = DEFAULT_RULES, batch_size: int | None = None):
    """Rows of every [B, ...] array over the batch axis.

    ``batch`` holds this process's rows (``process_rows``) of a global batch of
    ``batch_size`` rows; in one process (``batch_size`` None) that is all of them.
    """
    sharding = NamedSharding(mesh, PartitionSpec(rules.get("batch")))
    if batch_size is None:
        return jax.tree.map(lambda a: jax.device_put(a, sharding), batch)
    place = lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), (batch_size, *a.shape[1:]))
    return jax.tree.map(place, batch)
