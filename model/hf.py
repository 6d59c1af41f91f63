"""Import and export Hugging Face ``transformers`` GPT-2 checkpoints.

Our parameter names are GPT-2's, so the mapping is a rename:
``[transformer.]h.N.attn.c_attn.weight`` <-> ``h.N.attn.c_attn.kernel`` and
LayerNorm ``weight`` <-> ``scale``. HF's Conv1D stores weights ``[in, out]``
like ``nnx.Linear``, so no tensor is transposed. The LM head is tied to
``wte`` on both sides.

When the tokenizer has more ids than the HF vocabulary (GPT-2's BPE plus our
three fill-in-the-middle tokens), the new embedding rows are set to the mean
of the existing rows, so the new tokens start as an "average" token. Export
writes every row, so export -> import is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from ponder.model.config import GPTConfig
from ponder.model.gpt2 import GPT, abstract_model
from ponder.model.tokenizer import Tokenizer

_SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


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
    return GPTConfig(
        vocab_size=vocab_size,
        n_positions=hf["n_positions"],
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
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
    if parents in (["wte"], ["wpe"]):
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


def import_hf(directory: str | Path, tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer]:
    """Builds our model from a ``transformers`` GPT-2 directory.

    Args:
      directory: holds ``config.json`` and the weights (safetensors or PyTorch bin).
      tokenizer: defaults to ``tokenizer.json`` in the directory if present,
        otherwise GPT-2's BPE.

    Returns:
      ``(model, tokenizer)`` with ``vocab_size`` covering every tokenizer id.
    """
    directory = Path(directory)
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{directory} has no config.json") from None
    if tokenizer is None:
        has_own = (directory / "tokenizer.json").is_file()
        tokenizer = Tokenizer.load(directory / "tokenizer.json") if has_own else Tokenizer.gpt2()
    tensors = {k.removeprefix("transformer."): v for k, v in _read_tensors(directory).items()}
    hf_vocab = hf_config["vocab_size"]
    config = _config_from_hf(hf_config, max(hf_vocab, len(tokenizer)))
    flat = {}
    for path in _our_paths(config):
        name = _hf_name(path)
        if name not in tensors:
            raise ConversionError(f"{directory}: tensor {name} is missing")
        flat[path] = np.asarray(tensors[name], np.float32)
    wte = flat[("wte", "embedding")]
    if wte.shape[0] < config.vocab_size:
        extra = np.repeat(wte.mean(axis=0, keepdims=True), config.vocab_size - wte.shape[0], axis=0)
        flat[("wte", "embedding")] = np.concatenate([wte, extra])
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
    """Writes ``model`` as a ``transformers`` GPT-2 directory (config.json, model.safetensors, tokenizer.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: GPTConfig = model.config
    flat = dict(_flatten(nnx.to_pure_dict(nnx.state(model))))
    tensors = {
        "transformer." + _hf_name(tuple(str(k) for k in path)): np.ascontiguousarray(np.asarray(v, np.float32))
        for path, v in flat.items()
    }
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
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tokenizer.save(directory / "tokenizer.json")
    return directory
