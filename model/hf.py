"""Import and export Hugging Face ``transformers`` GPT-2 checkpoints.

Our parameter names are GPT-2's, so the mapping is a rename:
``[transformer.]h.N.attn.c_attn.weight`` <-> ``h.N.attn.c_attn.kernel`` and
LayerNorm ``weight`` <-> ``scale``. HF's Conv1D stores weights ``[in, out]``
like ``nnx.Linear``, so no tensor is transposed. An untied ``lm_head.weight``
is ``lm_head.embedding`` ([V, D] both).

Every ``GPT2Config`` setting that changes what a causal LM computes is either
carried over (``tie_word_embeddings``, ``scale_attn_weights``,
``scale_attn_by_inverse_layer_idx``, ``layer_norm_epsilon``; ``GPTConfig``
has the same fields) or refused by name (``_config_from_hf``).
``reorder_and_upcast_attn`` only computes the scores in float32 and scales
before the product, which a float32 ponder model does already, so it is
accepted. Dropout and the sequence-summary head do not act on a causal LM at
inference.

The token ids mean nothing without their tokenizer: a directory without
``tokenizer.json`` is refused unless the caller names one. Ids past the HF
vocabulary are allowed only for the special tokens ponder adds (end of
document, fill-in-the-middle); their rows of the embedding (and of an untied
head) are the mean of the existing rows, so each starts as an "average"
token. Export writes every row, so export -> import is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from ponder.model.config import GPTConfig
from ponder.model.gpt2 import GPT, abstract_model
from ponder.model.tokenizer import Tokenizer

_SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_VOCAB_TABLES = (("wte", "embedding"), ("lm_head", "embedding"))  # [V, D]: padded for ponder's special tokens


class ConversionError(ValueError):
    """A Hugging Face checkpoint that ponder cannot convert, with the reason."""


def _config_from_hf(hf: dict, vocab_size: int) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConversionError(f"config.json: model_type is {hf.get('model_type')!r}, only 'gpt2' is supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in _SUPPORTED_ACTIVATIONS:
        raise ConversionError(f"config.json: activation_function {act!r} is not tanh-GELU {_SUPPORTED_ACTIVATIONS}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ConversionError(f"config.json: n_inner {hf['n_inner']} is not 4 * n_embd")
    if hf.get("add_cross_attention", False):
        raise ConversionError(
            "config.json: add_cross_attention is true: the model is the decoder of an encoder-decoder pair, "
            "and ponder has no encoder to feed its cross-attention"
        )
    switches = {"tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}
    for name in (*switches, "reorder_and_upcast_attn"):
        if not isinstance(hf.get(name, False), bool):
            raise ConversionError(f"config.json: {name} is {hf[name]!r}, expected true or false")
    return GPTConfig(
        vocab_size=vocab_size,
        n_positions=hf["n_positions"],
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        **{name: hf.get(name, default) for name, default in switches.items()},
    )


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(directory / shard))
        return tensors
    if (directory / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise ConversionError("reading pytorch_model.bin needs torch; install ponder[test] or use safetensors") from None
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    raise ConversionError(f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _hf_name(our_path: tuple[str, ...]) -> str:
    *parents, leaf = our_path
    if parents in (["wte"], ["wpe"], ["lm_head"]):
        return f"{parents[0]}.weight"
    return ".".join(parents) + "." + {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


def _our_paths(config: GPTConfig) -> list[tuple[str, ...]]:
    state = nnx.to_pure_dict(nnx.state(abstract_model(config)))
    return [tuple(str(k) for k in path) for path, _ in _flatten(state)]


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(int(key) if key.isdigit() else key, {})
        node[path[-1]] = value
    return tree


def _tokenizer_for(directory: Path, tokenizer: Tokenizer | None, hf_vocab: int) -> Tokenizer:
    """The tokenizer the directory's token ids belong to, checked against its vocabulary."""
    if tokenizer is None:
        if not (directory / "tokenizer.json").is_file():
            raise ConversionError(
                f"{directory} has no tokenizer.json, so nothing says what its {hf_vocab} token ids mean: name the "
                "tokenizer they belong to (`ponder convert --tokenizer gpt2` for GPT-2's BPE, or --tokenizer "
                "PATH/tokenizer.json)"
            )
        tokenizer = Tokenizer.load(directory / "tokenizer.json")
    foreign = [i for i in range(hf_vocab, len(tokenizer)) if i not in tokenizer.special_ids]
    if foreign:
        raise ConversionError(
            f"the tokenizer has {len(tokenizer)} ids but config.json has vocab_size {hf_vocab}: ids {foreign[0]}.."
            f"{foreign[-1]} are not ponder's special tokens, so the tokenizer does not belong to this model"
        )
    return tokenizer


