"""Cutting tokenised documents into K-token chunks (CALM.md section 1, "Chunking").

For a document with token ids t_1..t_n (n >= 1):

    sequence = t_1 .. t_n, EOT, PAD * p      with p = (-(n + 1)) mod K
    chunks   = sequence reshaped to [ceil((n + 1) / K), K]

so every document ends with an end-of-text token, no chunk spans two documents, and a document
of exactly m*K tokens gets one more chunk holding EOT and K-1 pads. An empty document (n = 0)
contributes no chunk: there is nothing to reconstruct. Stage 1 and stage 2 share this function.
"""

from __future__ import annotations

import numpy as np


def chunk_ids(ids: list[int], K: int, eot_id: int, pad_id: int) -> np.ndarray:
    """One document's token ids -> int32 array [num_chunks, K]."""
    if len(ids) == 0:
        return np.zeros((0, K), dtype=np.int32)
    seq = list(ids) + [eot_id]
    seq += [pad_id] * ((-len(seq)) % K)
    return np.asarray(seq, dtype=np.int32).reshape(-1, K)  # [n_chunks, K]


def chunk_documents(docs_ids: list[list[int]], K: int, eot_id: int, pad_id: int):
    """Many documents -> (chunks [N, K] int32, doc_index [N] int64, position [N] int32).

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
