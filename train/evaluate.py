"""Evaluation of fast-weight schedules on held-out documents (``ponder eval``).

Every method runs the same TTT checkpoint over the same documents; only where
lam comes from differs:

| method | lam per chunk |
| --- | --- |
| SKIP | 0: the TTT layer is present but never learns |
| UPDATE_k | 1, with k gradient steps per mini-batch |
| FIXED_lam | a constant |
| RANDOM | 1 with probability = the learned gate's update rate, else 0 |
| THRESHOLD | the training-free gate, its EMA controller aimed at that rate |
| LEARNED | the gating network |
| ORACLE | 1 on the chunks where updating helps most, at that rate (see below) |
| LEARNED_BUDGET | the gating network, on the chunks where its lam reaches a threshold steered toward that rate |
| RANDOM_LEARNED | the gating network's lam, on a random share of chunks at that rate |

The last two appear when calibration documents are given (``ponder eval
--rate R`` takes them from the corpus's training split, never from the
held-out files). LEARNED_BUDGET is the learned gate under a compute budget:
``calibrate_budget`` sets its controller's starting threshold and gain on
the calibration documents. RANDOM_LEARNED keeps the gate's step sizes and
picks the chunks at random, so the two together tell how much of a budgeted
gate's gain comes from which chunks it picks rather than from how strongly it
updates them.

ORACLE is an upper bound for evaluation only, and needs the answers: a first
pass measures each chunk's true gain, the drop in the chunk's own
cross-entropy from UPDATE_1 against SKIP; a second pass updates exactly the
top ``rate`` share of each document's chunks by that gain.

Documents longer than the window run window by window: attention sees the
current window only, the TTT state (fast weights and gating history) carries
across windows, so the fast weights see the whole document. Token t's loss is
``-log p(x_t | x_<t)`` for every token but the first of a document.

Reported per method: CE (nats/token), perplexity, share of chunks updated,
TTT update FLOPs relative to UPDATE_1, and the share of UPDATE_1's and of
ORACLE's CE gain over SKIP that it recovers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ponder.model.document import DocumentRun, run_document
from ponder.model.gating import Schedule
from ponder.model.ttt_lm import TTTTransformerLM


def cross_entropy(runs: list[DocumentRun]) -> float:
    """Token-weighted mean loss over the documents' runs."""
    return float(np.concatenate([r.nll for r in runs]).mean())


def update_rate(runs: list[DocumentRun]) -> float:
    """Share of the documents' chunks that were updated."""
    return float(np.concatenate([r.chunk_updated for r in runs]).mean())


def oracle_lambda(model, tokens, window, rate: float) -> np.ndarray:
    """lam per chunk of ORACLE: 1 on the top ``rate`` share of chunks by their own CE gain under UPDATE_1."""
    C = model.config.gate.chunk
    skip = run_document(model, tokens, Schedule("skip"), window)
    update = run_document(model, tokens, Schedule("update"), window)
    per_chunk = lambda nll: np.concatenate([[0.0], nll]).reshape(-1, C).mean(-1)  # token 0 has no loss
    gain = per_chunk(skip.nll) - per_chunk(update.nll)
    n = len(gain)
    chosen = np.argsort(-gain, kind="stable")[: int(round(rate * n))]
    lam = np.zeros(n, np.float32)
    lam[chosen] = 1.0
    return lam


CONTROLLER_GAINS = (0.05, 0.2, 0.5)


