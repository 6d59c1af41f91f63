"""Parity with Hugging Face transformers' GPT2LMHeadModel on the same weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GPT2Config, GPT2LMHeadModel

from ponder.model.config import GPTConfig
from ponder.model.gpt2 import ATTN_BLOCK, init_model, next_token_loss
from ponder.model.hf import export_hf, import_hf

TOLERANCE = 1e-4  # docs/design.md, "Base model": logits within 1e-4 of transformers' on the same weights

CONFIGS = {
    "tiny": GPTConfig.tiny(vocab_size=1024),
    "gpt2-shaped": GPTConfig.gpt2(),
}


def _hf_twin(model, tokenizer, tmp_path):
    export_hf(model, tokenizer, tmp_path / "hf")
    return GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()


def _tokens(config, batch=2, length=48, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


def logits_gap(model, hf, tokens) -> float:
    """Largest difference between our logits and ``hf``'s on ``tokens`` [B, T] (over ``hf``'s vocabulary)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    ours = np.asarray(model(jnp.asarray(tokens), positions)[0])
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    return float(np.abs(ours[..., : theirs.shape[-1]] - theirs).max())


@pytest.mark.parametrize("name, length", [("tiny", 48), ("tiny", 4 * ATTN_BLOCK), ("gpt2-shaped", 48)])
def test_logits_match_transformers(name, length, gpt2_tokenizer, code_tokenizer, tmp_path):
    config = CONFIGS[name]
    tokenizer = gpt2_tokenizer if config.vocab_size >= len(gpt2_tokenizer) else code_tokenizer
    config = dataclasses.replace(config, vocab_size=len(tokenizer))
    model = init_model(config, seed=1)
    hf = _hf_twin(model, tokenizer, tmp_path)
    tokens = _tokens(config, length=length)  # 4 * ATTN_BLOCK takes the block-causal path
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    ours, hidden, _ = model(jnp.asarray(tokens), positions)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), output_hidden_states=True)
    assert np.abs(np.asarray(ours) - out.logits.numpy()).max() <= TOLERANCE
    assert np.abs(np.asarray(hidden) - out.hidden_states[-1].numpy()).max() <= TOLERANCE


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_transformers(name, gpt2_tokenizer, code_tokenizer, tmp_path):
    config = CONFIGS[name]
    tokenizer = gpt2_tokenizer if config.vocab_size >= len(gpt2_tokenizer) else code_tokenizer
    config = dataclasses.replace(config, vocab_size=len(tokenizer))
    model = init_model(config, seed=2)
    hf = _hf_twin(model, tokenizer, tmp_path)
    tokens = _tokens(config, length=33, seed=1)

    grads = nnx.grad(next_token_loss)(model, jnp.asarray(tokens))
    hf_tokens = torch.tensor(tokens)
    hf(hf_tokens, labels=hf_tokens).loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}

    flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
    assert len(flat) == len(hf_grads)
    for path, ours in flat:
        keys = [str(getattr(k, "key", k)) for k in path]
        leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(keys[-1], keys[-1])
        theirs = hf_grads["transformer." + ".".join(keys[:-1] + [leaf])]
        assert np.abs(np.asarray(ours) - theirs).max() <= TOLERANCE, keys


def test_export_import_round_trip_is_bit_exact(code_tokenizer, tmp_path):
    model = init_model(GPTConfig.tiny(vocab_size=len(code_tokenizer)), seed=3)
    export_hf(model, code_tokenizer, tmp_path / "hf")
    again, tokenizer = import_hf(tmp_path / "hf")
    assert tokenizer.vocab_size == code_tokenizer.vocab_size
    ours = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    theirs = jax.tree.leaves(nnx.to_pure_dict(nnx.state(again)))
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch-bin"])
def test_import_of_a_transformers_checkpoint(safe, gpt2_tokenizer, tmp_path):
    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=len(gpt2_tokenizer) - 3, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    hf = GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    model, tokenizer = import_hf(tmp_path / "hf", gpt2_tokenizer)  # no tokenizer.json: the caller names it
    # GPT-2's vocabulary plus our three fill-in-the-middle tokens.
    assert model.config.vocab_size == len(tokenizer) == hf_config.vocab_size + 3
    assert logits_gap(model, hf, _tokens(hf_config, length=20)) <= TOLERANCE