def import_hf(directory: str | Path, tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer]:
    """Builds our model from a ``transformers`` GPT-2 directory.

    Args:
      directory: holds ``config.json`` and the weights (safetensors or PyTorch bin).
      tokenizer: the tokenizer the model's ids belong to; defaults to the
        directory's ``tokenizer.json`` (a directory without one is refused).

    Returns:
      ``(model, tokenizer)`` with ``vocab_size`` covering every tokenizer id.

    Raises:
      ConversionError: naming the missing file, the setting ponder does not
        implement, or the tensor whose shape is wrong.
    """
    directory = Path(directory)
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{directory} has no config.json") from None
    try:  # refuses what ponder does not implement before reading more
        hf_vocab = hf_config["vocab_size"]
        config = _config_from_hf(hf_config, hf_vocab)
    except KeyError as err:
        raise ConversionError(f"{directory / 'config.json'} has no {err.args[0]}") from None
    tokenizer = _tokenizer_for(directory, tokenizer, hf_vocab)
    config = dataclasses.replace(config, vocab_size=max(hf_vocab, len(tokenizer)))
    tensors = {k.removeprefix("transformer."): v for k, v in _read_tensors(directory).items()}
    flat = {}
    for path in _our_paths(config):
        name = _hf_name(path)
        if name not in tensors:
            raise ConversionError(f"{directory}: tensor {name} is missing")
        flat[path] = np.asarray(tensors[name], np.float32)
    for table in _VOCAB_TABLES:
        rows = flat.get(table)
        if rows is not None and rows.shape[0] < config.vocab_size:
            extra = np.repeat(rows.mean(axis=0, keepdims=True), config.vocab_size - rows.shape[0], axis=0)
            flat[table] = np.concatenate([rows, extra])
    graphdef, state = nnx.split(abstract_model(config))
    expected = dict(_flatten(nnx.to_pure_dict(state)))
    for path, value in flat.items():
        key = tuple(int(k) if k.isdigit() else k for k in path)
        if tuple(expected[key].shape) != value.shape:
            raise ConversionError(
                f"{directory}: tensor {_hf_name(path)} has shape {value.shape}, config.json implies "
                f"{tuple(expected[key].shape)}"
            )
    nnx.replace_by_pure_dict(state, _nest(flat))
    return nnx.merge(graphdef, state), tokenizer


def export_hf(model: GPT, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Writes ``model`` as a ``transformers`` GPT-2 directory (config.json, model.safetensors, tokenizer.json).

    Only a base GPT has a Hugging Face form: for a TTT checkpoint, pass its
    ``model.base`` (the TTT layers and the gate have no place in it).
    """
    if not isinstance(model, GPT):
        raise ConversionError(
            f"a {type(model).__name__} has no Hugging Face GPT-2 form; export its base GPT-2 (model.base)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: GPTConfig = model.config
    flat = dict(_flatten(nnx.to_pure_dict(nnx.state(model))))
    tensors = {}
    for path, value in flat.items():
        name = _hf_name(tuple(str(k) for k in path))
        prefix = "" if name.startswith("lm_head.") else "transformer."  # as GPT2LMHeadModel names them
        tensors[prefix + name] = np.ascontiguousarray(np.asarray(value, np.float32))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_attn_weights": config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tokenizer.save(directory / "tokenizer.json")
    return directory
