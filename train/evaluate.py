"""Evaluation of fast-weight schedules on held-out documents (``ponder eval``): CE against compute.

Every method runs the same TTT checkpoint over the same documents; only where
lam comes from differs. Unbudgeted methods appear once:

| method | lam per chunk |
| --- | --- |
| SKIP | 0: the TTT layer is present but never learns |
| UPDATE_k | 1, with k gradient steps per mini-batch |
| FIXED_lam | a constant |
| LEARNED | the gating network |

Budgeted methods appear once per target update rate r (``RATES`` by default),
so that each traces a curve of CE against TTT FLOPs:

| method | lam per chunk |
| --- | --- |
| RANDOM | 1 with probability r (a coin per chunk), averaged over seeds |
| THRESHOLD | the training-free gate, its EMA controller aimed at r |
| LEARNED_BUDGET | the gating network under a budget of r (the schedule holds the rate itself) |
| RANDOM_LEARNED | the gating network's lam, on a random share r of chunks |
| POLICY | the checkpoint's policy at r (only when it has one) |
| ORACLE | 1 on the share r of chunks with the largest isolated gain (below) |
| GREEDY_ORACLE | 1 where updating helps from the state earlier choices left (below) |

RANDOM_LEARNED keeps the gate's step sizes and picks the chunks at random, so
with LEARNED_BUDGET it tells how much of a budgeted gate's gain comes from
which chunks it picks rather than from how strongly it updates them.

The two oracles are upper-bound references for evaluation only, and need the
answers. ORACLE measures each chunk's gain in isolation: the drop in the
chunk's own cross-entropy from UPDATE_1 everywhere against SKIP everywhere,
then updates exactly the top share r of each document's chunks by it. That
ignores that a chunk's gain depends on which chunks were updated before it.
GREEDY_ORACLE (``GreedyOracle``) walks the chunks in order, carrying the fast
weights its earlier choices left; at chunk c it compares, from that state,
updating c against skipping it on the loss of chunk c and the ``lookahead``
chunks after it (those run with lam = 1 either way), and updates c iff that
gain reaches a threshold tau, which bisection sets per document so that its
update rate is within one chunk of r.

For In-Place TTT and LoRA (``fast_weight_cross_entropy``) a third, VALUE,
ranks chunks by ``update_value``: the drop in the rest of the window's loss
per unit of the chunk's lam, one backward pass per window.

RANDOM is noisy (a coin per chunk), so it runs with several seeds and its
per-document mean is the reference: each budgeted row reports its CE minus
RANDOM's at the same rate with a 95% paired bootstrap interval over documents
(``paired_difference``); a row beats RANDOM when the interval's upper end is
below 0.

Documents longer than the window run window by window: attention sees the
current window only, the TTT state (fast weights and gating history) carries
across windows, so the fast weights see the whole document. Token t's loss is
``-log p(x_t | x_<t)`` for every token but the first of a document.

Reported per (method, rate): CE (nats/token), perplexity, share of chunks
updated (the realised update rate), TTT update FLOPs relative to UPDATE_1,
the share of UPDATE_1's and of ORACLE's (at the same rate) CE gain over SKIP
that it keeps, and the difference to RANDOM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import nnx

from ponder.model.doc_state import DocState
from ponder.model.document import DocumentRun, chunk_size, initial_state, run_document, window_forward
from ponder.model.gating import Schedule
from ponder.model.gpt2 import KVCache
from ponder.model.ttt_lm import TTTTransformerLM

RATES = (0.25, 0.5, 0.75)  # the budgeted methods' target update rates, by default


def cross_entropy(runs: list[DocumentRun]) -> float:
    """Token-weighted mean loss over the documents' runs."""
    return float(np.concatenate([r.nll for r in runs]).mean())


def update_rate(runs: list[DocumentRun]) -> float:
    """Share of the documents' chunks that were updated."""
    return float(np.concatenate([r.chunk_updated for r in runs]).mean())


def unbudgeted(fixed_lambda: float) -> dict[str, Schedule]:
    """The methods without a target rate, by name."""
    return {
        "SKIP": Schedule("skip"),
        "UPDATE_1": Schedule("update"),
        "UPDATE_2": Schedule("update", steps=2),
        "UPDATE_4": Schedule("update", steps=4),
        f"FIXED_{fixed_lambda:g}": Schedule("fixed", value=fixed_lambda),
        "LEARNED": Schedule("learned"),
    }


