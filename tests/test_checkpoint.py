"""Checkpoint save/load, and clear errors for damaged or mismatched directories."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from ponder.model import checkpoint
from ponder.model.checkpoint import CheckpointError
from ponder.model.gpt2 import init_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_config, code_tokenizer):
    model = init_model(small_config, seed=4)
    path = checkpoint.save(tmp_path_factory.mktemp("ckpt") / "c", model, code_tokenizer)
    return path, model


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved[0], target)
    return target


def _logits(model):
    tokens = jnp.arange(30)[None] % 97
    return np.asarray(model(tokens, jnp.arange(30)[None])[0])


def test_save_load_gives_identical_logits(saved, code_tokenizer):
    path, model = saved
    loaded, tokenizer = checkpoint.load(path)
    assert loaded.config == model.config
    assert np.array_equal(_logits(loaded), _logits(model))
    assert tokenizer.encode("def f(): pass") == code_tokenizer.encode("def f(): pass")


def test_refuses_to_overwrite(saved, code_tokenizer):
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(saved[0], saved[1], code_tokenizer)


def _largest_state_file(path):
    return max((p for p in (path / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_truncated_file_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    victim = _largest_state_file(path)
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{victim.name} is truncated"):
        checkpoint.load(path)


def test_corrupt_file_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    victim = _largest_state_file(path)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name} is corrupt"):
        checkpoint.load(path)


def test_missing_tokenizer_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        checkpoint.load(path)


def test_missing_manifest_and_directory(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "absent")
    path = _copy(saved, tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        checkpoint.load(path)


def _rewrite_config(path, **changes):
    """Edits config.json and re-signs the manifest: a consistent directory whose config no longer fits its state."""
    data = json.loads((path / "config.json").read_text())
    data["model"].update(changes)
    (path / "config.json").write_text(json.dumps(data))
    (path / "manifest.json").write_text(json.dumps(checkpoint._manifest(path)))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_layer": 5}, r"parameter h\.4\.\S+ is missing"),
        ({"n_layer": 3}, r"unexpected parameter h\.3\."),
        ({"n_positions": 64}, r"parameter wpe\.embedding has shape \(128, 256\), the config implies \(64, 256\)"),
        ({"param_dtype": "bfloat16"}, r"has dtype float32, the config implies bfloat16"),
        ({"n_heads": 4}, r"unknown model config field\(s\) \['n_heads'\]"),
        ({"n_head": 3}, r"n_embd \(256\) must be divisible by n_head \(3\)"),
        ({"vocab_size": 512}, r"has 1024 tokens but config.json sets vocab_size 512"),
    ],
)
def test_config_state_mismatch_is_named(saved, tmp_path, changes, message):
    path = _copy(saved, tmp_path)
    _rewrite_config(path, **changes)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)


def test_bfloat16_parameters_round_trip(small_config, code_tokenizer, tmp_path):
    config = dataclasses.replace(small_config, param_dtype="bfloat16")
    model = init_model(config)
    checkpoint.save(tmp_path / "bf16", model, code_tokenizer)
    loaded, _ = checkpoint.load(tmp_path / "bf16")
    assert loaded.wte.embedding[...].dtype == jnp.bfloat16
    assert np.array_equal(_logits(loaded), _logits(model))


def test_bfloat16_storage_of_a_float32_ttt_model(small_config, code_tokenizer, tmp_path):
    """A TTT checkpoint stored in bf16 loads as float32 holding exactly the bf16-rounded weights."""
    import jax
    from flax import nnx

    from ponder.model.ttt import TTTConfig
    from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM

    config = TTTLMConfig(base=small_config, ttt=TTTConfig(width=small_config.n_embd, kind="mlp"), eot_id=0)
    model = TTTTransformerLM(config, rngs=nnx.Rngs(3))
    checkpoint.save(tmp_path / "small", model, code_tokenizer, storage_dtype="bfloat16")
    loaded, _ = checkpoint.load(tmp_path / "small")
    assert isinstance(loaded, TTTTransformerLM) and loaded.config == config
    for got, want in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(model)), strict=True):
        assert got.dtype == want.dtype == jnp.float32
        assert np.array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16).astype(jnp.float32)))
    full = checkpoint.save(tmp_path / "full", model, code_tokenizer)
    assert sum(f.stat().st_size for f in (tmp_path / "small").rglob("*")) < 0.6 * sum(
        f.stat().st_size for f in full.rglob("*")
    )
