"""The TTT language model: TTT layers on top of a frozen GPT-2 (DESIGN.md §2).

``h = base(x)`` (after ``ln_f``, gradient stopped), then for each TTT layer
``h = h + TTT(LN(h))``, then ``logits = h . wte^T`` with the base's tied head.
The TTT output projections start at zero, so a fresh model predicts exactly
what the base does.

``step`` is the decode path: one token per row through the base's KV cache
and every TTT layer's primal step; it reproduces the full forward.

Not yet built (issue 3): the gating network (callers pass the gate scales
lam), end-of-document tokens as boundaries, and document resets inside
packed sequences.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from model.config import GPTConfig
from model.gpt2 import GPT, KVCache
from model.ttt import TTTConfig, TTTLinear, TTTState


@dataclasses.dataclass(frozen=True)
class TTTLMConfig:
    """A base GPT-2 config, the TTT layer config and how many TTT layers to stack."""

    base: GPTConfig
    ttt: TTTConfig
    n_ttt_layers: int = 1

    def __post_init__(self):
        if self.ttt.width != self.base.n_embd:
            raise ValueError(f"TTT width {self.ttt.width} must equal the base model's n_embd {self.base.n_embd}")
        if self.n_ttt_layers < 1:
            raise ValueError(f"n_ttt_layers must be >= 1, got {self.n_ttt_layers}")


class TTTTransformerLM(nnx.Module):
    def __init__(self, config: TTTLMConfig, *, rngs: nnx.Rngs, base: GPT | None = None):
        self.config = config
        self.base = base if base is not None else GPT(config.base, rngs=rngs)
        self.ttt_norms = nnx.List(
            [nnx.LayerNorm(config.base.n_embd, epsilon=1e-5, rngs=rngs) for _ in range(config.n_ttt_layers)]
        )
        self.ttt = nnx.List([TTTLinear(config.ttt, rngs=rngs) for _ in range(config.n_ttt_layers)])

    def __call__(self, tokens, positions, lam):
        """Full-sequence forward from a document start (dual form).

        Args:
          tokens, positions: [B, T], T a multiple of the TTT mini-batch size.
          lam: [B, T / K] gate scale per mini-batch (shared by every TTT layer).

        Returns:
          ``(logits [B, T, V], states)``: one ``TTTState`` per TTT layer.
        """
        _, hidden, _ = self.base(tokens, positions, compute_logits=False)
        h = jax.lax.stop_gradient(hidden)  # [B, T, D]: the base is frozen
        states: list[TTTState] = []
        for norm, layer in zip(self.ttt_norms, self.ttt):
            delta, state = layer(norm(h), lam)
            h = h + delta
            states.append(state)
        return self.base.logits(h, frozen=True), states

    def init_states(self, batch_size: int) -> list[TTTState]:
        return [layer.init_state(batch_size) for layer in self.ttt]

    def step(self, tokens, positions, cache: KVCache, states: list[TTTState], lam):
        """One token per row: the decode path.

        Args:
          tokens, positions: [B]; cache: the base's KV cache; states: one per
            TTT layer; lam: [B] gate scale of the mini-batch each token is in.

        Returns:
          ``(logits [B, V], cache, states)``.
        """
        _, hidden, cache = self.base(tokens[:, None], positions[:, None], cache, compute_logits=False)
        h = hidden[:, 0]  # [B, D]
        new_states = []
        for norm, layer, state in zip(self.ttt_norms, self.ttt, states):
            delta, state = layer.step(state, norm(h), lam)
            h = h + delta
            new_states.append(state)
        return self.base.logits(h[:, None], frozen=True)[:, 0], cache, new_states
