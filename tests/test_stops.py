"""The streaming text rules of serving (pipelines/serve/text.py): plain, no Ray."""

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


def test_an_unfinished_utf8_character_is_held_back(tok):
    ids = tok.encode("wörld")
    raw = [i for i in ids]
    cut = StopCutter(tok, [], max_tokens=100)
    sent = "".join(cut.push([i]) for i in raw) + cut.close()
    assert sent == "wörld" and "\ufffd" not in sent
