"""The engine serving In-Place TTT and LoRA fast weights (issue 22).

Each kind runs on a small random model whose updates are live and capped
often: the served tokens equal the model's own token-by-token decoding, a
session reused across extensions, edits and window moves equals a cold
start, capped updates reach the metrics, and what these kinds cannot do (a
learned gate, a per-session budget, without LoRA's read gate) is refused by
name. LoRA with a read gate is served under ``learned_budget`` with each
session's budget.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.model.config import GPTConfig
from ponder.model.document import initial_state
from ponder.model.gating import Schedule
from ponder.model.generate import SamplingParams, stream_ttt_tokens
from ponder.model.gpt2 import KVCache
from ponder.model.inplace import InPlaceConfig, InPlaceLM, InPlaceLMConfig
from ponder.model.lora import LoRAConfig, LoRALM, LoRALMConfig
from ponder.server.engine import Engine, EngineConfig
from ponder.server.types import DoneEvent, Job, RequestError

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=512, n_embd=64, n_layer=2, n_head=2)
C = 16
MAX_NEW = 64
EVENT_TIMEOUT_S = 300  # a guard against a hang (a first compilation on a loaded machine), not a speed limit


def lora_model(gate=False):
    config = LoRALMConfig(BASE, LoRAConfig(layers=2, rank=4, chunk=C, lr=2.0, clip=0.05), eot_id=0,
                          gate=LoRALMConfig.read_gate(C) if gate else None)
    model = LoRALM(config, rngs=nnx.Rngs(0))
    if gate:  # a score that varies from chunk to chunk
        model.gate.out.kernel[...] = jax.random.normal(jax.random.key(1), model.gate.out.kernel.shape)
    return model


def inplace_model():
    config = InPlaceLMConfig(BASE, InPlaceConfig(layers=2, chunk=C, eta=0.05, clip=0.2, conv_width=3), eot_id=0)
    model = InPlaceLM(config, rngs=nnx.Rngs(0))
    # A trained-looking target (it starts at zero, which would make every update vanish).
    model.W_target[...] = jax.random.normal(jax.random.key(1), model.W_target.shape) * 0.5
    model.conv[...] = jax.random.normal(jax.random.key(2), model.conv.shape)
    return model


@pytest.fixture(scope="module", params=["lora", "inplace"])
def served(request):
    model = lora_model() if request.param == "lora" else inplace_model()
    engine = Engine(model, EngineConfig(slots=2, max_new_tokens=MAX_NEW, queue_size=4, snapshots=4,
                                        schedule=Schedule("update")))
    engine.start()
    yield model, engine
    engine.stop(drain_s=1)


def _doc(n, seed=0):
    """A document of n tokens: end-of-document, then a repeating text (so that updates change predictions)."""
    pattern = np.random.default_rng(seed).integers(1, 512, 40)
    return [0, *np.resize(pattern, n - 1).tolist()]


def _run(engine, tokens, session, max_new=8, update_rate=None):
    """Submits a greedy job and collects ``(tokens, chunk lambdas, done event)``."""
    job = Job("", session, None, list(tokens), max_new, update_rate=update_rate)
    engine.submit(job)
    out, lambdas = [], []
    while not isinstance(event := job.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
        out += event.token_ids
        lambdas += event.chunk_lambda
    return out, lambdas, event


def _greedy_by_steps(model, prompt, n, schedule=Schedule("update")):
    """The model's own decoding: every token through ``step`` from a fresh state, then ``n`` greedy tokens."""
    step = nnx.jit(lambda m, t, p, c, s: m.step(t, p, c, s, schedule))
    cache, state, out = KVCache.init(BASE, 1), initial_state(model, 1, schedule), []
    tokens = list(prompt)
    for position in range(len(prompt) + n - 1):
        logits, cache, state = step(model, jnp.asarray([tokens[position]]), jnp.asarray([position]), cache, state)
        if position >= len(prompt) - 1:
            tokens.append(int(jnp.argmax(logits[0])))
    return tokens[len(prompt):]


def test_capped_updates_are_counted(served):
    """The first test on each engine: no decode step has run, so the counter moves only by this prefill."""
    model, engine = served
    tokens = _doc(100, seed=5)
    before = engine.metrics.fast_weight_clips._value.get()
    _, _, done = _run(engine, tokens, session="clips", max_new=0)  # whole chunks only: one prefill, no decoding
    assert done.usage.generated_tokens == 0
    ids = jnp.asarray([tokens[:96]])
    want = int(nnx.jit(lambda m, t: m(t, jnp.arange(96)[None], Schedule("update")).state.clipped)(model, ids)[0])
    assert want > 0 and engine.metrics.fast_weight_clips._value.get() - before == want