def budgeted(rate: float, policy: bool = False) -> dict[str, Schedule]:
    """The schedules aimed at update rate ``rate`` (RANDOM, whose seeds vary, and the oracles aside)."""
    schedules = {
        "THRESHOLD": Schedule("threshold", rate=rate),
        "LEARNED_BUDGET": Schedule("learned_budget", rate=rate),
        "RANDOM_LEARNED": Schedule("random_learned", rate=rate),
    }
    if policy:
        schedules["POLICY"] = Schedule("policy", rate=rate)
    return schedules


def isolated_gain(skip: DocumentRun, update: DocumentRun, chunk: int) -> np.ndarray:
    """[n_chunks] each chunk's own mean CE under SKIP minus under UPDATE_1 (ORACLE's ranking)."""
    per_chunk = lambda nll: np.concatenate([[0.0], nll]).reshape(-1, chunk).mean(-1)  # token 0 has no loss
    return per_chunk(skip.nll) - per_chunk(update.nll)


def oracle_lambda(gain: np.ndarray, rate: float) -> np.ndarray:
    """lam per chunk of ORACLE: 1 on the top ``rate`` share of chunks by ``gain`` (``isolated_gain``)."""
    chosen = np.argsort(-gain, kind="stable")[: int(round(rate * len(gain)))]
    lam = np.zeros(len(gain), np.float32)
    lam[chosen] = 1.0
    return lam


# --- GREEDY_ORACLE.

