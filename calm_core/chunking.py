"""Cutting tokenised documents into K-token chunks: two layouts (CALM.md section 1, "Chunking").

``document`` (this project's first layout): for a document with token ids t_1..t_n (n >= 1),

    sequence = t_1 .. t_n, EOT, PAD * p      with p = (-(n + 1)) mod K
    chunks   = sequence reshaped to [ceil((n + 1) / K), K]

so every document ends with an end-of-text token, no chunk spans two documents, and a document
of exactly m*K tokens gets one more chunk holding EOT and K-1 pads. An empty document (n = 0)
contributes no chunk: there is nothing to reconstruct.

``packed`` (the official code's layout: ``tokenize_function`` + ``group_texts`` in
train/train_calm.py): each document of a group is tokenised alone with BOS in front and nothing
after it, the group's documents are concatenated in order, and the stream is cut into K-token
chunks from its first token, the last (< K) tokens dropped:

    stream = BOS, d1_1 .. d1_n1, BOS, d2_1 .. d2_n2, ...          (no EOT, no PAD)
    chunks = stream[: K * floor(len / K)] reshaped to [floor(len / K), K]

so a chunk may hold the end of one document, BOS and the start of the next. The official code
groups 1,000 documents at a time (Hugging Face ``datasets.map(batched=True)``'s batch) and cuts
its training blocks inside a group the same way; ``data.pack_documents`` is that group size here.

Stage 1, the latents, stage 2, the baseline and the evaluation share these functions; a run
records its layout and refuses latents or models of the other (``layout_of``).
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("document", "packed")


def chunk_ids(ids: list[int], K: int, eot_id: int, pad_id: int) -> np.ndarray:
    """One document's token ids -> int32 array [num_chunks, K] (the ``document`` layout)."""
    if len(ids) == 0:
        return np.zeros((0, K), dtype=np.int32)
    seq = list(ids) + [eot_id]
    seq += [pad_id] * ((-len(seq)) % K)
    return np.asarray(seq, dtype=np.int32).reshape(-1, K)  # [n_chunks, K]


def chunk_documents(docs_ids: list[list[int]], K: int, eot_id: int, pad_id: int):
    """Many documents -> (chunks [N, K] int32, doc_index [N] int64, position [N] int32), ``document``
    layout.

    doc_index[i] is the index of the document chunk i came from, position[i] its chunk number
    inside that document (0-based); together they say where every chunk belongs.
    """
    parts, doc_index, position = [], [], []
    for d, ids in enumerate(docs_ids):
        c = chunk_ids(ids, K, eot_id, pad_id)
        parts.append(c)
        doc_index.append(np.full(len(c), d, dtype=np.int64))
        position.append(np.arange(len(c), dtype=np.int32))
    if not parts:
        return np.zeros((0, K), np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(parts), np.concatenate(doc_index), np.concatenate(position)


def pack_documents(docs_ids: list[list[int]], K: int, bos_id: int):
    """One group of documents -> (chunks [N, K] int32, doc_index [N] int64, position [N] int32), the
    ``packed`` layout: BOS + ids per document, concatenated, cut into K-token chunks, the tail
    dropped. doc_index[i] is the document holding chunk i's first token, position[i] the chunk's
    number in the group's stream."""
    lengths = np.asarray([len(ids) + 1 for ids in docs_ids], dtype=np.int64)  # [D] with BOS
    n = int(lengths.sum()) // K
    if n == 0:
        return np.zeros((0, K), np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)
    stream = np.fromiter((t for ids in docs_ids for t in (bos_id, *ids)), dtype=np.int32, count=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths  # [D] each document's first token (its BOS) in the stream
    doc_index = np.searchsorted(starts, np.arange(n, dtype=np.int64) * K, side="right") - 1  # [N]
    return stream[: n * K].reshape(n, K), doc_index.astype(np.int64), np.arange(n, dtype=np.int32)


def layout_of(layout: str) -> str:
    """The layout an artifact was made with, from its config's ``data.layout``: ``auto`` (configs
    written before the setting existed, or a run that left it to its AE) is ``document``."""
    return "document" if layout == "auto" else layout
