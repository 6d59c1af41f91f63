"""Model configuration: one frozen dataclass with named presets.

The config is passed in wherever it is needed and saved as ``config.json``
inside every checkpoint directory, so a checkpoint fully describes the model
it holds. Field names follow Hugging Face's ``GPT2Config`` where one exists,
which keeps the import/export mapping in ``model.hf`` a plain rename.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of a GPT-2 style decoder.

    Attributes:
      vocab_size: rows of the token embedding (and of the LM head).
      n_positions: context window; also the length of the KV cache.
      n_embd: model width D.
      n_layer: number of transformer blocks.
      n_head: attention heads; ``n_embd`` must be divisible by it.
      layer_norm_epsilon: epsilon of every LayerNorm (GPT-2 uses 1e-5).
      tie_word_embeddings: the LM head is ``wte`` (GPT-2); False gives the
        model its own head ``lm_head`` (Hugging Face's setting of that name).
      scale_attn_weights: attention scores are divided by sqrt(head_dim)
        (GPT-2); False leaves them unscaled.
      scale_attn_by_inverse_layer_idx: block i's scores are further divided
        by i + 1 (as Hugging Face's setting of that name does).
      dtype: dtype that activations are computed in.
      param_dtype: dtype that parameters are stored in.
    """

    vocab_size: int = 8192
    n_positions: int = 1024
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"GPTConfig.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}"
                )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    # Presets -----------------------------------------------------------------

    @classmethod
    def tiny(cls, vocab_size: int = 8192) -> "GPTConfig":
        """~5M parameters: trains on a 2-core CPU in about an hour."""
        return cls(vocab_size=vocab_size, n_positions=1024, n_embd=256, n_layer=4, n_head=4)

    @classmethod
    def gpt2(cls, vocab_size: int = 50257) -> "GPTConfig":
        """GPT-2 small, 124M parameters."""
        return cls(vocab_size=vocab_size, n_positions=1024, n_embd=768, n_layer=12, n_head=12)

    @classmethod
    def gpt2_medium(cls, vocab_size: int = 50257) -> "GPTConfig":
        """GPT-2 medium, 355M parameters."""
        return cls(vocab_size=vocab_size, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """Looks up a preset by its CLI name (``tiny``, ``gpt2``, ``gpt2-medium``)."""
        presets = {"tiny": cls.tiny, "gpt2": cls.gpt2, "gpt2-medium": cls.gpt2_medium}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return dataclasses.replace(presets[name](), **overrides)

    # Serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """Builds a config from ``to_dict`` output, naming any unknown field."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


class FastBlocksConfig:
    """What the configs of fast weights inside the base's top blocks share (``model.inplace``, ``model.lora``).

    A subclass is a frozen dataclass with fields ``base`` (the ``GPTConfig``),
    one named ``KIND`` holding the kind's settings (a ``SETTINGS`` dataclass
    with a ``layers`` count) and ``eot_id``; ``config.json`` keeps the
    settings under the key ``KIND``.
    """

    KIND: ClassVar[str]
    SETTINGS: ClassVar[type]

    @property
    def settings(self):
        return getattr(self, self.KIND)

    def __post_init__(self):
        layers, n_layer = self.settings.layers, self.base.n_layer
        if not 1 <= layers <= n_layer:
            raise ValueError(f"{self.SETTINGS.__name__}.layers must be in [1, {n_layer}], got {layers}")

    def to_dict(self) -> dict:
        return {self.KIND: dataclasses.asdict(self.settings), "eot_id": self.eot_id}

    @classmethod
    def from_dict(cls, base: GPTConfig, data: dict):
        return cls(base, cls.SETTINGS(**data.get(cls.KIND, {})), data.get("eot_id"))
