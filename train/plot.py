"""Training curves from a run's ``log.jsonl``, drawn with matplotlib."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Draws training / validation loss (and mean lambda, for stage 2) against step to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "step" in r]
    if not steps:
        raise ValueError(f"{run_dir}/log.jsonl has no training steps to plot")
    has_lambda = any("mean_lambda" in r for r in steps)
    fig, axes = plt.subplots(1, 2 if has_lambda else 1, figsize=(11 if has_lambda else 6, 4), squeeze=False)
    loss_ax = axes[0, 0]
    loss_ax.plot([r["step"] for r in steps], [r.get("ce", r["loss"]) for r in steps], label="train CE", lw=0.8)
    evals = [r for r in steps if "val_loss" in r]
    loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("nats / token")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    if has_lambda:
        lam_ax = axes[0, 1]
        lam_ax.plot([r["step"] for r in steps], [r["mean_lambda"] for r in steps], lw=0.8, label="mean λ")
        total = [r["chunks_updated"] + r["chunks_skipped"] for r in steps]
        lam_ax.plot([r["step"] for r in steps], [r["chunks_updated"] / t for r, t in zip(steps, total)], lw=0.8,
                    label="share of chunks updated")
        lam_ax.set_xlabel("step")
        lam_ax.legend()
        lam_ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
