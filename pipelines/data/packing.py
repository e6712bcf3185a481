"""The packed layout in the latent precompute: which documents are packed together, and the chunks
they make (``calm_core.chunking.pack_documents``).

A read task holds one whole file, so a group never spans two files: the documents of one file,
split and shard are cut into groups of ``data.pack_documents`` (the official code's 1,000), from
the file's first document of the shard. A group is named by its first document's index in its
split; its chunks are numbered from 0 (``position``). The official code packs each group of 1,000
documents of its dataset the same way and drops each group's tail; on a corpus of one file whose
documents fill one group (the WikiText-103 test set: 62 articles) the chunks are the official ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class Packing:
    """What the read tasks need to pack documents (the ``packed`` layout)."""

    tokenizer_json: str
    K: int
    group: int  # data.pack_documents


def group_starts(index: np.ndarray, first: int, S: int, G: int) -> np.ndarray:
    """Each document's packed group, named by the index of the group's first document: documents
    ``index`` [n] of one file and split, the file's first at ``first``; groups start at ``first``,
    at every shard start (multiples of S) and every G documents after either."""
    start = np.maximum(first, (index // S) * S)
    return start + ((index - start) // G) * G


def pack_groups(tables: list[pa.Table], packing: Packing) -> dict[str, np.ndarray]:
    """One file's documents of the wanted splits (tables of ``ShardDocuments`` with a ``group``
    column) -> the packed chunks of every group, or one marker row (``position`` -1) for a group too
    short for a chunk, with the routing columns of ``pipelines.data.encoder.EncodeChunks``."""
    from calm_core.chunking import pack_documents
    from pipelines.data.chunks import cached_tokenizer, encode_grouped

    tok, K = cached_tokenizer(packing.tokenizer_json), packing.K
    cols: dict[str, list] = {k: [] for k in ("doc_id", "position", "tokens", "split", "shard", "doc_index", "last")}
    for t in tables:
        ids = encode_grouped(tok, t["text"].to_pylist())
        group, doc_id = t["group"].to_numpy(), t["doc_id"].to_numpy(zero_copy_only=False)
        edges = [0, *(np.flatnonzero(group[1:] != group[:-1]) + 1).tolist(), len(group)]
        for a, b in zip(edges, edges[1:]):
            chunks, doc_index, position = pack_documents(ids[a:b], K, tok.bos_id)
            n = len(chunks)
            if n == 0:  # a marker: the group is whole and has no chunk
                chunks, doc_index, position = np.full((1, K), tok.pad_id, np.int32), np.zeros(1, np.int64), \
                    np.full(1, -1, np.int32)
            cols["doc_id"].append(doc_id[a:b][doc_index])
            cols["position"].append(position)
            cols["tokens"].append(chunks)
            cols["split"].append(np.full(len(chunks), t["split"][0].as_py(), dtype=object))
            cols["shard"].append(np.full(len(chunks), t["shard"][a].as_py(), dtype=np.int32))
            cols["doc_index"].append(np.full(len(chunks), group[a], dtype=np.int64))
            cols["last"].append(np.arange(len(chunks)) == len(chunks) - 1)
    if not cols["tokens"]:
        return {"doc_id": np.zeros(0, object), "position": np.zeros(0, np.int32), "tokens": np.zeros((0, K), np.int32),
                "split": np.zeros(0, object), "shard": np.zeros(0, np.int32), "doc_index": np.zeros(0, np.int64),
                "last": np.zeros(0, bool)}
    return {k: np.concatenate(v) for k, v in cols.items()}
