"""Ray Data: documents -> K-token chunks, with the tokenizer and chunk rules of ``calm_core``.

Stage 1 trains on these chunks and the reconstruction report scores them. In the ``packed`` layout
each batch of documents is one group packed together (the grid restarts per batch of
``batch_size`` documents: stage 1 draws single chunks, so only their distribution matters, and the
chunks are the packed stream's: BOS inside, across documents). The latent precompute cuts the
packed grid itself, per group of ``data.pack_documents`` documents as the official code does
(``pipelines.data.shards.ShardDocuments``); in the ``document`` layout it uses ``TokenizeChunk``.
"""

from __future__ import annotations

import functools

import numpy as np

from calm_core.chunking import chunk_documents, pack_documents
from calm_core.errors import ConfigError
from calm_core.tokenizer import CalmTokenizer


MAX_GROUP_CHARS = 1 << 18  # characters encoded in one tokenizer call


@functools.lru_cache(maxsize=4)
def cached_tokenizer(tokenizer_json: str) -> CalmTokenizer:
    return CalmTokenizer.from_str(tokenizer_json)


def encode_grouped(tok: CalmTokenizer, texts: list[str], max_chars: int = MAX_GROUP_CHARS) -> list[list[int]]:
    """``tok.encode_batch(texts)`` a group of at most ``max_chars`` characters at a time (a longer
    document alone): the tokenizer's Encoding objects cost ~520 bytes per token while they live
    (measured: 575 MB for one 3.5 MB book), and a batch of whole books held them all at once
    (1.9 GiB per Ray Data task on the Gutenberg shards)."""
    ids: list[list[int]] = []
    group: list[str] = []
    size = 0
    for t in texts:
        if group and size + len(t) > max_chars:
            ids += tok.encode_batch(group)
            group, size = [], 0
        group.append(t)
        size += len(t)
    if group:
        ids += tok.encode_batch(group)
    return ids


def check_layout(tok: CalmTokenizer, layout: str) -> None:
    """The packed layout needs a begin-of-text token; a tokenizer without one is refused by name."""
    if layout == "packed" and tok.bos_id is None:
        raise ConfigError("data.layout=packed puts a begin-of-text token before every document, and this run's "
                          "tokenizer has none (tokenizers trained before 2026-12-07 lack it): use "
                          "data.layout=document, or a new --run whose tokenizer is trained with one")


def tokenize_chunk(tok: CalmTokenizer, texts: list[str], K: int, layout: str):
    """Documents -> (chunks [N, K], doc_index [N], position [N]) in ``layout`` (packed: one group)."""
    ids = encode_grouped(tok, texts)
    if layout == "packed":
        return pack_documents(ids, K, tok.bos_id)
    return chunk_documents(ids, K, tok.eot_id, tok.pad_id)


class TokenizeChunk:
    """map_batches UDF: {"doc_id", "text", *carry} -> {"doc_id", "position", "tokens"[K], *carry}, one row
    per chunk (``doc_id``: the document of the chunk's first token). ``carry``: columns of the document
    copied to each of its chunks (the latent precompute's split, shard and document index); with
    ``last`` a bool column marks each document's last chunk (a consumer that sees chunks in any
    order knows when a document is whole). ``layout`` packed: each batch is one packed group
    (``carry`` and ``last`` are per-document ideas: document layout only)."""

    def __init__(self, tokenizer_json: str, K: int, carry: tuple[str, ...] = (), last: bool = False,
                 layout: str = "document"):
        if layout == "packed" and (carry or last):
            raise ValueError("TokenizeChunk: carry / last need the document layout")
        self.tokenizer_json = tokenizer_json
        self.K, self.layout = K, layout
        self.carry, self.last = tuple(carry), last

    def __call__(self, batch: dict) -> dict:
        tok = cached_tokenizer(self.tokenizer_json)
        texts = [str(t) for t in batch["text"]]
        chunks, doc_index, position = tokenize_chunk(tok, texts, self.K, self.layout)
        doc_ids = np.asarray(batch["doc_id"], dtype=object)[doc_index] if len(doc_index) else np.zeros(0, object)
        out = {"doc_id": doc_ids, "position": position, "tokens": chunks}
        for c in self.carry:
            out[c] = np.asarray(batch[c])[doc_index]
        if self.last:
            out["last"] = np.append(doc_index[1:] != doc_index[:-1], True) if len(doc_index) else np.zeros(0, bool)
        return out


def chunk_dataset(docs, tokenizer: CalmTokenizer, K: int, num_cpus: float, batch_size: int = 256,
                  carry: tuple[str, ...] = (), last: bool = False, layout: str = "document"):
    """A Ray Dataset of documents -> a Ray Dataset of chunks (plain tasks, fractional CPUs)."""
    check_layout(tokenizer, layout)
    return docs.map_batches(
        TokenizeChunk(tokenizer.to_str(), K, carry, last, layout),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
