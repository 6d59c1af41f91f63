"""The training loop shared by both stages: optimiser, checkpoints, resume, logs, metrics.

A run directory holds::

    train_config.json   the TrainConfig and what is trained (written once)
    checkpoints/N/      Orbax CheckpointManager steps: model + optimiser state,
                        data-iterator position, RNG and best validation loss
    log.jsonl           one line per step (loss, tokens/s, lr, ...) and per evaluation
    best/               the exported checkpoint with the lowest validation loss
    final/              the exported checkpoint after the last step

``train`` resumes from the newest step under ``checkpoints/`` when asked, so
a crash or ``kill -9`` loses at most one checkpoint interval; the data order
is a pure function of the saved ``DataState``, so the resumed run sees exactly
the batches the uninterrupted one would have.

A stage (``train.stages``) says which parameters train and what the loss is;
everything else is here.

Several processes (``train.sharding.initialize_distributed``) run this same
loop in step: each builds only its rows of every batch, Orbax writes one
checkpoint from all of them (a single-process run restores it), and only
process 0 writes the run's files, logs, metrics and progress. The exported
``best/`` and ``final/`` come from one process: a multi-process run leaves its
last checkpoint, and ``--resume`` of the finished run in one process exports
``final/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from ponder.model import checkpoint
from ponder.model.tokenizer import Tokenizer
from ponder.train.corpus import TokenFile
from ponder.train.data import Batch, DataState, Packer
from ponder.train.sharding import make_mesh, process_rows, shard, shard_batch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Attributes:
    steps: optimiser steps in all. batch_size, seq_len: rows and tokens per row.
    lr, min_lr_ratio, warmup: AdamW learning rate, linear warm-up then cosine down to lr * min_lr_ratio.
    weight_decay, clip: AdamW weight decay and global gradient-norm clip.
    seed: data order, FIM draws. fim_rate: share of documents turned into FIM examples.
    eval_every, eval_batches: validation cadence and size (fixed batches from the validation split);
      the validation loss is the stage's ``validation`` scalar (the cross-entropy alone, but for the gate stage).
    checkpoint_every_s: seconds between checkpoints. keep: checkpoints kept (the newest).
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    fim_rate: float = 0.1
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every_s: float = 300.0
    keep: int = 3

    @classmethod
    def base(cls, **changes) -> "TrainConfig":
        """Stage 1's defaults (the base LM)."""
        return cls(**changes)

    @classmethod
    def ttt(cls, **changes) -> "TrainConfig":
        """Stage 2's defaults: longer rows (the fast weights need chunks to learn on), fewer of them,
        and a higher learning rate for the small TTT layer and gate."""
        return cls(**{"seq_len": 512, "batch_size": 4, "lr": 3e-3, **changes})

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.fim_rate <= 1:
            raise ValueError(f"TrainConfig.fim_rate must be in [0, 1], got {self.fim_rate}")


