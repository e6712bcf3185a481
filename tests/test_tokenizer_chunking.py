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


def official_group_texts(texts: list[str], tok, block_size: int) -> list[list[int]]:
    """The official layout, written out as train/train_calm.py does it: ``tokenize_function`` (the
    Llama-3 tokenizer's post-processor puts BOS before each text, nothing after) then ``group_texts``
    (concatenate every text of the group, cut blocks of block_size, drop the remainder)."""
    from itertools import chain

    examples = {"input_ids": [[tok.bos_id] + tok.encode(t) for t in texts]}
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated["input_ids"])
    total_length = (total_length // block_size) * block_size
    return [concatenated["input_ids"][i: i + block_size] for i in range(0, total_length, block_size)]


def test_packed_chunks_are_the_official_group_texts_id_for_id(tok):
    """Three documents packed (BOS per document, no EOT, no padding, the grid across documents, the
    tail dropped) give exactly the official code's K-token blocks, and each chunk names the document
    of its first token."""
    from calm_core.chunking import pack_documents

    docs = ["Über naïve café and the cat", "the dog ran", "東京 🙂 a big red ball " * 3]
    ids = [tok.encode(d) for d in docs]
    assert tok.bos_id is not None and tok.bos_id not in {tok.eot_id, tok.pad_id, tok.mask_id}
    chunks, doc_index, position = pack_documents(ids, K, tok.bos_id)
    want = official_group_texts(docs, tok, K)
    assert chunks.tolist() == want and chunks.dtype == np.int32
    flat = chunks.reshape(-1).tolist()
    assert tok.eot_id not in flat and tok.pad_id not in flat and flat.count(tok.bos_id) == 3
    total = sum(len(i) + 1 for i in ids)
    assert len(flat) == total - total % K  # only the tail (< K tokens) is dropped
    assert position.tolist() == list(range(len(chunks)))
    starts = np.cumsum([0] + [len(i) + 1 for i in ids])  # each document's BOS in the stream
    assert doc_index.tolist() == [int(np.searchsorted(starts, c * K, side="right") - 1) for c in range(len(chunks))]
    assert len(set(doc_index.tolist())) == 3  # a chunk crosses each boundary: the grid runs across documents
    # a group shorter than one chunk gives none; blocks of 4 chunks are the official 16-token blocks
    assert pack_documents([[5]], K, tok.bos_id)[0].shape == (0, K)
    assert chunks[: len(chunks) // 4 * 4].reshape(-1, 16).tolist() == official_group_texts(docs, tok, 16)


def test_trained_tokenizers_have_a_bos_and_loaded_ones_keep_their_size(tok, tmp_path):
    """New tokenizers get BOS; a tokenizer without one (made before it existed) loads unchanged (its
    models fix its size) and the packed layout refuses it by name; a new run adopting an existing
    tokenizer.json gains one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from calm_core.config import ConfigError
    from pipelines.data.chunks import check_layout

    assert tok.bos_id == tok.tok.token_to_id("<|begin_of_text|>")
    old = Tokenizer(models.BPE())  # trained as before BOS existed: the three older special tokens only
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    old.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT, PAD, MASK],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    before = CalmTokenizer.from_str(old.to_str())
    size = before.vocab_size
    assert before.bos_id is None and CalmTokenizer.from_str(before.to_str()).vocab_size == size
    check_layout(before, "document")
    with pytest.raises(ConfigError, match="data.layout=packed .* has none"):
        check_layout(before, "packed")
    assert before.with_bos().bos_id == size and before.vocab_size == size + 1
