"""Tokenizer train/save/load/hash and the K-token chunk rule."""

import numpy as np
import pytest

from calm_core.chunking import chunk_documents, chunk_ids
from calm_core.errors import ArtifactError
from calm_core.tokenizer import EOT, MASK, PAD, CalmTokenizer

TEXTS = [
    "The cat sat on the mat.",
    "Über naïve café — 東京 and émojis 🙂 stay intact.",
    "A dog ran after the red ball and the cat watched.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return CalmTokenizer.train(TEXTS, vocab_size=320, min_frequency=1)


def test_special_tokens_and_round_trip(tok):
    assert {tok.eot_id, tok.pad_id, tok.mask_id} == {tok.tok.token_to_id(t) for t in (EOT, PAD, MASK)}
    assert len({tok.eot_id, tok.pad_id, tok.mask_id}) == 3
    for text in TEXTS[:3]:
        assert tok.decode(tok.encode(text)) == text  # byte-level: lossless, non-ASCII included


def test_save_load_hash(tok, tmp_path):
    tok.save(tmp_path)
    again = CalmTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.sha256 == tok.sha256
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    # training is deterministic: the same corpus gives the same tokenizer
    assert CalmTokenizer.train(TEXTS, vocab_size=320, min_frequency=1).sha256 == tok.sha256
    # another vocabulary size is another tokenizer
    assert CalmTokenizer.train(TEXTS, vocab_size=300, min_frequency=1).sha256 != tok.sha256


def test_bad_tokenizer_file(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid tokenizers JSON"):
        CalmTokenizer.from_file(p)
    with pytest.raises(ArtifactError, match="does not exist"):
        CalmTokenizer.from_file(tmp_path / "missing.json")


def test_existing_tokenizer_gains_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = CalmTokenizer.from_str(raw.to_str())
    assert None not in (tok.eot_id, tok.pad_id, tok.mask_id)


K, EOT_ID, PAD_ID = 4, 1, 0


def test_chunk_empty_document():
    assert chunk_ids([], K, EOT_ID, PAD_ID).shape == (0, K)


def test_chunk_shorter_than_K():
    c = chunk_ids([7, 8], K, EOT_ID, PAD_ID)
    assert c.tolist() == [[7, 8, EOT_ID, PAD_ID]]


def test_chunk_exact_multiple_of_K_gets_an_eot_chunk():
    c = chunk_ids([5, 6, 7, 8], K, EOT_ID, PAD_ID)
    assert c.tolist() == [[5, 6, 7, 8], [EOT_ID, PAD_ID, PAD_ID, PAD_ID]]


def test_chunk_one_short_of_multiple():
    c = chunk_ids([5, 6, 7], K, EOT_ID, PAD_ID)
    assert c.tolist() == [[5, 6, 7, EOT_ID]]


def test_no_chunk_spans_two_documents(tok):
    docs = ["Über naïve café", "", "the cat", "東京 🙂 " * 7]
    ids = [tok.encode(d) for d in docs]
    chunks, doc_index, pos = chunk_documents(ids, K, tok.eot_id, tok.pad_id)
    assert chunks.dtype == np.int32 and chunks.shape[1] == K
    assert 1 not in doc_index.tolist()  # the empty document gave nothing
    for d, text in enumerate(docs):
        rows = chunks[doc_index == d]
        if not text:
            continue
        flat = rows.reshape(-1).tolist()
        assert flat.count(tok.eot_id) == 1  # exactly one end-of-text, in this document's last chunk
        assert tok.eot_id in rows[-1].tolist()
        assert pos[doc_index == d].tolist() == list(range(len(rows)))
        body = flat[: flat.index(tok.eot_id)]
        assert tok.decode(body) == text  # non-ASCII survives chunking
        assert all(t == tok.pad_id for t in flat[flat.index(tok.eot_id) + 1:])


def test_grouped_encoding_gives_the_ids_of_one_call(tok):
    """pipelines.data.chunks.encode_grouped (a bounded number of characters per tokenizer call, for
    memory) returns exactly what one encode_batch call over every document returns, in order:
    documents shorter than a group, longer than one (each alone), and empty ones."""
    from pipelines.data.chunks import encode_grouped

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "ran", "dog", "\n", "big", "red"]
    docs = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(0, 60, size=40)] + [""]
    want = tok.encode_batch(docs)
    for max_chars in (1, 50, 200, 10**9):
        assert encode_grouped(tok, docs, max_chars) == want