BRANCHES = np.asarray([1.0, 0.0], np.float32)  # row 0 updates the chunk, row 1 skips it
BOTH_UPDATE = np.asarray([1.0, 1.0], np.float32)
CARRY_ON = np.asarray([0, 1], np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _window_cache(graphdef, params, tokens):
    """The base's KV cache (2 rows) after a whole window ``tokens`` [2, T], positions from 0.

    The base is frozen, so its cache does not depend on lam; a chunk at
    position p reads only the slots before p, so one cache per window serves
    every chunk in it.
    """
    base = nnx.merge(graphdef, params)
    cache = KVCache.init(base.config, tokens.shape[0])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # [2, T]
    return base(tokens, positions, cache, compute_logits=False)[2]


@functools.partial(jax.jit, static_argnums=0)
def _branch_step(graphdef, params, tokens, positions, targets, scored, state: DocState, rows, cache: KVCache, lam):
    """One chunk for 2 rows taken from ``state``, lam per row given: each row's summed loss of the next tokens.

    Args:
      tokens, positions: [2, C]; targets: [C] the token after each position;
      scored: [C] float, 0 where there is no next token; rows: [2] the rows
      of ``state`` to start from ([d, d]: branch from row d; [0, 1]: carry
      on); lam: [2].

    Returns:
      ``(loss [2], state after the chunk)``.
    """
    model = nnx.merge(graphdef, params)
    state = jax.tree.map(lambda a: a[rows], state)
    out = model(tokens, positions, Schedule("skip"), state=state, cache=cache, chunk_lambda=lam[:, None])
    logits = out.logits  # [2, C, V]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[None, :, None].repeat(2, 0), -1)[..., 0]
    return (nll * scored).sum(-1), out.state  # [2]


@dataclasses.dataclass
class _Walk:
    chosen: np.ndarray  # [n_chunks] bool
    gain: np.ndarray  # [n_chunks]
    after: list  # per chunk the DocState after it, row 0 updated, row 1 skipped


class GreedyOracle:
    """GREEDY_ORACLE on one document (module docstring): ``choose(rate)`` gives its lam per chunk.

    Both branches of a chunk run as one batch of 2 rows through
    ``_branch_step``. A walk with a new tau follows the previous walk's
    decisions (and reuses its gains and states) until the first chunk where
    they differ, so bisection recomputes only what changes.
    """

    def __init__(self, model: TTTTransformerLM, tokens: np.ndarray, window: int, lookahead: int = 1):
        C = model.config.gate.chunk
        if len(tokens) % C or window % C:
            raise ValueError(f"the document ({len(tokens)} tokens) and the window ({window}) must be whole chunks of {C}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 chunks, got {lookahead}")
        T, self.n_chunks, self.lookahead = len(tokens), len(tokens) // C, lookahead
        self.graphdef, self.params = nnx.split(model)
        rows = jnp.asarray(np.broadcast_to(tokens, (2, T)), jnp.int32)  # [2, T]
        self.caches = [_window_cache(*nnx.split(model.base), rows[:, s : s + window]) for s in range(0, T, window)]
        self.window_of = [c * C // window for c in range(self.n_chunks)]
        self.tokens = [rows[:, c * C : (c + 1) * C] for c in range(self.n_chunks)]  # n x [2, C]
        self.positions = [jnp.broadcast_to(jnp.arange(c * C % window, c * C % window + C), (2, C))
                          for c in range(self.n_chunks)]
        targets = np.append(tokens[1:], 0).astype(np.int32)  # [T]: position t predicts token t + 1
        scored = (np.arange(T) < T - 1).astype(np.float32)  # the last position predicts nothing
        self.targets = [jnp.asarray(targets[c * C : (c + 1) * C]) for c in range(self.n_chunks)]
        self.scored = [jnp.asarray(scored[c * C : (c + 1) * C]) for c in range(self.n_chunks)]
        self.counted = [float(scored[c * C : (c + 1 + lookahead) * C].sum()) for c in range(self.n_chunks)]
        self.start = model.init_state(2, Schedule("skip"))
        self._last: _Walk | None = None

    def _step(self, c: int, state: DocState, rows: np.ndarray, lam: np.ndarray):
        return _branch_step(self.graphdef, self.params, self.tokens[c], self.positions[c], self.targets[c],
                            self.scored[c], state, rows, self.caches[self.window_of[c]], lam)

    def gain(self, c: int, state: DocState, row: int) -> tuple[float, DocState]:
        """From row ``row`` of ``state`` (before chunk c): the mean loss of chunks c..c+lookahead skipping c
        minus updating c, and the state after chunk c either way (row 0 updated, row 1 skipped)."""
        loss, after = self._step(c, state, np.asarray([row, row], np.int32), BRANCHES)
        ahead = after
        for following in range(c + 1, min(c + 1 + self.lookahead, self.n_chunks)):
            more, ahead = self._step(following, ahead, CARRY_ON, BOTH_UPDATE)
            loss = loss + more
        loss = np.asarray(loss)
        return float(loss[1] - loss[0]) / self.counted[c], after

    def walk(self, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """One greedy pass: chunk c updates iff its gain (``gain``) >= ``tau``.

        Returns:
          ``(chosen [n_chunks] bool, gain [n_chunks])``, the gains met along this pass.
        """
        n, last = self.n_chunks, self._last
        chosen, gains, afters = np.zeros(n, bool), np.zeros(n), []
        state, row = self.start, 0  # the chunk starts from this row of this state
        same = last is not None  # this pass has made the last one's choices so far
        for c in range(n):
            gains[c], state = (last.gain[c], last.after[c]) if same else self.gain(c, state, row)
            chosen[c] = gains[c] >= tau
            afters.append(state)
            same = same and chosen[c] == last.chosen[c]
            row = 0 if chosen[c] else 1
        self._last = _Walk(chosen, gains, afters)
        return chosen, gains

    def choose(self, rate: float, iterations: int = 8) -> np.ndarray:
        """lam per chunk [n_chunks]: the walk whose update rate is within 1 / n_chunks of ``rate``
        (the closest of ``iterations`` walks if none is).

        tau starts at 0, or at the gain the last walk's chunks exceed at ``rate``. Then each walk
        narrows a bracket [low, high] around tau and the next tau is that quantile of the gains it
        met, where it falls inside the bracket, else the bracket's middle (bisection).
        """
        n = self.n_chunks
        low, high = -math.inf, math.inf  # taus known to update too many / too few chunks
        tau = 0.0 if self._last is None else float(np.quantile(self._last.gain, 1.0 - rate))
        best = None
        for _ in range(iterations):
            chosen, gains = self.walk(tau)
            miss = chosen.mean() - rate
            if best is None or abs(miss) < abs(best[0]):
                best = (miss, chosen)
            if abs(miss) <= 1.0 / n + 1e-9:
                break
            low, high = (tau, high) if miss > 0 else (low, tau)
            guess = float(np.quantile(gains, 1.0 - rate))
            if low < guess < high:
                tau = guess
            elif math.isfinite(low) and math.isfinite(high):
                tau = (low + high) / 2
            else:  # one side still open: a step past tau, as wide as the gains spread
                tau += math.copysign(max(float(np.ptp(gains)), 1e-6), miss)
        return best[1].astype(np.float32)


def greedy_oracle_lambda(model: TTTTransformerLM, tokens: np.ndarray, window: int, rate: float,
                         lookahead: int = 1) -> np.ndarray:
    """lam per chunk of GREEDY_ORACLE on one document at update rate ``rate``."""
    return GreedyOracle(model, tokens, window, lookahead).choose(rate)


# --- The comparison with RANDOM.


def paired_difference(loss: np.ndarray, reference: np.ndarray, tokens: np.ndarray, resamples: int = 10_000,
                      seed: int = 0) -> dict:
    """Token-weighted CE of a method minus that of a reference on the same documents, with a 95% interval
    from a paired bootstrap over documents (``scipy.stats.bootstrap``, BCa; as ``line_completion.compare``).

    Args:
      loss, reference: [n_documents] summed token loss per document; tokens: [n_documents] scored tokens.

    Returns:
      ``{"difference": float, "ci95": [low, high]}``; an interval of one point when every document
      differs by the same CE per token, NaN with fewer than 2 documents.
    """
    diff, tokens = np.asarray(loss, float) - np.asarray(reference, float), np.asarray(tokens, float)
    value = float(diff.sum() / tokens.sum())
    per_document = diff / tokens
    if len(diff) < 2:  # one document says nothing about the spread between documents
        return {"difference": value, "ci95": [float("nan"), float("nan")]}
    if np.allclose(per_document, per_document[0], rtol=0.0, atol=1e-9):  # every resample gives the same value
        return {"difference": value, "ci95": [value, value]}
    ratio = lambda d, t, axis=-1: d.sum(axis) / t.sum(axis)
    ci = scipy.stats.bootstrap((diff, tokens), ratio, paired=True, vectorized=True, n_resamples=resamples,
                               confidence_level=0.95, method="BCa", rng=np.random.default_rng(seed)).confidence_interval
    return {"difference": value, "ci95": [float(ci.low), float(ci.high)]}


def _mean_run(runs: list[DocumentRun]) -> DocumentRun:
    """One document's runs under several seeds, averaged token by token and chunk by chunk."""
    return DocumentRun(np.mean([r.nll for r in runs], 0), np.mean([r.chunk_lambda for r in runs], 0),
                       np.mean([r.chunk_updated for r in runs], 0), float(np.mean([r.ttt_flops for r in runs])))


def evaluate(model: TTTTransformerLM, documents: list[np.ndarray], window: int, fixed_lambda: float = 1.0,
             rates: tuple[float, ...] = RATES, random_seeds: int = 3, lookahead: int = 1) -> dict:
    """The table as a dict: a row per (method, rate), see ``summarize``.

    Args:
      documents: token arrays, each cut to a whole number of chunks.
      rates: the target update rates of the budgeted methods, each in (0, 1).
      random_seeds: seeds of RANDOM; its per-document mean is the reference of the difference column.
      lookahead: chunks after the one decided that GREEDY_ORACLE scores.
    """
    if not rates or not all(0.0 < r < 1.0 for r in rates):
        raise ValueError(f"the budgeted methods' update rates must each be in (0, 1), got {list(rates)}")
    if random_seeds < 1:
        raise ValueError(f"RANDOM needs at least one seed, got {random_seeds}")
    C = model.config.gate.chunk
    runs: dict[tuple[str, float | None], list[DocumentRun]] = {}
    for name, schedule in unbudgeted(fixed_lambda).items():
        runs[name, None] = [run_document(model, d, schedule, window) for d in documents]
    gains = [isolated_gain(s, u, C) for s, u in zip(runs["SKIP", None], runs["UPDATE_1", None])]
    greedy = {rate: [] for rate in rates}
    for d in documents:  # one document at a time: its oracle holds the base's KV caches
        oracle = GreedyOracle(model, d, window, lookahead)
        for rate in rates:
            greedy[rate].append(oracle.choose(rate))
    random_ce = {}
    policy = getattr(model, "policy", None) is not None
    for rate in rates:
        seeds = [[run_document(model, d, Schedule("random", rate=rate, seed=s), window) for d in documents]
                 for s in range(random_seeds)]
        random_ce[rate] = [cross_entropy(rs) for rs in seeds]
        runs["RANDOM", rate] = [_mean_run(list(per_seed)) for per_seed in zip(*seeds)]
        for name, schedule in budgeted(rate, policy).items():
            runs[name, rate] = [run_document(model, d, schedule, window) for d in documents]
        runs["ORACLE", rate] = [run_document(model, d, Schedule("skip"), window, oracle_lambda(g, rate))
                                for d, g in zip(documents, gains)]
        runs["GREEDY_ORACLE", rate] = [run_document(model, d, Schedule("skip"), window, lam)
                                       for d, lam in zip(documents, greedy[rate])]
    table = summarize(runs)
    table.update(random_seeds=random_seeds, lookahead=lookahead)
    for row in table["methods"]:
        if row["method"] == "RANDOM":
            row["seed_ce"] = random_ce[row["rate"]]
    return table


def summarize(runs: dict[tuple[str, float | None], list[DocumentRun]]) -> dict:
    """Token-weighted CE and the derived columns, from per-document runs keyed by (method, rate).

    Rate-free rows (rate None) need no ORACLE or RANDOM; a row with a rate needs both at that rate.
    """
    ce = {key: cross_entropy(rs) for key, rs in runs.items()}
    flops = {key: sum(r.ttt_flops for r in rs) for key, rs in runs.items()}
    loss = {key: np.asarray([r.nll.sum() for r in rs]) for key, rs in runs.items()}
    tokens = np.asarray([len(r.nll) for r in runs["SKIP", None]])
    gain = lambda key: ce["SKIP", None] - ce[key]
    share = lambda a, b: a / b if b else float("nan")
    rows = []
    for (name, rate), rs in runs.items():
        row = {
            "method": name,
            "rate": rate,
            "ce": ce[name, rate],
            "perplexity": math.exp(ce[name, rate]),
            "updated": update_rate(rs),
            "flops_vs_update_1": share(flops[name, rate], flops["UPDATE_1", None]),
            "gain_vs_update_1": share(gain((name, rate)), gain(("UPDATE_1", None))),
            "gain_vs_oracle": None,
            "minus_random": None,
            "beats_random": None,
        }
        if rate is not None:
            row["gain_vs_oracle"] = share(gain((name, rate)), gain(("ORACLE", rate)))
            row["minus_random"] = paired_difference(loss[name, rate], loss["RANDOM", rate], tokens)
            row["beats_random"] = row["minus_random"]["ci95"][1] < 0
        rows.append(row)
    order = {name: i for i, name in enumerate(dict.fromkeys(name for name, _ in runs))}
    rows.sort(key=lambda row: (row["rate"] is not None, order[row["method"]], row["rate"] or 0.0))
    rates = sorted({rate for _, rate in runs if rate is not None})
    return {"rates": rates, "documents": len(tokens), "tokens": int(tokens.sum()), "methods": rows}


def find_row(table: dict, method: str, rate: float | None = None) -> dict:
    """The table's row of ``method`` at ``rate`` (None: an unbudgeted method)."""
    for row in table["methods"]:
        if row["method"] == method and row["rate"] == rate:
            return row
    raise KeyError(f"no row for {method} at rate {rate}")


def markdown(table: dict) -> str:
    percent = lambda x: "—" if x is None else f"{100 * x:.0f}%"
    lines = [
        f"{table['documents']} documents, {table['tokens']} scored tokens; budgeted methods at update rates "
        f"{', '.join(f'{r:g}' for r in table['rates'])}; RANDOM is the mean of {table.get('random_seeds', 1)} seeds, "
        f"the reference of the last column (95% paired bootstrap over documents); GREEDY_ORACLE looks "
        f"{table.get('lookahead', 1)} chunk(s) ahead",
        "",
        "| method | rate | CE | chunks updated | TTT FLOPs vs UPDATE_1 | UPDATE_1 gain kept | ORACLE gain kept "
        "| CE − RANDOM [95% CI] | beats RANDOM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table["methods"]:
        versus, beats = "—", ""
        if row["method"] == "RANDOM":
            versus = "(the reference)"
        elif row["minus_random"] is not None:
            d, (low, high) = row["minus_random"]["difference"], row["minus_random"]["ci95"]
            versus, beats = f"{d:+.4f} [{low:+.4f}, {high:+.4f}]", "yes" if row["beats_random"] else "no"
        rate = "—" if row["rate"] is None else f"{row['rate']:g}"
        lines.append(
            f"| {row['method']} | {rate} | {row['ce']:.4f} | {percent(row['updated'])} | {row['flops_vs_update_1']:.2f} | "
            f"{percent(row['gain_vs_update_1'])} | {percent(row['gain_vs_oracle'])} | {versus} | {beats} |"
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
    """CE against TTT FLOPs (relative to UPDATE_1): a line per budgeted method through its rates; SKIP,
    UPDATE_1 and LEARNED as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list[dict]] = {}
    for row in table["methods"]:
        if row["rate"] is not None:
            curves.setdefault(row["method"], []).append(row)
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda row: row["flops_vs_update_1"])
        style = "--" if name.endswith("ORACLE") else "-"
        ax.plot([r["flops_vs_update_1"] for r in rows], [r["ce"] for r in rows], style, marker="o", ms=4, label=name)
    for name, marker in (("SKIP", "s"), ("UPDATE_1", "D"), ("LEARNED", "*")):
        row = next((r for r in table["methods"] if r["method"] == name and r["rate"] is None), None)
        if row is not None:
            ax.scatter(row["flops_vs_update_1"], row["ce"], marker=marker, s=60, color="black", zorder=3)
            ax.annotate(name, (row["flops_vs_update_1"], row["ce"]), fontsize=8, xytext=(5, 3),
                        textcoords="offset points")
    ax.set_xlabel("TTT update FLOPs relative to UPDATE_1")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.legend(fontsize=8)
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


def update_value(model, tokens: np.ndarray, window: int, at: float = 0.5) -> np.ndarray:
    """[n_chunks] what updating each chunk is worth to the text after it: -d(CE summed over the rest of
    its window)/d(lam of the chunk), at lam = ``at`` on every chunk (an In-Place TTT or LoRA model).

    For these kinds an update's gain shows in the chunks after it (the adapters or fast weights every
    later chunk reads), not in its own chunk's loss, which is what ``isolated_gain`` measures. One
    backward pass per window; the state carries across windows as ``run_document`` carries it (along
    lam = ``at``), and a chunk's value stops at its window's end. Reads the answers: a reference.
    """
    C = chunk_size(model)
    graphdef, params = nnx.split(model)
    schedule = Schedule("update")
    state, values = initial_state(model, 1, schedule), []
    for start in range(0, len(tokens), window):
        piece = jnp.asarray(tokens[None, start : start + window], jnp.int32)
        lam = jnp.full((1, piece.shape[1] // C), at, jnp.float32)
        grad, state = _window_value(graphdef, params, piece, schedule, state, lam)
        values.append(-np.asarray(grad[0]))
    return np.concatenate(values)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _window_value(graphdef, params, tokens, schedule, state, chunk_lambda):
    """d(summed next-token loss of the window)/d(chunk_lambda) [1, n], and the state after the window."""

    def loss(lam):
        logp, _, _, _, after = window_forward(graphdef, params, tokens, schedule, state, lam)
        return -jnp.take_along_axis(logp[:-1], tokens[0, 1:, None], -1).sum(), after

    return jax.grad(loss, has_aux=True)(chunk_lambda)


def fast_weight_cross_entropy(model, documents: list[np.ndarray], window: int, schedules: dict[str, Schedule],
                              oracle_rates: tuple[float, ...] = ()) -> dict:
    """Token-weighted CE per schedule of an In-Place TTT or LoRA model (``model.inplace``, ``model.lora``).

    Each document runs window by window (``run_document``: positions restart in each window, the fast
    weights carry across) and every token but a document's first is scored. For each of
    ``oracle_rates`` r, two references that read the answers: ``ORACLE@r`` updates the top share r of
    each document's chunks by isolated gain (SKIP against UPDATE_1, ``oracle_lambda``), ``VALUE@r``
    by ``update_value``.

    Returns:
      ``{name: {"ce": nats/token, "tokens": scored tokens, "updated": share of chunks updated,
      "clipped": updates capped}}``.
    """
    runs = {name: [run_document(model, d, schedule, window) for d in documents] for name, schedule in schedules.items()}
    if oracle_rates:
        one = lambda schedule: [run_document(model, d, schedule, window) for d in documents]
        skip = runs.get("SKIP") or one(Schedule("skip"))
        update = runs.get("UPDATE_1") or one(Schedule("update"))
        gains = [isolated_gain(s, u, chunk_size(model)) for s, u in zip(skip, update)]
        values = [update_value(model, d, window) for d in documents]
        for rate in oracle_rates:
            runs[f"ORACLE@{rate:g}"] = [run_document(model, d, Schedule("skip"), window, oracle_lambda(g, rate))
                                        for d, g in zip(documents, gains)]
            runs[f"VALUE@{rate:g}"] = [run_document(model, d, Schedule("skip"), window, oracle_lambda(v, rate))
                                       for d, v in zip(documents, values)]
    return {name: {"ce": cross_entropy(rs), "tokens": sum(len(r.nll) for r in rs), "updated": update_rate(rs),
                   "clipped": sum(r.clipped for r in rs)} for name, rs in runs.items()}
