"""A sharded training step equals the single-device step (4 simulated CPU devices)."""

import os
import subprocess
import sys
import textwrap

import pytest

from ponder.train.sharding import make_mesh

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from ponder.model.config import GPTConfig
    from ponder.model.gpt2 import GPT
    from ponder.train.data import Batch
    from ponder.train.sharding import make_mesh, shard, shard_batch
    from ponder.train.stages import BaseStage
    from ponder.train.trainer import TrainConfig, make_optimizer, make_train_step

    assert jax.device_count() == 4, jax.devices()
    config = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    stage = BaseStage(seq_len=32)
    rng = np.random.default_rng(0)
    batch = Batch(
        rng.integers(0, 256, (4, 32)).astype(np.int32),
        np.tile(np.arange(32, dtype=np.int32), (4, 1)),
        np.repeat([[0] * 20 + [1] * 12], 4, axis=0).astype(np.int32),
        np.ones((4, 32), bool),
    )

    def run(spec):
        model = GPT(config, rngs=nnx.Rngs(0))
        optimizer = make_optimizer(model, stage, TrainConfig(steps=10, warmup=1, lr=1e-2))
        mesh = make_mesh(spec)
        shard((model, optimizer), mesh)
        placed = shard_batch(Batch(*map(jnp.asarray, batch)), mesh)
        grads = nnx.jit(nnx.grad(lambda model: stage.loss(model, placed)[0]))(model)
        step = make_train_step(stage)
        losses = [float(step(model, optimizer, placed)["loss"]) for _ in range(3)]
        kernel = model.h[0].mlp.c_fc.kernel[...]
        return losses, nnx.to_pure_dict(grads), len(kernel.sharding.device_set), kernel.sharding.spec

    one, grads_one, devices_one, _ = run("data=1")
    for spec in ("data=4", "data=2,model=2"):
        losses, grads, devices, kernel_spec = run(spec)
        # The step's gradients, and the losses of three optimiser steps in a row. (Parameters
        # are not compared after AdamW: it divides by |g|, so a gradient of 1e-9 turns float
        # reassociation noise into a full-size step of either sign.)
        worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_one)))
        assert worst <= 1e-5, (spec, worst)
        assert np.abs(np.asarray(losses) - np.asarray(one)).max() <= 1e-5, (spec, losses, one)
        assert devices == 4 and devices_one == 1
        if "model" in spec:
            assert kernel_spec == jax.sharding.PartitionSpec(None, "model"), kernel_spec  # really split
        print(spec, "max gradient difference", worst)
    assert one[-1] < one[0]  # the steps do train
    """
)


def test_sharded_step_equals_single_device_step():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data=2,model=2 max gradient difference" in result.stdout


def test_mesh_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="expected entries like data=4"):
        make_mesh("pipeline=2")
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_mesh("data=8")
