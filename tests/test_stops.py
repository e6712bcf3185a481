"""The streaming text rules of serving (calm_core/stops.py): plain, no Ray."""

import codecs

import pytest

from calm_core.tokenizer import CalmTokenizer
from calm_core.stops import StopCutter


@pytest.fixture(scope="module")
def tok():
    docs = ["the cat sat on the mat. the dog ran. a big red ball, a small blue cup."] * 20 + ["héllo wörld ünïcode"] * 5
    return CalmTokenizer.train(docs, vocab_size=300, min_frequency=1)


def feed(cut: StopCutter, ids: list[int], step: int) -> list[str]:
    deltas = [cut.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return deltas + [cut.close()]


@pytest.mark.parametrize("step", [1, 3, 4])
def test_deltas_add_up_to_the_text_whatever_the_step(tok, step):
    ids = tok.encode("the dog ran. héllo wörld")
    cut = StopCutter(tok, [], max_tokens=100)
    assert "".join(feed(cut, ids, step)) == tok.decode(ids) and cut.finish == "length"


@pytest.mark.parametrize("step", [1, 2, 4])
def test_a_stop_string_across_steps_is_never_sent(tok, step):
    ids = tok.encode("the cat sat on the mat. the dog ran.")
    cut = StopCutter(tok, ["the mat"], max_tokens=100)
    deltas = feed(cut, ids, step)
    assert "".join(deltas) == "the cat sat on " and cut.finish == "stop"
    assert not any("mat" in d for d in deltas)


def test_end_of_text_and_max_tokens_end_the_completion(tok):
    ids = tok.encode("the cat sat")
    cut = StopCutter(tok, [], max_tokens=100)
    assert "".join([cut.push(ids), cut.push([tok.eot_id] + tok.encode(" more"))]) == "the cat sat"
    assert cut.finish == "stop" and cut.tokens == len(ids)
    cut = StopCutter(tok, [], max_tokens=2)
    text = cut.push(ids)
    assert cut.finish == "length" and cut.tokens == 2 and text == tok.decode(ids[:2])


def token_bytes(tok, ids: list[int]) -> bytes:
    """The raw bytes of byte-level BPE tokens, read from their vocabulary strings through GPT-2's
    byte <-> printable-character table (not through the tokenizer's decoder)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = bs + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    byte_of = {chr(c): b for b, c in zip(bs, chars)}
    return bytes(byte_of[c] for i in ids for c in tok.tok.id_to_token(i))


@pytest.mark.parametrize("step", [1, 2])
def test_a_character_split_across_steps_is_held_back_until_complete(tok, step):
    """"€" (3 bytes) and "🙂" (4 bytes) are in no document the tokenizer saw, so byte-level BPE gives
    each byte its own token and steps end inside a character. After every step the text sent so
    far is exactly what Python's incremental UTF-8 decoder gives for the bytes generated so far
    (complete characters only: no U+FFFD, nothing taken back), and the deltas add up to the text."""
    text = "a €5 🙂"
    ids = tok.encode(text)
    for char in ("€", "🙂"):
        parts = tok.encode(char)
        assert len(parts) == len(char.encode("utf-8")) and all(tok.decode([i]) == "\ufffd" for i in parts)
    assert token_bytes(tok, ids) == text.encode("utf-8")
    cut = StopCutter(tok, [], max_tokens=100)
    deltas = feed(cut, ids, step)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # a step that ended inside a character and sent nothing
    utf8 = codecs.getincrementaldecoder("utf-8")()
    for k in range(0, len(ids), step):
        assert deltas[k // step] == utf8.decode(token_bytes(tok, ids[k : k + step])), k
    if step == 1:  # the "€" bytes arrive one per step: the first two send nothing, the third the whole "€"
        start = ids.index(tok.encode("€")[0])
        assert deltas[start : start + 3] == ["", "", "€"]