def test_served_tokens_equal_the_models_own_decoding(served):
    model, engine = served
    for n in (5, 40, 64):  # inside the first chunk; chunks and an open one; whole chunks then the last token
        prompt = _doc(n, seed=n)
        got, lambdas, done = _run(engine, prompt, session=f"offline-{n}", max_new=20)
        assert got == _greedy_by_steps(model, prompt, 20), n
        offline = stream_ttt_tokens(model, prompt, SamplingParams(max_new_tokens=20), eot_id=0, schedule=Schedule("update"))
        assert got == [t for piece in offline for t in piece], n  # `ponder generate`'s path: whole chunks, then steps
        assert lambdas == [1.0] * ((n + 19) // C)  # every chunk closed by the prompt and the reply updates
        assert done.usage.chunks_updated == len(lambdas) and done.usage.ttt_flops > 0


def test_session_reuse_edits_and_window_moves_equal_a_cold_start(served):
    """W = 512: positions past 192 move the window. Each warm request equals a cold start, including edits
    that roll back into a block whose window the session's cache no longer holds."""
    _, engine = served
    doc = _doc(900, seed=1)
    edit = lambda at, tokens: tokens[:at] + [7, 8, 9] + tokens[at + 3:]
    steps = [doc[:40], doc[:41], doc[:100], doc[:230], edit(150, doc)[:240], doc[:300], edit(250, doc)[:260],
             doc[:520], edit(450, doc)[:470], doc[:700], edit(600, doc)[:650], doc[:900]]
    for i, prompt in enumerate(steps):
        warm, _, warm_done = _run(engine, prompt, session="reuse")
        cold, _, cold_done = _run(engine, prompt, session=f"cold-{i}")
        assert warm == cold, f"step {i} ({len(prompt)} tokens)"
        # The fast weights are more sensitive than greedy tokens: an update attends to the cached keys.
        warm_doc, cold_doc = (engine.sessions.get("", name).doc for name in ("reuse", f"cold-{i}"))
        for a, b in zip(jax.tree.leaves(warm_doc), jax.tree.leaves(cold_doc)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"step {i}")
        assert cold_done.usage.cached_tokens == 0
        if i in (1, 2, 3, 9):  # the prompt extends the history: only the new tokens run
            assert warm_done.usage.cached_tokens >= len(steps[i - 1]) - 2 * C
    assert warm_done.usage.truncated  # the window did move


def test_a_budget_and_the_learned_gate_are_refused_by_name(served):
    model, engine = served
    with pytest.raises(RequestError, match=f"update_rate.*{model.config.KIND} fast weights"):
        engine.submit(Job("", "budget", None, [0, 1, 2], 4, update_rate=0.5))
    with pytest.raises(ValueError, match="follow the schedules.*not 'learned': serve with --schedule update"):
        Engine(model, EngineConfig(slots=1, max_new_tokens=MAX_NEW))


@pytest.fixture(scope="module")
def gated():
    model = lora_model(gate=True)
    engine = Engine(model, EngineConfig(slots=2, max_new_tokens=MAX_NEW, queue_size=4, snapshots=4,
                                        schedule=Schedule("learned_budget", rate=0.5)))
    engine.start()
    yield model, engine
    engine.stop(drain_s=1)


def test_a_gated_lora_serves_its_own_decoding_under_each_sessions_budget(gated):
    model, engine = gated
    prompt = _doc(70, seed=3)
    chosen = {}
    for rate in (0.0, 0.5, 1.0):
        got, lambdas, _ = _run(engine, prompt, session=f"gated-{rate}", max_new=20, update_rate=rate)
        assert got == _greedy_by_steps(model, prompt, 20, Schedule("learned_budget", rate=rate)), rate
        chosen[rate] = lambdas
    assert set(chosen[0.0]) == {0.0} and set(chosen[1.0]) == {1.0} and set(chosen[0.5]) == {0.0, 1.0}


def test_a_gated_sessions_reuse_equals_a_cold_start(gated):
    _, engine = gated
    doc = _doc(600, seed=2)
    steps = [doc[:40], doc[:41], doc[:100], doc[:90] + [7, 8, 9], doc[:300], doc[:600]]
    for i, prompt in enumerate(steps):
        warm, _, _ = _run(engine, prompt, session="gated-reuse", update_rate=0.3)
        cold, _, _ = _run(engine, prompt, session=f"gated-cold-{i}", update_rate=0.3)
        assert warm == cold, f"step {i} ({len(prompt)} tokens)"
        warm_doc, cold_doc = (engine.sessions.get("", name).doc for name in ("gated-reuse", f"gated-cold-{i}"))
        for a, b in zip(jax.tree.leaves(warm_doc), jax.tree.leaves(cold_doc)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"step {i}")


def test_the_lambda_viewer_shows_each_kind(served, bundled_tokenizer):
    """The viewer's numbers come from the window-by-window run ``ponder eval`` uses: every chunk updated under
    UPDATE, none under SKIP, and the document's CE under SKIP equal to the plain forward's."""
    from ponder.server.viewer.data import inspect_tokens

    model, _ = served
    tokens = _doc(3 * C + 5, seed=9)
    shown = inspect_tokens(model, bundled_tokenizer, tokens, Schedule("update"))
    assert [c.lam for c in shown.chunks] == [1.0] * 4 and all(c.updated and c.flops > 0 for c in shown.chunks)
    assert shown.ce != shown.ce_skip and shown.ttt_flops == shown.update_1_flops
    ids = jnp.asarray([tokens])
    logits = model.base(ids, jnp.arange(len(tokens))[None])[0][0, :-1]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[0, 1:, None], -1)[:, 0]
    np.testing.assert_allclose(shown.ce_skip, float(nll.mean()), rtol=1e-5)
    assert not any(c.updated for c in inspect_tokens(model, bundled_tokenizer, tokens, Schedule("skip")).chunks)
