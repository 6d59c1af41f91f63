"""Weights held in bfloat16 or int8 for serving (``model.quantize``, ``--weights``).

The int8 product is checked against the arithmetic it stands for (NumPy,
float64), forward and backward; a quantized model decodes token by token as
its own full forward does, the server's tokens equal its offline generation,
and on the bundled checkpoint the cross-entropy moves by less than the 0.5%
the issue allows.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.model import checkpoint, quantize
from ponder.model.config import GPTConfig
from ponder.model.document import run_document
from ponder.model.gating import Schedule
from ponder.model.generate import SamplingParams, stream_ttt_tokens
from ponder.model.gpt2 import GPT, KVCache, forward
from ponder.model.inplace import InPlaceConfig, InPlaceLM, InPlaceLMConfig
from ponder.model.lora import LoRAConfig, LoRALM, LoRALMConfig
from ponder.server.engine import Engine, EngineConfig
from ponder.server.types import DoneEvent, Job

BASE = dataclasses.replace(GPTConfig.tiny(vocab_size=512), n_positions=256, n_embd=64, n_layer=2, n_head=2)
EVENT_TIMEOUT_S = 300  # a guard against a hang, not a speed limit


def _int8_reference(x, w, transposed=False):
    """What the int8 product stands for, in float64: per-output weight scales, per-row input scales."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    w = w.T if transposed else w  # [K, N]
    w_scale = np.abs(w).max(0) / 127
    x_scale = np.abs(x).max(1, keepdims=True) / 127
    return (np.round(x / x_scale) @ np.round(w / w_scale)) * x_scale * w_scale


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int8_product_is_the_quantized_arithmetic(rows, transposed):
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 48)).astype(np.float32)
    w = rng.normal(size=(24, 48) if transposed else (48, 24)).astype(np.float32)
    wq, scale = quantize.quantize_int8(w, axis=1 if transposed else 0)
    got = np.asarray(jax.jit(lambda x: quantize.product(x, wq, scale.reshape(-1), transposed=transposed))(x))
    np.testing.assert_allclose(got, _int8_reference(x, w, transposed), rtol=1e-5, atol=1e-6)
    # And it is a fair stand-in for the float product (the error a per-row, per-column 8-bit grid makes).
    assert np.abs(got - x @ (w.T if transposed else w)).max() < 0.05 * np.abs(x @ (w.T if transposed else w)).max()


def test_int8_gradient_is_the_same_product_on_the_transposed_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 32)).astype(np.float32)
    w = rng.normal(size=(32, 16)).astype(np.float32)
    g = rng.normal(size=(3, 16)).astype(np.float32)
    wq, scale = quantize.quantize_int8(w, axis=0)
    dx = jax.grad(lambda x: jnp.sum(quantize.product(x, wq, scale[0]) * g))(x)
    dequantized = np.asarray(wq, np.float64) * np.asarray(scale, np.float64)  # [K, N]
    # dx = (g * scale) W^T, with g * scale quantized per row as any input is and wq used as stored.
    gs = g * np.asarray(scale[0], np.float64)
    g_scale = np.abs(gs).max(1, keepdims=True) / 127
    np.testing.assert_allclose(np.asarray(dx), np.round(gs / g_scale) @ np.asarray(wq, np.float64).T * g_scale,
                               rtol=1e-5, atol=1e-6)
    exact = g @ dequantized.T
    assert np.abs(np.asarray(dx) - exact).max() < 0.02 * np.abs(exact).max()


def test_bad_weights_are_named():
    with pytest.raises(ValueError, match="weights must be one of float32, bfloat16, int8, got 'int4'"):
        checkpoint.load(DEFAULT_CHECKPOINT, weights="int4")