class Stage(Protocol):
    """What differs between the stages."""

    name: str
    trainable: Any  # an nnx filter: the parameters the optimiser updates
    align: int  # pieces start on multiples of this (the gate chunk in stage 2)
    validation: str  # the logged scalar that validation reports and ``best/`` minimises

    def loss(self, model, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and named scalars to log."""
        ...

    def tokens_flops(self, model) -> float:
        """Training FLOPs per token (forward + backward), for MFU."""
        ...


def learning_rate(config: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, config.lr, min(config.warmup, config.steps - 1), config.steps, config.lr * config.min_lr_ratio
    )


def make_optimizer(model, stage: Stage, config: TrainConfig) -> nnx.Optimizer:
    tx = optax.chain(
        optax.clip_by_global_norm(config.clip),
        optax.adamw(learning_rate(config), b1=0.9, b2=0.95, weight_decay=config.weight_decay),
    )
    return nnx.Optimizer(model, tx, wrt=stage.trainable)


def make_train_step(stage: Stage):
    """The jitted optimiser step: ``(model, optimizer, batch) -> scalars to log``, updating both in place."""

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            return stage.loss(model, batch)

        (loss, aux), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, stage.trainable), has_aux=True)(model)
        optimizer.update(model, grads)
        return {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

    return train_step


def peak_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted f32 n x n x n matmul on this machine (the MFU reference)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


class RunLog:
    """Appends JSON lines to ``log.jsonl``."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, jax.Array)) else v) for k, v in record.items()}) + "\n")


def train(
    stage: Stage,
    model,
    tokenizer: Tokenizer,
    corpus_dir: str | Path,
    run_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    metrics: "TrainMetrics | None" = None,
    progress: bool = True,
    export: Callable[[Path, Any, Tokenizer], Path] = lambda path, model, tok: checkpoint.save(path, model, tok, overwrite=True),
    stop_after: int | None = None,
    mesh_spec: str = "data=1",
) -> Path:
    """Trains ``model`` in place and exports ``run_dir/final``; returns that path.

    Args:
      resume: continue from the newest checkpoint in ``run_dir`` (it must
        exist); otherwise ``run_dir`` must not hold a run yet.
      metrics: Prometheus metrics to update (``TrainMetrics``), or None.
      export: writes a self-contained checkpoint directory for ``model``.
      stop_after: leave after this many steps of this invocation without
        exporting (tests interrupt a run this way, then resume it).
      mesh_spec: the device mesh (``train.sharding.make_mesh``); batch rows
        split over ``data``, attention heads and MLP columns over ``model``.
    """
    run_dir = Path(run_dir).absolute()
    primary = jax.process_index() == 0  # the one process that writes the run's files
    manager_dir = run_dir / "checkpoints"
    config_path = run_dir / "train_config.json"
    record = {"stage": stage.name, "train": dataclasses.asdict(config), "corpus": str(Path(corpus_dir).absolute())}
    if resume:
        if not config_path.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} holds no run ({config_path.name} is missing)")
        saved = json.loads(config_path.read_text())
        # The length of a run may change on resume (the cosine schedule then ends at the new step count).
        other = lambda train: {k: v for k, v in train.items() if k != "steps"}
        if saved["stage"] != stage.name or other(saved["train"]) != other(record["train"]):
            changed = sorted(k for k in record["train"] if saved["train"].get(k) != record["train"][k] and k != "steps")
            raise ValueError(f"--resume: {config_path} was written for other settings ({', '.join(changed) or 'stage'})")
        if saved["train"]["steps"] != config.steps and primary:
            config_path.write_text(json.dumps(record, indent=2) + "\n")
    else:
        if manager_dir.exists():
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or pick another --run-dir")
        if primary:
            run_dir.mkdir(parents=True, exist_ok=True)
            config_path.write_text(json.dumps(record, indent=2) + "\n")
    if jax.process_count() > 1:  # every process has checked run_dir before any writes to it
        multihost_utils.sync_global_devices("ponder train: run directory checked")

    packer = Packer(
        TokenFile(corpus_dir, "train"), config.batch_size, config.seq_len, align=stage.align,
        seed=config.seed, fim_rate=config.fim_rate, fim_prompt=tokenizer.fim_prompt, pad_id=tokenizer.eot_id,
    )
    val_packer = Packer(
        TokenFile(corpus_dir, "val"), config.batch_size, config.seq_len, align=stage.align,
        seed=config.seed, pad_id=tokenizer.eot_id,
    )
    mesh = make_mesh(mesh_spec)
    if config.batch_size % mesh.shape["data"]:
        raise ValueError(f"batch size {config.batch_size} does not split over {mesh.shape['data']} data-parallel devices")
    optimizer = make_optimizer(model, stage, config)
    shard((model, optimizer), mesh)  # before a restore, which then reads each array into its place
    manager = ocp.CheckpointManager(
        manager_dir, options=ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=False)
    )
    meta = {"data": dataclasses.asdict(DataState()), "best_val": math.inf, "tokens": 0}
    start = 0
    if resume and manager.latest_step() is not None:
        start = manager.latest_step()
        target = nnx.to_pure_dict(nnx.state((model, optimizer)))
        restored = manager.restore(
            start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        nnx.update((model, optimizer), _merge_pure(nnx.state((model, optimizer)), restored["state"]))
        meta = restored["meta"]
    data_state = DataState(**meta["data"])
    rows = process_rows(mesh, config.batch_size)  # this process builds only these rows of every batch
    place = lambda batch: shard_batch(batch, mesh, batch_size=config.batch_size)

    def save(step: int) -> None:
        state = nnx.to_pure_dict(nnx.state((model, optimizer)))
        meta["data"] = dataclasses.asdict(data_state)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    train_step = make_train_step(stage)
    @nnx.jit
    def eval_step(model, batch):
        return stage.loss(model, batch)

    def evaluate() -> float:
        state, losses = DataState(), []
        for _ in range(config.eval_batches):
            batch, state = val_packer.next(state, rows)
            losses.append(float(eval_step(model, place(batch))[1][stage.validation]))
        return float(np.mean(losses))

    log = RunLog(run_dir / "log.jsonl", enabled=primary)
    metrics = metrics if primary else None
    lr = learning_rate(config)
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = stage.tokens_flops(model) * tokens_per_step
    peak = peak_matmul_flops()
    log.write(event="start", step=start, steps=config.steps, peak_matmul_flops=peak, resumed=resume)
    last_save, step = time.monotonic(), start
    bar = _progress(progress and primary, config.steps, start)
    try:
        for step in range(start + 1, config.steps + 1):
            t0 = time.perf_counter()
            batch, data_state = packer.next(data_state, rows)
            out = train_step(model, optimizer, place(batch))
            out = {k: float(v) for k, v in jax.device_get(out).items()}
            seconds = time.perf_counter() - t0
            meta["tokens"] += tokens_per_step
            row = dict(step=step, lr=float(lr(step - 1)), seconds=seconds, tokens_per_s=tokens_per_step / seconds,
                       mfu=flops_per_step / seconds / peak, **out)
            if step % config.eval_every == 0 or step == config.steps:
                row["val_loss"] = evaluate()
                if row["val_loss"] < meta["best_val"]:
                    meta["best_val"] = row["val_loss"]
                    if jax.process_count() == 1:
                        export(run_dir / "best", model, tokenizer)
            log.write(**row)
            if metrics is not None:
                metrics.observe(row)
            bar.update(row)
            if time.monotonic() - last_save >= config.checkpoint_every_s or step == config.steps:
                save(step)
                last_save = time.monotonic()
            if stop_after is not None and step - start >= stop_after:
                save(step)
                return run_dir
    finally:
        bar.close()
        manager.close()
    if jax.process_count() > 1:
        return run_dir  # the checkpoint; `--resume` in one process exports final/ from it
    final = export(run_dir / "final", model, tokenizer)
    log.write(event="done", step=step, best_val=meta["best_val"], tokens=meta["tokens"])
    return final


def _merge_pure(state, pure):
    nnx.replace_by_pure_dict(state, pure)
    return state


class _progress:
    """A rich progress bar with tokens/s, loss, mean lambda and ETA (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=done, stats="")

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        stats = f"loss {row['loss']:.3f}  {row['tokens_per_s']:.0f} tok/s"
        if "mean_lambda" in row:
            stats += f"  λ {row['mean_lambda']:.2f}"
        if "val_loss" in row:
            stats += f"  val {row['val_loss']:.3f}"
        self.bar.update(self.task, completed=row["step"], stats=stats)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class TrainMetrics:
    """Prometheus metrics of a training run, served on ``port`` (its own registry)."""

    def __init__(self, port: int | None = None):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        self.registry = CollectorRegistry()
        r = self.registry
        self.loss = Gauge("ponder_train_loss", "training loss of the last step", registry=r)
        self.val_loss = Gauge("ponder_train_val_loss", "last validation loss", registry=r)
        self.tokens_per_s = Gauge("ponder_train_tokens_per_second", "training throughput", registry=r)
        self.step_seconds = Histogram("ponder_train_step_seconds", "time per optimiser step", registry=r)
        self.steps = Counter("ponder_train_steps", "optimiser steps taken", registry=r)
        self.lam = Histogram(
            "ponder_train_lambda", "gate scale per chunk", buckets=(0, 0.05, 0.25, 0.5, 1, 1.5, 2, 3, 4), registry=r
        )
        self.chunks = Counter("ponder_train_chunks", "TTT chunks by outcome", ["outcome"], registry=r)
        self.ttt_flops = Counter("ponder_train_ttt_flops", "fast-weight update FLOPs executed", registry=r)
        if port is not None:
            start_http_server(port, registry=r)

    def observe(self, row: dict) -> None:
        self.loss.set(row["loss"])
        self.tokens_per_s.set(row["tokens_per_s"])
        self.step_seconds.observe(row["seconds"])
        self.steps.inc()
        if "val_loss" in row:
            self.val_loss.set(row["val_loss"])
        if "mean_lambda" in row:
            self.lam.observe(row["mean_lambda"])
            self.chunks.labels("updated").inc(row["chunks_updated"])
            self.chunks.labels("skipped").inc(row["chunks_skipped"])
            self.ttt_flops.inc(row["ttt_flops"])
