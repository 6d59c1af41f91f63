"""``ponder.model.detokenize``: the one streaming detokenizer of offline generation and the server."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ponder.model.detokenize import TextStream, stop_cut


def test_stop_cut_finds_the_first_stop_and_holds_back_a_possible_start():
    assert stop_cut("abc\ndef", ["\nd"]) == (3, 3)
    assert stop_cut("x = 1\n\n", ["\n\n\n", "1\n"]) == (4, 4)  # the earliest stop wins
    assert stop_cut("x = 1\n\n", ["\n\n\n"]) == (None, 5)  # "\n\n" may become the stop
    assert stop_cut("hello", ["lo!", "xyz"]) == (None, 3)
    assert stop_cut("hello", []) == (None, 5)


def test_an_incomplete_utf8_sequence_waits_for_its_last_byte(gpt2_tokenizer):
    ids = gpt2_tokenizer.encode("é😀")
    stream = TextStream(gpt2_tokenizer)
    shown = []
    for i in ids:
        stream.add([i])
        shown.append(stream.text)
    assert all("\ufffd" not in text for text in shown) and shown[-1] == "é😀"
    emoji = gpt2_tokenizer.encode("😀")
    assert len(emoji) > 1  # GPT-2's byte-level BPE splits the emoji's 4 bytes
    partial = TextStream(gpt2_tokenizer)
    partial.add(emoji[:1])
    assert partial.text == ""
    partial.close()  # nothing will complete it
    assert partial.text == "\ufffd"


@settings(max_examples=50, deadline=None)
@given(text=st.text(st.sampled_from("ab\n é😀"), max_size=24), cuts=st.lists(st.integers(0, 40), max_size=6),
       stop=st.text(st.sampled_from("ab\n"), min_size=1, max_size=3))
def test_what_is_safe_to_emit_never_changes_however_tokens_arrive(gpt2_tokenizer, text, cuts, stop):
    """Text emitted up to ``safe`` is final: later tokens never change it, and the stop is found
    at the same place whether the tokens come one by one or all at once."""
    ids = gpt2_tokenizer.encode(text)
    whole = TextStream(gpt2_tokenizer, [stop])
    whole.add(ids)
    whole.close()
    expected_stop, _ = whole.stop_cut()
    stream, emitted, bounds = TextStream(gpt2_tokenizer, [stop]), "", sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    found = None
    for a, b in zip(bounds, bounds[1:]):
        stream.add(ids[a:b])
        found, safe = stream.stop_cut()
        if found is not None:
            break
        assert stream.text[:safe].startswith(emitted)
        emitted = stream.text[:safe]
    if found is None:
        stream.close()
        found, _ = stream.stop_cut()
    assert found == expected_stop
    final = whole.text if expected_stop is None else whole.text[:expected_stop]
    assert final.startswith(emitted)
