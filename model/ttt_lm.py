"""The TTT language model: TTT layers on top of a frozen GPT-2 (docs/design.md, "TTT layer" to "Sessions").

``h = base(x)`` (after ``ln_f``, gradient stopped), then for each TTT layer
``h = h + TTT(LN(h))``, then ``logits = h . wte^T`` with the base's tied head.
The TTT output projections start at zero, so a fresh model predicts exactly
what the base does.

A document's state (``DocState``) is every TTT layer's fast-weight state and
the gating state: the running history the gate reads (features of the last
closed chunk, an EMA of difficulty, the threshold gate's controller) and what
decoding needs to close a chunk one token at a time (the chunk's base hidden
states and tokens, the first TTT layer's state at the chunk start).

Two paths, one semantics:

* ``__call__``: whole chunks in dual form, chunk by chunk under
  ``lax.scan``. For each chunk c, lam_c comes from the schedule (features of
  chunk c-1 and the history only); a chunk below the gate threshold for every
  row takes the real skip (fast weights applied, no update work). It starts
  at a document start or from a ``DocState`` on a chunk boundary, so a
  session can ingest a document chunk by chunk.
* ``step``: one token per row, primal form, the decode path. At a chunk's
  first token it asks the schedule for lam; at its last it computes the same
  features the full forward computes and moves the history on. It
  reproduces the full forward from any offset.

Document boundaries: packed rows carry segment ids (documents start on chunk
boundaries; ``train`` pads them to whole chunks); in decoding, an
end-of-document token (``config.eot_id``) or ``reset`` opens a new document.
An end-of-document token inside a full forward is not a boundary: a caller
splits its input there (or passes segment ids).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.doc_state import DocState, GateHistory, LMOutput
from ponder.model.fast_weights import select_rows
from ponder.model.gating import (
    BUDGET_WINDOW,
    N_FEATURES,
    GateConfig,
    GatingNetwork,
    Schedule,
    budget_choice,
    chunk_features,
    chunk_stats,
    token_stats,
)
from ponder.model.gpt2 import GPT, KVCache
from ponder.model.policy import ACTION_STEPS, ActorCritic
from ponder.model.ttt import TTTConfig, TTTLayer


@dataclasses.dataclass(frozen=True)
class TTTLMConfig:
    """A base GPT-2 config, the TTT layer config and how many TTT layers to stack."""

    base: GPTConfig
    ttt: TTTConfig
    n_ttt_layers: int = 1
    gate: GateConfig = GateConfig()
    eot_id: int | None = None  # a document starts with this token: decoding resets the fast weights there
    policy_hidden: int | None = None  # width of the update policy's trunks (None: no policy, model.policy)

    def __post_init__(self):
        if self.gate.chunk % self.ttt.mini_batch:
            raise ValueError(
                f"gate chunk ({self.gate.chunk}) must be a multiple of the TTT mini-batch ({self.ttt.mini_batch})"
            )
        if self.ttt.width != self.base.n_embd:
            raise ValueError(f"TTT width {self.ttt.width} must equal the base model's n_embd {self.base.n_embd}")
        if self.n_ttt_layers < 1:
            raise ValueError(f"n_ttt_layers must be >= 1, got {self.n_ttt_layers}")

    def to_dict(self) -> dict:
        """Everything but the base config (saved on its own in a checkpoint)."""
        return {
            "ttt": dataclasses.asdict(self.ttt),
            "n_ttt_layers": self.n_ttt_layers,
            "gate": dataclasses.asdict(self.gate),
            "eot_id": self.eot_id,
            "policy_hidden": self.policy_hidden,
        }

    @classmethod
    def from_dict(cls, base: GPTConfig, data: dict) -> "TTTLMConfig":
        def build(kind, fields, where):
            if not isinstance(fields, dict):
                raise ValueError(f"{where} must be an object, got {type(fields).__name__}")
            unknown = set(fields) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}")
            return kind(**fields)

        nested = {
            "ttt": build(TTTConfig, data.get("ttt", {}), "ttt.ttt"),
            # A gate saved before GateConfig.output existed is a sigmoid gate; one saved
            # before GateConfig.features existed reads the first six features.
            "gate": build(GateConfig, {"output": "sigmoid", "features": 6, **data.get("gate", {})}, "ttt.gate"),
        }
        return build(cls, {**data, **nested, "base": base}, "ttt")


def _rows(rows, new, old):
    """Per row: the ``new`` pytree where ``rows`` [B] is True, else ``old``."""
    return jax.tree.map(lambda a, b: select_rows(rows, a, b), new, old)


class TTTTransformerLM(nnx.Module):
    def __init__(self, config: TTTLMConfig, *, rngs: nnx.Rngs, base: GPT | None = None):
        self.config = config
        self.base = base if base is not None else GPT(config.base, rngs=rngs)
        self.ttt_norms = nnx.List(
            [nnx.LayerNorm(config.base.n_embd, epsilon=1e-5, rngs=rngs) for _ in range(config.n_ttt_layers)]
        )
        self.ttt = nnx.List([TTTLayer(config.ttt, rngs=rngs) for _ in range(config.n_ttt_layers)])
        self.gate = GatingNetwork(config.gate, rngs=rngs)
        self.policy = nnx.data(None if config.policy_hidden is None else ActorCritic(
            N_FEATURES, len(ACTION_STEPS), config.policy_hidden, rngs=rngs
        ))

    # --- State.

    def init_state(self, batch_size: int, schedule: Schedule = Schedule()) -> DocState:
        """The state at a document start."""
        B, C, D = batch_size, self.config.gate.chunk, self.config.base.n_embd
        history = GateHistory(
            features=jnp.zeros((B, N_FEATURES), jnp.float32),
            threshold=jnp.full((B,), schedule.initial_threshold, jnp.float32),
            rate=jnp.full((B,), schedule.rate, jnp.float32),
            target=jnp.full((B,), schedule.rate, jnp.float32),
            used=jnp.zeros((B,), jnp.float32),
            scores=jnp.zeros((B, BUDGET_WINDOW), jnp.float32),
            seen=jnp.zeros((B, self.config.base.vocab_size), bool),
        )
        return DocState(
            ttt=[layer.init_state(B) for layer in self.ttt],
            history=history,
            lam=jnp.zeros((B,), jnp.float32),
            steps=jnp.zeros((B,), jnp.int32),
            hidden=jnp.zeros((B, C + 1, D), jnp.float32),
            tokens=jnp.zeros((B, C), jnp.int32),
            start=self.ttt[0].init_state(B),
        )

    def reset(self, state: DocState, rows, schedule: Schedule = Schedule()) -> DocState:
        """Document boundary: rows where ``rows`` [B] is True go back to the start-of-document state.

        A row keeps its budget (``GateHistory.target``): it belongs to the session, not the document.
        """
        fresh = self.init_state(rows.shape[0], schedule)
        fresh = dataclasses.replace(fresh, history=dataclasses.replace(fresh.history, target=state.history.target))
        return _rows(rows, fresh, state)

    @staticmethod
    def with_target(state: DocState, target) -> DocState:
        """``state`` with the budget of each row set to ``target`` [B] (an update rate in [0, 1])."""
        return dataclasses.replace(state, history=dataclasses.replace(state.history, target=jnp.asarray(target, jnp.float32)))

    # --- The gate, shared by both paths.

    def _budget_score(self, schedule: Schedule, features):
        """[B] what a budgeted schedule ranks chunks by: the gate's output, or the policy's log-odds of updating."""
        if schedule.kind == "policy":
            logits = self.policy(features)[0]  # [B, len(ACTION_STEPS)]
            return jax.nn.logsumexp(logits[:, 1:], axis=-1) - logits[:, 0]
        return self.gate.score(features)

    def _chunk_lambda(self, schedule: Schedule, history: GateHistory, count):
        """lam and gradient steps of the chunk starting at document position ``count`` [B], from the history only.

        Returns:
          ``(lam [B], steps [B] int)``; both 0 where the chunk skips.
        """
        B = count.shape[0]
        index = count // self.config.gate.chunk  # [B] the chunk's number inside the document
        steps = jnp.full((B,), schedule.steps, jnp.int32)

        def coin():  # [B] 1.0 with probability target, drawn per chunk number
            draw = lambda i, p: jax.random.bernoulli(jax.random.fold_in(jax.random.key(schedule.seed), i), p)
            return jax.vmap(draw)(index, history.target).astype(jnp.float32)

        if schedule.kind == "learned":
            lam = self.gate(history.features)
        elif schedule.kind == "skip":
            lam = jnp.zeros((B,), jnp.float32)
        elif schedule.kind == "update":
            lam = jnp.ones((B,), jnp.float32)
        elif schedule.kind == "fixed":
            lam = jnp.full((B,), schedule.value, jnp.float32)
        elif schedule.kind == "random":
            lam = coin()
        elif schedule.kind == "random_learned":
            lam = coin() * self.gate(history.features)
        elif schedule.kind == "learned_budget":  # the gate's lam on the chunks the budget lets through
            score = self.gate.score(history.features)
            chosen = budget_choice(score, history.scores, index, history.used, history.target)
            # A value gate's score is a predicted gain, not a step size: a chosen chunk takes UPDATE_1's.
            step = 1.0 if self.config.gate.output == "value" else self.gate.lam(score)
            lam = jnp.where(chosen, step, 0.0)
        elif schedule.kind == "policy":
            if self.policy is None:
                raise ValueError("Schedule('policy') needs a model with an update policy (`ponder train policy`)")
            logits = self.policy(history.features)[0]  # [B, len(ACTION_STEPS)]
            if schedule.explore:  # a sample per row and chunk
                draw = lambda i, row, z: jax.random.categorical(
                    jax.random.fold_in(jax.random.fold_in(jax.random.key(schedule.seed), i), row), z
                )
                action = jax.vmap(draw)(index, jnp.arange(B), logits)
            else:
                score = jax.nn.logsumexp(logits[:, 1:], axis=-1) - logits[:, 0]
                chosen = budget_choice(score, history.scores, index, history.used, history.target)
                action = jnp.where(chosen, 1 + jnp.argmax(logits[:, 1:], axis=-1), 0)
            steps = jnp.asarray(ACTION_STEPS, jnp.int32)[action]
            lam = (steps > 0).astype(jnp.float32)
        else:  # threshold: update when chunk c-1 was hard to reconstruct; a document's first chunk always updates
            recon_before = history.features[:, 2]
            lam = jnp.where((count == 0) | (recon_before > history.threshold), 1.0, 0.0)
        lam = jnp.where(lam < self.config.gate.threshold, 0.0, lam).astype(jnp.float32)  # below threshold: no update
        return lam, jnp.where(lam > 0, steps, 0)

    def _close_chunk(self, schedule: Schedule, history: GateHistory, token_losses, tokens, recon, count, lam) -> GateHistory:
        """The history after a chunk: its features, the budget's books and the threshold controller.

        Args:
          token_losses: ``(nll, entropy, scored)`` [B, C] per token of the
            chunk under the base model (``chunk_stats``); tokens: [B, C].
          recon: ``(before, after)`` [B] first TTT layer's reconstruction loss.
          count: [B] document position after the chunk; lam: [B] the chunk's (0: skipped).
        """
        gate = self.config.gate
        updated = lam > 0
        stats, seen = chunk_stats(*token_losses, tokens, history.seen)
        chunk = count // gate.chunk - 1  # [B] the chunk's number in the document
        scores = history.scores
        if schedule.kind in ("learned_budget", "policy"):  # remember the score the chunk was ranked by
            rows = jnp.arange(chunk.shape[0])
            scores = scores.at[rows, chunk % scores.shape[1]].set(self._budget_score(schedule, history.features))
        used = history.used + updated
        # Threshold gate: steer the threshold so the update rate tracks the target.
        rate = gate.ema * history.rate + (1 - gate.ema) * updated
        threshold = history.threshold * jnp.exp(schedule.gain * (rate - history.target))
        budget = (rate, history.target, used, chunk + 1.0, seen.sum(-1).astype(jnp.float32))
        features = chunk_features(history.features, stats, recon, count.astype(jnp.float32), updated, lam, gate.ema, budget)
        return GateHistory(features, threshold, rate, history.target, used, scores, seen)

    # --- Whole chunks.

    def __call__(
        self,
        tokens,
        positions,
        schedule: Schedule = Schedule(),
        segment_ids=None,
        *,
        state: DocState | None = None,
        cache: KVCache | None = None,
        chunk_lambda=None,
        attention_ids=None,
        target=None,
    ) -> LMOutput:
        """Forward over whole chunks, from a document start or from ``state``.

        For each chunk c: lam_c from the schedule (features of chunk c-1 and
        the history only), then every TTT layer on the chunk in dual form, or
        only applied when lam_c is below the gate threshold for every row.

        Args:
          tokens, positions: [B, T], T a multiple of the gate chunk size.
          schedule: where lam comes from (the learned gate by default).
          segment_ids: [B, T] document ids of packed rows (from a document
            start only). Documents must start on chunk boundaries (packing
            pads them to whole chunks): where a chunk's first token opens a
            new document, the TTT and gating state go back to the
            start-of-document state, and base attention stays inside each
            document.
          state: the document so far, on a chunk boundary (its count a
            multiple of the chunk size), e.g. from an earlier call.
          cache: the base's KV cache holding the positions before these.
          chunk_lambda: [B, n_chunks] lam per chunk, overriding the schedule
            (evaluation baselines such as ORACLE choose it from outside); a
            schedule that reads the history still computes its features
            along the given choices.
          attention_ids: [B, T] where base attention may reach, finer than
            ``segment_ids`` (default: the same). Training with attention
            windows inside a document gives each window its own id, while
            the fast weights carry across windows (``TTTStage.window``).
          target: [B] the budget (target update rate) of each row, for every
            document of the row (default: the state's, or ``schedule.rate``).

        Returns:
          An ``LMOutput``.
        """
        B, T = tokens.shape
        C = self.config.gate.chunk
        if T % C:
            raise ValueError(f"sequence length {T} is not a multiple of the gate chunk size {C}")
        if segment_ids is not None and state is not None:
            raise ValueError("segment_ids packs documents from a document start: pass no state with them")
        n_chunks = T // C
        state = self.init_state(B, schedule) if state is None else state
        if target is not None:
            state = self.with_target(state, target)
        count = state.count
        features = schedule.reads_history
        base_logits, hidden, cache = self.base(
            tokens, positions, cache, segment_ids=segment_ids if attention_ids is None else attention_ids,
            compute_logits=features,
        )
        h = jax.lax.stop_gradient(hidden)  # frozen base
        if features:
            # Base statistics per token: token t is predicted by the logits at t-1
            # (the first by the state's last hidden); a document's first token is not scored.
            first_logits = self.base.logits(state.hidden[:, C:], frozen=True)  # [B, 1, V]
            first = token_stats(first_logits, tokens[:, :1])
            rest = token_stats(jax.lax.stop_gradient(base_logits[:, :-1]), tokens[:, 1:])
            nll, entropy = (jnp.concatenate([a, b], axis=1) for a, b in zip(first, rest))  # [B, T] each
        else:  # a schedule that ignores the features keeps the history as it is
            nll = entropy = jnp.zeros((B, T), jnp.float32)
        opens = (jnp.arange(T)[None] == 0) & (count[:, None] == 0)  # [B, T]
        if segment_ids is not None:
            opens = opens | jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
        per_chunk = lambda a: a.reshape(B, n_chunks, C, *a.shape[2:]).swapaxes(0, 1)  # [n, B, C, ...]
        new_document = opens[:, ::C].T & (jnp.arange(n_chunks) > 0)[:, None]  # [n, B]: reset inside this call
        fresh = self.with_target(self.init_state(B, schedule), state.history.target)  # a row keeps its budget
        # Update FLOPs of a chunk by its steps per mini-batch (0: skipped).
        step_flops = jnp.asarray([0.0] + [float(sum(layer.update_flops(C, k) for layer in self.ttt))
                                          for k in range(1, schedule.max_steps + 1)], jnp.float32)
        given = jnp.zeros((n_chunks, B), jnp.float32) if chunk_lambda is None else chunk_lambda.T

        def run_chunk(carry, inputs):
            h_c, nll_c, entropy_c, scored_c, tokens_c, opens_doc, lam_given = inputs  # h_c [B, C, D]
            # A document opening here starts from the initial TTT state and gating history.
            carry = _rows(opens_doc, (fresh.ttt, fresh.history), carry)
            states, history = carry
            chunk_count = states[0].count
            if chunk_lambda is None:
                lam, steps = self._chunk_lambda(schedule, history, chunk_count)  # [B] each
            else:
                lam = jnp.where(lam_given < self.config.gate.threshold, 0.0, lam_given)
                steps = jnp.where(lam > 0, schedule.steps, 0)
            updated = lam > 0

            def run(update: bool):
                x, new_states, recon = h_c, [], []
                for norm, layer, layer_state in zip(self.ttt_norms, self.ttt, states):
                    lam_mb = jnp.broadcast_to(lam[:, None], (B, C // self.config.ttt.mini_batch))
                    delta, layer_state, losses = layer.chunk(
                        norm(x), lam_mb, layer_state, update=update, steps=schedule.max_steps, row_steps=steps
                    )
                    x = x + delta
                    new_states.append(layer_state)
                    recon.append(losses)
                return x, new_states, recon

            # A real skip: when no row updates, the update branch does not run.
            y_c, states, recon_all = jax.lax.cond(jnp.any(updated), lambda: run(True), lambda: run(False))
            recon = recon_all[0]  # gate features use the first TTT layer's reconstruction losses
            ttt_loss = sum(after for _, after in recon_all) / len(recon_all)  # [B]
            seen_features = history.features
            if features:
                history = self._close_chunk(
                    schedule, history, (nll_c, entropy_c, scored_c), tokens_c, recon, states[0].count, lam
                )
            return (states, history), (y_c, lam, steps, step_flops[steps], ttt_loss, seen_features)

        inputs = (per_chunk(h), per_chunk(nll), per_chunk(entropy), per_chunk(~opens), per_chunk(tokens), new_document, given)
        (states, history), (y, lam, steps, flops, ttt_loss, seen_features) = jax.lax.scan(
            run_chunk, (state.ttt, state.history), inputs
        )
        y = y.swapaxes(0, 1).reshape(B, T, -1)  # [B, T, D]
        end = DocState(
            ttt=states,
            history=history,
            lam=lam[-1],
            steps=steps[-1],
            hidden=state.hidden.at[:, C].set(h[:, -1]),  # the token before the next chunk
            tokens=state.tokens,
            start=states[0],
        )
        return LMOutput(
            logits=self.base.logits(y, frozen=True),
            chunk_lambda=lam.T,
            chunk_updated=lam.T > 0,
            chunk_steps=steps.T,
            chunk_features=seen_features.swapaxes(0, 1),
            ttt_flops=flops.sum(0),
            ttt_loss=ttt_loss.T,
            state=end,
            cache=cache,
        )

    # --- One token.

    def _track_chunk(self, schedule: Schedule, before: DocState, after: DocState, tokens, h) -> DocState:
        """Decoding's share of the gate: buffer the open chunk, and at its last token close it.

        Closing computes the features the full forward computes for the chunk
        (base CE and entropy from the buffered hidden states, the first TTT
        layer's reconstruction loss at the chunk-start and current weights).
        """
        B, C = tokens.shape[0], self.config.gate.chunk
        count = before.count
        i = count % C  # [B] offset inside the chunk
        opening, closing = i == 0, i == C - 1
        start = _rows(opening, before.ttt[0], before.start)
        hidden_buf = select_rows(opening, before.hidden.at[:, 0].set(before.hidden[:, C]), before.hidden)
        rows = jnp.arange(B)
        hidden_buf = hidden_buf.at[rows, i + 1].set(h)  # [B, C + 1, D]
        token_buf = before.tokens.at[rows, i].set(tokens)  # [B, C]

        def close():
            logits = self.base.logits(hidden_buf[:, :C], frozen=True)  # [B, C, V]: slot j predicts token j
            nll, entropy = token_stats(logits, token_buf)
            scored = ((count - i)[:, None] + jnp.arange(C)) != 0  # a document's first token is not scored
            layer, now = self.ttt[0], after.ttt[0]
            _, XK, target, _, _ = layer.heads(self.ttt_norms[0](hidden_buf[:, 1:]), start.conv_history, start.count)
            recon = (layer.recon_loss(XK, target, start.W, start.b), layer.recon_loss(XK, target, now.W, now.b))
            return self._close_chunk(schedule, before.history, (nll, entropy, scored), token_buf, recon, count + 1, after.lam)

        history = jax.lax.cond(jnp.any(closing), close, lambda: before.history)
        history = _rows(closing, history, before.history)
        return dataclasses.replace(after, history=history, hidden=hidden_buf, tokens=token_buf, start=start)

    def _token(self, tokens, h, state: DocState, schedule: Schedule):
        """The TTT layers and the gate on one token per row, given its base hidden state.

        Args:
          tokens: [B]; h: [B, D] the base's final hidden state of ``tokens``.

        Returns:
          ``(y [B, D], state)``: the hidden state for the LM head, and the new state.
        """
        if self.config.eot_id is not None:
            state = self.reset(state, tokens == self.config.eot_id, schedule)
        C = self.config.gate.chunk
        count = state.count
        opening = count % C == 0
        # A chunk's first token takes its lam from the history. Most steps open no
        # chunk: skip the schedule's work (a gate MLP, a random draw).
        def decide():
            lam, steps = self._chunk_lambda(schedule, state.history, count)
            return jnp.where(opening, lam, state.lam), jnp.where(opening, steps, state.steps)

        lam, steps = jax.lax.cond(jnp.any(opening), decide, lambda: (state.lam, state.steps))

        def run(update: bool):
            x, new_states = h, []
            for norm, layer, layer_state in zip(self.ttt_norms, self.ttt, state.ttt):
                delta, layer_state = layer.step(
                    layer_state, norm(x), lam, update=update, steps=schedule.max_steps, row_steps=steps
                )
                x = x + delta
                new_states.append(layer_state)
            return x, new_states

        y, states = jax.lax.cond(jnp.any(lam > 0), lambda: run(True), lambda: run(False))
        new_state = dataclasses.replace(state, ttt=states, lam=lam, steps=steps)
        if schedule.reads_history:  # only a gate that reads the features needs the chunk's buffers
            new_state = self._track_chunk(schedule, state, new_state, tokens, h)
        return y, new_state

    def step(
        self, tokens, positions, cache: KVCache, state: DocState, schedule: Schedule = Schedule(), attend_keys: int | None = None
    ):
        """One token per row: the decode path.

        An end-of-document token (``config.eot_id``) opens a new document:
        the row's state is reset before the token is fed. Its position
        should restart at 0, which hides the old document from attention.

        Args:
          tokens, positions: [B]; cache: the base's KV cache; state: the rows'
            ``DocState``; schedule: where lam comes from (UPDATE_k and the
            policy's steps as the full forward takes them); attend_keys: see
            ``model.gpt2.Attention``.

        Returns:
          ``(logits [B, V], cache, state)``.
        """
        _, hidden, cache = self.base(tokens[:, None], positions[:, None], cache, compute_logits=False, attend_keys=attend_keys)
        y, state = self._token(tokens, hidden[:, 0], state, schedule)
        return self.base.logits(y[:, None], frozen=True)[:, 0], cache, state

    def extend(self, tokens, positions, length, cache: KVCache, state: DocState, schedule: Schedule = Schedule()):
        """``step`` over up to T tokens per row in one call: a prompt's tail inside a chunk.

        The base runs on all T tokens at once (a prefill); the TTT layers and
        the gate then take them one by one under ``lax.scan``, as decoding
        does, so the call may start and end anywhere inside a chunk. Rows are
        right-padded: tokens at or after ``length`` leave the state as it was
        (their keys land in the cache past the row's end, where attention
        never looks).

        Args:
          tokens, positions: [B, T]; length: [B] real tokens per row (>= 1).

        Returns:
          ``(logits [B, V] at each row's last real token, cache, state)``.
        """
        _, hidden, cache = self.base(tokens, positions, cache, compute_logits=False)  # hidden [B, T, D]

        def one(carry, inputs):
            state, last = carry
            t, token, h = inputs  # token [B], h [B, D]
            y, new_state = self._token(token, h, state, schedule)
            real = t < length  # [B]
            state = _rows(real, new_state, state)
            last = select_rows(real, y, last)
            return (state, last), None

        T = tokens.shape[1]
        inputs = (jnp.arange(T), tokens.T, hidden.swapaxes(0, 1))  # [T, B], [T, B, D]
        (state, last), _ = jax.lax.scan(one, (state, jnp.zeros_like(hidden[:, 0])), inputs)
        return self.base.logits(last[:, None], frozen=True)[:, 0], cache, state