def calibrate_budget(model: TTTTransformerLM, documents: list[np.ndarray], window: int, rate: float) -> Schedule:
    """LEARNED_BUDGET's schedule for update rate ``rate``, set on ``documents`` (not the held-out ones).

    The controller starts at the (1 - rate) quantile of the learned gate's lam
    with every chunk updated; of ``CONTROLLER_GAINS``, it keeps the one with
    the lowest CE among those within 0.02 of the rate (the closest in rate if
    none is).
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"a budget's update rate must be in (0, 1), got {rate!r}")
    lam = np.concatenate([run_document(model, d, Schedule("learned"), window).chunk_lambda for d in documents])
    start = float(np.quantile(lam, 1.0 - rate))
    best = None  # (rank, schedule); rank = (off the rate?, then CE if on it, else how far off)
    for gain in CONTROLLER_GAINS:
        schedule = Schedule("learned_budget", rate=rate, initial_threshold=start, gain=gain)
        runs = [run_document(model, d, schedule, window) for d in documents]
        miss = abs(update_rate(runs) - rate)
        rank = (miss > 0.02, miss if miss > 0.02 else cross_entropy(runs))
        if best is None or rank < best[0]:
            best = (rank, schedule)
    return best[1]


def methods(fixed_lambda: float, rate: float, seed: int = 0) -> dict[str, Schedule]:
    return {
        "SKIP": Schedule("skip"),
        "UPDATE_1": Schedule("update"),
        "UPDATE_2": Schedule("update", steps=2),
        "UPDATE_4": Schedule("update", steps=4),
        f"FIXED_{fixed_lambda:g}": Schedule("fixed", value=fixed_lambda),
        "RANDOM": Schedule("random", rate=rate, seed=seed),
        "THRESHOLD": Schedule("threshold", rate=rate),
        "LEARNED": Schedule("learned"),
    }


def evaluate(model: TTTTransformerLM, documents: list[np.ndarray], window: int, fixed_lambda: float = 1.0,
             rate: float | None = None, calibration: list[np.ndarray] | None = None) -> dict:
    """The table as a dict: per method CE, perplexity, update share, relative FLOPs, gains recovered.

    Args:
      documents: token arrays, each cut to a whole number of chunks.
      rate: the update rate RANDOM, THRESHOLD and ORACLE aim at (default: what LEARNED does here).
      calibration: documents (not ``documents``) to set LEARNED_BUDGET on; with
        them and a ``rate`` below 1, the table has LEARNED_BUDGET and RANDOM_LEARNED.
    """
    runs: dict[str, list[DocumentRun]] = {}
    learned = [run_document(model, d, Schedule("learned"), window) for d in documents]
    if rate is None:
        rate = update_rate(learned)
    schedules = methods(fixed_lambda, rate)
    budget = bool(calibration) and rate < 1.0
    if budget:
        schedules["LEARNED_BUDGET"] = calibrate_budget(model, calibration, window, rate)
        schedules["RANDOM_LEARNED"] = Schedule("random_learned", rate=rate)
    for name, schedule in schedules.items():
        runs[name] = learned if name == "LEARNED" else [run_document(model, d, schedule, window) for d in documents]
    runs["ORACLE"] = [run_document(model, d, Schedule("skip"), window, oracle_lambda(model, d, window, rate))
                      for d in documents]
    table = summarize(runs, rate)
    if budget:
        chosen = schedules["LEARNED_BUDGET"]
        table["budget"] = {"initial_threshold": chosen.initial_threshold, "gain": chosen.gain,
                           "calibration_documents": len(calibration)}
    return table


def summarize(runs: dict[str, list[DocumentRun]], rate: float) -> dict:
    """Token-weighted CE and the derived columns, from per-document runs."""
    ce = {name: cross_entropy(rs) for name, rs in runs.items()}
    flops = {name: sum(r.ttt_flops for r in rs) for name, rs in runs.items()}
    gain = lambda name: ce["SKIP"] - ce[name]
    rows = {}
    for name, rs in runs.items():
        rows[name] = {
            "ce": ce[name],
            "perplexity": math.exp(ce[name]),
            "updated": update_rate(rs),
            "flops_vs_update_1": flops[name] / flops["UPDATE_1"] if flops["UPDATE_1"] else float("nan"),
            "gain_vs_update_1": gain(name) / gain("UPDATE_1") if gain("UPDATE_1") else float("nan"),
            "gain_vs_oracle": gain(name) / gain("ORACLE") if gain("ORACLE") else float("nan"),
        }
    tokens = sum(len(r.nll) for r in runs["SKIP"])
    return {"rate": rate, "documents": len(runs["SKIP"]), "tokens": tokens, "methods": rows}


def markdown(table: dict) -> str:
    lines = [
        f"{table['documents']} documents, {table['tokens']} scored tokens; matched update rate {table['rate']:.2f}",
        "",
        "| method | CE | perplexity | chunks updated | TTT FLOPs vs UPDATE_1 | UPDATE_1 gain recovered | ORACLE gain recovered |",
        "|---|---|---|---|---|---|---|",
    ]
    if "budget" in table:
        b = table["budget"]
        lines[1:1] = ["", f"LEARNED_BUDGET: threshold on lam starting at {b['initial_threshold']:.3f}, controller gain "
                          f"{b['gain']:g}, both set on {b['calibration_documents']} training-split documents"]
    for name, row in table["methods"].items():
        lines.append(
            f"| {name} | {row['ce']:.4f} | {row['perplexity']:.2f} | {100 * row['updated']:.0f}% | "
            f"{row['flops_vs_update_1']:.2f} | {100 * row['gain_vs_update_1']:.0f}% | {100 * row['gain_vs_oracle']:.0f}% |"
        )
    if "line_completion" in table:
        lines += ["", "| line completion (LEARNED) | lines | exact match | edit similarity | line CE |", "|---|---|---|---|---|"]
        completion = dict(table["line_completion"])
        delta = completion.pop("persistent_minus_fresh", None)
        for variant, row in completion.items():
            lines.append(f"| {variant} fast weights | {row['lines']} | {100 * row['exact_match']:.1f}% | "
                         f"{row['edit_similarity']:.3f} | {row.get('line_ce', float('nan')):.3f} |")
        if delta is not None:
            em, es, ce = delta["exact_match"], delta["edit_similarity"], delta["line_ce"]
            lines.append(f"| persistent − fresh (95% CI) | {delta['lines']} | {100 * em['difference']:+.1f} points "
                         f"[{100 * em['ci95'][0]:+.1f}, {100 * em['ci95'][1]:+.1f}] | {es['difference']:+.3f} "
                         f"[{es['ci95'][0]:+.3f}, {es['ci95'][1]:+.3f}] | {ce['difference']:+.3f} "
                         f"[{ce['ci95'][0]:+.3f}, {ce['ci95'][1]:+.3f}] |")
    return "\n".join(lines) + "\n"


def plot(table: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in table["methods"].items():
        ax.scatter(row["flops_vs_update_1"], row["ce"])
        ax.annotate(name, (row["flops_vs_update_1"], row["ce"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("TTT update FLOPs relative to UPDATE_1")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def held_out_documents(corpus_dir, window: int, min_tokens: int, max_tokens: int, max_documents: int,
                       split: str = "val") -> list[np.ndarray]:
    """Documents of ``split`` (default: validation) of at least ``min_tokens``, cut to ``max_tokens`` and to whole windows.

    Whole windows keep every forward the same shape (one compilation per method).
    """
    from ponder.train.corpus import TokenFile

    data = TokenFile(corpus_dir, split)
    docs = []
    for i in range(len(data)):
        doc = data.document(i)
        n = min(len(doc), max_tokens) // window * window
        if len(doc) >= min_tokens and n:
            docs.append(np.asarray(doc[:n], np.int32))
        if len(docs) == max_documents:
            break
    if not docs:
        raise ValueError(f"no {split} document in {corpus_dir} has {min_tokens} tokens or more")
    return docs


def write(table: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(table))
    plot(table, out / "ce_vs_compute.png")
    return out
