"""Multi-process training on JAX's own runtime equals one process, and a dead process stops the others.

Two local processes with two simulated CPU devices each join through
``jax.distributed`` (collectives over gloo) and train on one 4-device mesh;
one process with four devices is the reference. The processes build only
their own batch rows, write one Orbax checkpoint together, and a single
process resumes it. Then one of them is killed with SIGKILL mid-training
and the other must fail with an error within the heartbeat timeout.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from ponder.train import corpus
from ponder.train.data import DataState, Packer

HEARTBEAT_S = 3  # a process silent this long counts as dead

COMMON = textwrap.dedent(
    """
    import sys, jax
    from flax import nnx
    from ponder.model.config import GPTConfig
    from ponder.model.gpt2 import GPT
    from ponder.model.tokenizer import Tokenizer
    from ponder.train.stages import BaseStage
    from ponder.train.trainer import TrainConfig, train

    corpus_dir, run_dir = sys.argv[1], sys.argv[2]
    tokenizer = Tokenizer.load(corpus_dir + "/tokenizer.json")
    config = dict(batch_size=4, seq_len=32, warmup=1, lr=1e-2, fim_rate=0.5, eval_every=1000, eval_batches=2,
                  checkpoint_every_s=1e9)

    def run(steps, mesh, resume=False, stop_after=None, directory=run_dir):
        model = GPT(GPTConfig(vocab_size=1024, n_positions=64, n_embd=64, n_layer=2, n_head=4), rngs=nnx.Rngs(0))
        return train(BaseStage(seq_len=32), model, tokenizer, corpus_dir, directory, TrainConfig(steps=steps, **config),
                     resume=resume, progress=False, stop_after=stop_after, mesh_spec=mesh)
    """
)

# One of two processes: 3 steps and a checkpoint, then cross-process collectives, as a training step
# makes, until the test kills one of the processes.
WORKER = COMMON + textwrap.dedent(
    """
    import numpy as np
    from jax.experimental import multihost_utils
    from ponder.train.sharding import initialize_distributed

    coordinator, process_id = sys.argv[3], int(sys.argv[4])
    assert initialize_distributed(coordinator, 2, process_id, heartbeat_timeout_s=%d)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    run(1000, "data=4", stop_after=3)
    for i in range(10**9):
        assert multihost_utils.process_allgather(np.full(1, i)).tolist() == [[i], [i]]
        if i == 0:
            print("checkpointed", flush=True)
    """ % HEARTBEAT_S
)

# One process, four devices: the reference run, then single-process resumes of both runs' checkpoints.
SINGLE = COMMON + textwrap.dedent(
    """
    assert jax.process_count() == 1 and jax.device_count() == 4
    reference = sys.argv[3]
    run(1000, "data=4", stop_after=3, directory=reference)
    run(4, "data=4", resume=True, directory=reference)
    run(4, "data=4", resume=True)
    """
)


def _env(devices: int, compile_cache: str) -> dict:
    """A process with ``devices`` CPU devices; compiled steps go to the persistent cache, so a resume
    in the same process loads its step instead of compiling it again."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": compile_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _steps(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def built(tmp_path_factory, code_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    src = out / "src"
    src.mkdir()
    for i in range(16):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {i + j} - {j}\n\n" for j in range(2 + i % 4))
        (src / f"mod{i}.py").write_text(f'"""Module {i}."""\n\n' + body)
    corpus.build([src], code_tokenizer, out, val_fraction=0.25)
    code_tokenizer.save(out / "tokenizer.json")
    return out


def test_process_rows_are_the_rows_of_the_whole_batch(built, code_tokenizer):
    """Each process's rows, built alone, are those rows of the batch built whole, and the state after agrees."""
    data = corpus.TokenFile(built, "train")
    packer = Packer(data, 5, 48, align=8, seed=2, fim_rate=0.5, fim_prompt=code_tokenizer.fim_prompt)
    state = DataState()
    for _ in range(6):
        whole, after = packer.next(state)
        for rows in (range(0, 2), range(2, 5), range(4, 5)):
            part, part_after = packer.next(state, rows)
            assert part_after == after
            for a, b in zip(part, whole):
                assert np.array_equal(a, b[rows.start : rows.stop])
        state = after
    with pytest.raises(ValueError, match="contiguous range"):
        packer.next(state, range(0, 6))


def test_two_processes_train_as_one_and_a_killed_one_stops_the_other(built, tmp_path, compile_cache):
    port = free_port()
    run_dir, reference = tmp_path / "two", tmp_path / "one"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(built), str(run_dir), f"127.0.0.1:{port}", str(i)],
                         env=_env(2, compile_cache), stdout=log.open("w"), stderr=subprocess.STDOUT)
        for i, log in enumerate(logs)
    ]
    try:
        # Kill process 1 once both exchange data after their checkpoint.
        deadline = time.monotonic() + 120
        while "checkpointed" not in logs[0].read_text():
            assert all(w.poll() is None for w in workers), [log.read_text()[-3000:] for log in logs]
            assert time.monotonic() < deadline, "the two processes did not train"
            time.sleep(0.2)
        workers[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        workers[0].wait(timeout=HEARTBEAT_S + 30)
        survivor_s = time.monotonic() - killed
    finally:
        for w in workers:
            w.kill()
            w.wait()
    err = logs[0].read_text()
    assert workers[0].returncode != 0, err[-3000:]
    assert "stopped sending heartbeats" in err, err[-3000:]  # JAX names the dead process and stops this one
    print(f"process 0 exited {survivor_s:.1f} s after process 1 was killed; exit status {workers[0].returncode}")
    assert survivor_s < HEARTBEAT_S + 30
    assert not (run_dir / "final").exists() and (run_dir / "checkpoints" / "3").is_dir()

    single = subprocess.run([sys.executable, "-c", SINGLE, str(built), str(run_dir), str(reference)], env=_env(4, compile_cache),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    two, one = _steps(run_dir), _steps(reference)
    for step in (1, 2, 3):  # the 4-device mesh over two processes = the 4-device mesh in one
        for name in ("loss", "grad_norm"):
            assert abs(two[step][name] - one[step][name]) <= 1e-5, (step, name, two[step][name], one[step][name])
    # Step 4, in one process from each run's checkpoint.
    assert abs(two[4]["loss"] - one[4]["loss"]) <= 1e-5, (two[4], one[4])
    assert (run_dir / "final" / "config.json").is_file()


def test_process_flags_go_together_and_no_cluster_means_one_process(monkeypatch):
    from ponder.train.sharding import CLUSTER_ENV, initialize_distributed

    with pytest.raises(ValueError, match="pass all three or none"):
        initialize_distributed("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match="--process-id 2 must be in"):
        initialize_distributed("127.0.0.1:1234", 2, 2)
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert initialize_distributed() is False  # a one-task SLURM job trains alone
