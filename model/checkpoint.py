"""Self-contained checkpoint directories.

Layout of a checkpoint directory::

    config.json     {"format_version": 1, "model": GPTConfig fields,
                     "ttt": TTT language-model fields (TTT checkpoints only),
                     "inplace": in-place fast-weight fields (In-Place TTT checkpoints only),
                     "lora": LoRA fast-weight fields (LoRA checkpoints only)}
    tokenizer.json  the tokenizer (``tokenizers`` JSON)
    state/          model parameters, written by Orbax
    manifest.json   size and SHA-256 of every file above

Loading checks, before Orbax reads a byte: the manifest (a missing,
truncated or altered file is named), the config, the tokenizer, and that the
saved parameter tree has exactly the keys, shapes and dtypes the config
implies (the offending key is named). Parameters are then restored into an
``nnx.eval_shape`` skeleton, so no throwaway random weights are allocated.
Every failure is a ``CheckpointError`` that says which file or key is wrong.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ponder.model import quantize
from ponder.model.config import GPTConfig
from ponder.model.gpt2 import GPT
from ponder.model.gpt2 import abstract_model as abstract_gpt
from ponder.model.inplace import InPlaceLM, InPlaceLMConfig
from ponder.model.lora import LoRALM, LoRALMConfig
from ponder.model.tokenizer import Tokenizer
from ponder.model.ttt_lm import TTTLMConfig, TTTTransformerLM

FORMAT_VERSION = 1
# config.json key of each fast-weight kind: (model class, its config class).
KINDS = {"ttt": (TTTTransformerLM, TTTLMConfig), "inplace": (InPlaceLM, InPlaceLMConfig), "lora": (LoRALM, LoRALMConfig)}
CONFIG_FILE, TOKENIZER_FILE, STATE_DIR, MANIFEST_FILE = "config.json", "tokenizer.json", "state", "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, damaged or does not match its config."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def save(
    directory: str | Path,
    model: GPT | TTTTransformerLM | InPlaceLM | LoRALM,
    tokenizer: Tokenizer,
    overwrite: bool = False,
    storage_dtype: str | None = None,
) -> Path:
    """Writes ``model`` and ``tokenizer`` as a checkpoint directory.

    Args:
      directory: target directory; must not exist unless ``overwrite``.
      model: the base GPT or a fast-weight language model; its config goes to ``config.json``.
      tokenizer: saved beside it; its vocabulary must fit the model.
      storage_dtype: e.g. ``"bfloat16"``: float32 parameters are stored
        rounded to it (half the bytes) and loaded back as float32.

    Returns:
      The absolute checkpoint path.
    """
    directory = Path(directory).absolute()
    kind = next((key for key, (cls, _) in KINDS.items() if isinstance(model, cls)), None)
    config: GPTConfig = model.config if kind is None else model.config.base
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    if directory.exists():
        if not overwrite:
            raise CheckpointError(f"{directory} already exists (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    record = {"format_version": FORMAT_VERSION, "model": config.to_dict()}
    if kind is not None:
        record[kind] = model.config.to_dict()
    state = nnx.to_pure_dict(nnx.state(model))
    if storage_dtype is not None:
        record["storage_dtype"] = storage_dtype
        state = jax.tree.map(lambda a: _stored(a, storage_dtype), state)
    (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    tokenizer.save(directory / TOKENIZER_FILE)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / STATE_DIR, state)
    checkpointer.wait_until_finished()
    (directory / MANIFEST_FILE).write_text(json.dumps(_manifest(directory), indent=1) + "\n")
    return directory


def _stored(leaf, storage_dtype: str | None):
    """The dtype a float32 parameter is stored in (arrays or shape structs)."""
    if storage_dtype is None or np.dtype(leaf.dtype) != np.float32:
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(storage_dtype))
    return leaf.astype(storage_dtype)


def _verify_files(directory: Path) -> None:
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is not a ponder checkpoint: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({err})") from None
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if name not in manifest or not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}")
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or altered: {size} bytes, expected {expected['bytes']}"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt: its SHA-256 does not match {MANIFEST_FILE}")


def load_config(directory: str | Path) -> GPTConfig | TTTLMConfig | InPlaceLMConfig | LoRALMConfig:
    """The model config of a checkpoint: a ``GPTConfig``, or a ``TTTLMConfig`` / ``InPlaceLMConfig`` / ``LoRALMConfig``."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    try:
        base = GPTConfig.from_dict(data.get("model"))
        for key, (_, config_class) in KINDS.items():
            if data.get(key) is not None:
                return config_class.from_dict(base, data[key])
        return base
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _key_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_tree(saved: Any, expected: Any, where: Path) -> None:
    """Compares saved array metadata with the skeleton's shapes and dtypes, naming the first mismatch."""
    saved_leaves = {_key_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    expected_leaves = {_key_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    missing = sorted(set(expected_leaves) - set(saved_leaves))
    if missing:
        raise CheckpointError(f"{where}: parameter {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = sorted(set(saved_leaves) - set(expected_leaves))
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected parameter {unexpected[0]} ({len(unexpected)} the config does not define)"
        )
    for name, want in expected_leaves.items():
        got = saved_leaves[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{where}: parameter {name} has shape {tuple(got.shape)}, the config implies {tuple(want.shape)}"
            )
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{where}: parameter {name} has dtype {got.dtype}, the config implies {want.dtype}")


def abstract_model(config):
    """A parameter-free skeleton (shapes and dtypes only) to restore into."""
    for cls, config_class in KINDS.values():
        if isinstance(config, config_class):
            return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    return abstract_gpt(config)


def load(directory: str | Path, weights: str = "float32") -> tuple[GPT | TTTTransformerLM | InPlaceLM | LoRALM, Tokenizer]:
    """Validates and loads a checkpoint directory.

    ``weights``: how the base's weights are held once loaded (``model.quantize.WEIGHTS``).

    Returns:
      ``(model, tokenizer)``: a ``GPT``, or a ``TTTTransformerLM`` (TTT), ``InPlaceLM`` (In-Place TTT) or ``LoRALM``.

    Raises:
      CheckpointError: naming the missing, damaged or mismatched file or key.
    """
    quantize.check_weights(weights)
    directory = Path(directory).absolute()
    _verify_files(directory)
    config = load_config(directory)
    try:
        tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    except (OSError, ValueError) as err:
        raise CheckpointError(str(err)) from None
    vocab_size = (config if isinstance(config, GPTConfig) else config.base).vocab_size
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{directory / TOKENIZER_FILE} has {len(tokenizer)} tokens but {CONFIG_FILE} sets vocab_size {vocab_size}"
        )
    graphdef, abstract_state = nnx.split(abstract_model(config))
    storage_dtype = json.loads((directory / CONFIG_FILE).read_text()).get("storage_dtype")
    if storage_dtype not in (None, "bfloat16", "float16"):
        raise CheckpointError(f"{directory / CONFIG_FILE}: storage_dtype {storage_dtype!r} is not supported")
    wanted = nnx.to_pure_dict(abstract_state)
    target = jax.tree.map(lambda leaf: _stored(leaf, storage_dtype), wanted)
    checkpointer = ocp.StandardCheckpointer()
    state_dir = directory / STATE_DIR
    try:
        saved = checkpointer.metadata(state_dir).item_metadata.tree
    except Exception as err:  # Orbax raises many types for unreadable metadata
        raise CheckpointError(f"cannot read parameter metadata in {state_dir}: {err}") from None
    _check_tree(saved, target, state_dir)
    try:
        restored = checkpointer.restore(state_dir, target)
    except Exception as err:  # damaged files surface as TensorStore/Orbax errors of many types
        raise CheckpointError(f"cannot restore parameters from {state_dir}: {err}") from None
    restored = jax.tree.map(lambda value, want: value.astype(want.dtype), restored, wanted)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return quantize.quantize_lm(nnx.merge(graphdef, abstract_state), weights), tokenizer
