"""``ponder convert`` against transformers: exports of base and TTT checkpoints, imports of GPT-2 variants.

Every import that succeeds gives transformers' logits (within the parity
tolerance); every setting ponder does not implement is refused by name.
"""

import json

import pytest
import torch
from test_gpt2_parity import TOLERANCE, _tokens, logits_gap
from transformers import GPT2Config, GPT2LMHeadModel

from ponder import cli as ponder_cli
from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.model import checkpoint
from ponder.model.gpt2 import init_model
from ponder.model.hf import ConversionError, export_hf, import_hf


def _transformers(directory):
    return GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()


def _convert(capsys, *args: str) -> tuple[int, str]:
    """Runs ``ponder convert ARGS``: its exit status and what it wrote to stderr."""
    status = ponder_cli.main(["convert", *map(str, args)])
    return status, capsys.readouterr().err


def test_export_of_the_bundled_ttt_checkpoint_is_its_base(tmp_path, capsys):
    status, err = _convert(capsys, "--to-hf", DEFAULT_CHECKPOINT, "--out", tmp_path / "hf")
    assert status == 0, err
    assert "is a TTT checkpoint; exporting its frozen base GPT-2" in err and "Traceback" not in err
    model, tokenizer = checkpoint.load(DEFAULT_CHECKPOINT)
    assert logits_gap(model.base, _transformers(tmp_path / "hf"), _tokens(model.base.config)) <= TOLERANCE
    with pytest.raises(ConversionError, match=r"export its base GPT-2 \(model\.base\)"):
        export_hf(model, tokenizer, tmp_path / "again")


def test_export_of_a_base_checkpoint(code_tokenizer, small_config, tmp_path, capsys):
    model = init_model(small_config, seed=4)
    checkpoint.save(tmp_path / "ckpt", model, code_tokenizer)
    status, err = _convert(capsys, "--to-hf", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert status == 0 and "TTT" not in err, err
    assert logits_gap(model, _transformers(tmp_path / "hf"), _tokens(small_config)) <= TOLERANCE


def _save_transformers(directory, vocab_size, tokenizer=None, **settings):
    """A random transformers GPT-2 (3 blocks, weights large enough that attention's scale matters) saved to
    ``directory``, with ``tokenizer``'s tokenizer.json when given; returns it as transformers reloads it."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=3, n_head=4, initializer_range=0.1,
                        **settings)
    GPT2LMHeadModel(config).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")
    return _transformers(directory)


SETTINGS = {
    "untied-head": {"tie_word_embeddings": False},
    "inverse-layer-scale": {"scale_attn_by_inverse_layer_idx": True},
    "unscaled-attention": {"scale_attn_weights": False},
    "reorder-and-upcast": {"reorder_and_upcast_attn": True},
    "all": {"tie_word_embeddings": False, "scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False,
            "reorder_and_upcast_attn": True},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_import_and_export_of_a_gpt2_variant_give_transformers_logits(settings, code_tokenizer, tmp_path, capsys):
    hf = _save_transformers(tmp_path / "hf", len(code_tokenizer), code_tokenizer, **settings)
    status, err = _convert(capsys, "--from-hf", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert status == 0, err
    model, tokenizer = checkpoint.load(tmp_path / "ckpt")
    tokens = _tokens(model.config)
    assert logits_gap(model, hf, tokens) <= TOLERANCE
    # Exported again, transformers reads the same settings back.
    export_hf(model, tokenizer, tmp_path / "back")
    assert logits_gap(model, _transformers(tmp_path / "back"), tokens) <= TOLERANCE


def _config_only(directory, **settings):
    """A directory with only config.json: refusals come before any tensor is read."""
    directory.mkdir()
    config = GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4).to_dict()
    (directory / "config.json").write_text(json.dumps({**config, **settings}))
    return directory


@pytest.mark.parametrize("settings, message", [
    ({"add_cross_attention": True}, "config.json: add_cross_attention is true"),
    ({"scale_attn_weights": "yes"}, "config.json: scale_attn_weights is 'yes', expected true or false"),
    ({"activation_function": "relu"}, "config.json: activation_function 'relu' is not tanh-GELU"),
    ({"n_inner": 100}, "config.json: n_inner 100 is not 4 * n_embd"),
])
def test_settings_ponder_does_not_implement_are_refused_by_name(settings, message, tmp_path, capsys):
    status, err = _convert(capsys, "--from-hf", _config_only(tmp_path / "hf", **settings), "--out", tmp_path / "o")
    assert status == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_directory_without_tokenizer_json_needs_a_named_tokenizer(code_tokenizer, tmp_path, capsys):
    vocab_size = len(code_tokenizer) + 8  # a vocabulary padded past its tokenizer's, as GPT-2's 50304 can be
    hf = _save_transformers(tmp_path / "hf", vocab_size)  # no tokenizer.json
    status, err = _convert(capsys, "--from-hf", tmp_path / "hf", "--out", tmp_path / "o")
    assert status == 2 and "has no tokenizer.json" in err and "--tokenizer gpt2" in err
    # GPT-2's BPE has 50,260 ids: most of them are not this model's.
    status, err = _convert(capsys, "--from-hf", tmp_path / "hf", "--tokenizer", "gpt2", "--out", tmp_path / "o")
    assert status == 2 and f"vocab_size {vocab_size}" in err and "does not belong to this model" in err
    assert not (tmp_path / "o").exists()
    # A tokenizer that fits is taken, and nothing is padded.
    fitting = tmp_path / "fitting.json"
    code_tokenizer.save(fitting)
    status, err = _convert(capsys, "--from-hf", tmp_path / "hf", "--tokenizer", fitting, "--out", tmp_path / "o")
    assert status == 0, err
    model, tokenizer = checkpoint.load(tmp_path / "o")
    assert model.config.vocab_size == vocab_size and len(tokenizer) == len(code_tokenizer)
    assert logits_gap(model, hf, _tokens(model.config)) <= TOLERANCE
    status, err = _convert(capsys, "--to-hf", tmp_path / "o", "--tokenizer", "gpt2", "--out", tmp_path / "x")
    assert status == 2 and "--tokenizer names the tokenizer of a --from-hf directory" in err