def _linears(model: GPT):
    return [m for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_what_is_stored_in_fewer_bits(weights):
    model = quantize.quantize_lm(GPT(BASE, rngs=nnx.Rngs(0)), weights)
    dtype = jnp.int8 if weights == "int8" else jnp.bfloat16
    assert all(m.weight[...].dtype == dtype for m in _linears(model)) and model.wte.embedding[...].dtype == dtype
    assert model.wpe.embedding[...].dtype == jnp.float32 and model.h[0].ln_1.scale[...].dtype == jnp.float32
    # In-Place TTT's fast W_down replaces its blocks' c_proj kernel: those stay as they were.
    inplace = InPlaceLM(InPlaceLMConfig(BASE, InPlaceConfig(layers=1, chunk=16), eot_id=0), rngs=nnx.Rngs(0))
    quantize.quantize_lm(inplace, weights)
    top = inplace.base.h[-1]
    assert isinstance(top.mlp.c_proj, nnx.Linear) and top.mlp.c_proj.kernel[...].dtype == jnp.float32
    assert isinstance(top.mlp.c_fc, quantize.Linear) and isinstance(inplace.base.h[0].mlp.c_proj, quantize.Linear)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_quantized_decoding_equals_its_full_forward(weights):
    model = quantize.quantize_lm(GPT(BASE, rngs=nnx.Rngs(0)), weights)
    tokens = np.random.default_rng(1).integers(0, BASE.vocab_size, (2, 40))
    full = np.asarray(model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(40), (2, 40)))[0])
    # The cached and the full forward sum attention in different orders; in bfloat16 a last-bit
    # difference can round a product's input to its neighbour, a relative step of 2^-8.
    tolerance = 1e-4 if weights == "int8" else 2**-8 * np.abs(full).max()
    graphdef, state = nnx.split(model)
    cache = KVCache.init(BASE, 2)
    for start, end in ((0, 17), (17, 18), (18, 19), (19, 40)):
        positions = jnp.broadcast_to(jnp.arange(start, end), (2, end - start))
        logits, _, cache = forward(graphdef, state, jnp.asarray(tokens[:, start:end]), positions, cache)
        assert np.abs(np.asarray(logits) - full[:, start:end]).max() <= tolerance, (start, end)


@pytest.fixture(scope="module")
def bundled():
    models = {w: checkpoint.load(DEFAULT_CHECKPOINT, weights=w) for w in quantize.WEIGHTS}
    tokenizer = models["float32"][1]
    source = jax.__file__.rsplit("/", 1)[0] + "/_src/api.py"  # a real Python file of 1,024 tokens or more
    tokens = np.asarray(tokenizer.encode_document(open(source).read())[:1024], np.int32)
    return {w: m for w, (m, _) in models.items()}, tokens


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_bundled_checkpoint_cross_entropy_within_half_a_percent(bundled, weights):
    models, tokens = bundled
    for schedule in (Schedule("skip"), Schedule()):
        want = run_document(models["float32"], tokens, schedule, 512).nll.mean()
        got = run_document(models[weights], tokens, schedule, 512).nll.mean()
        assert abs(got / want - 1) < 0.005, (schedule.kind, got, want)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_served_tokens_equal_offline_generation(bundled, weights):
    models, tokens = bundled
    model = models[weights]
    engine = Engine(model, EngineConfig(slots=2, max_new_tokens=16, queue_size=4))
    engine.start()
    try:
        # /metrics counts the weights as served (a quarter or half of float32's kernels and table).
        served = engine.metrics.registry.get_sample_value("ponder_memory_bytes", {"part": "weights"})
        assert served == sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
        for n in (40, 300):
            prompt = tokens[:n].tolist()
            want = [t for piece in stream_ttt_tokens(model, prompt, SamplingParams(max_new_tokens=12),
                                                     eot_id=model.config.eot_id) for t in piece]
            job = Job("", f"q-{n}", None, prompt, 12)
            engine.submit(job)
            got = []
            while not isinstance(event := job.next_event(timeout=EVENT_TIMEOUT_S), DoneEvent):
                got += event.token_ids
            assert got == want, n
    finally:
        engine.stop(drain_s=1)


def test_lora_updates_back_propagate_through_int8_blocks():
    config = LoRALMConfig(BASE, LoRAConfig(layers=2, rank=4, chunk=16, lr=2.0), eot_id=0)
    model = quantize.quantize_lm(LoRALM(config, rngs=nnx.Rngs(0)), "int8")
    tokens = np.resize(np.random.default_rng(2).integers(1, 512, 24), 128).astype(np.int32)
    skip = run_document(model, tokens, Schedule("skip"), 128)
    update = run_document(model, tokens, Schedule("update"), 128)
    assert np.isfinite(update.nll).all()
    # The repeated text is learned from the adapters' updates: later chunks get easier than without them.
    assert update.nll[64:].mean() < skip.nll[64:].mean() - 0.05
