"""Shards of the latent precompute: which shard a document is in, and the driver's writer that
commits shards as their rows arrive.

A document's shard is its index in its split (corpus order) // ``latents.shard_documents``;
``ShardDocuments`` tags documents at the read and drops those of committed shards.
``ShardWriter`` takes the encoded rows in any order, writes each shard's part files and commits a
shard (its JSON record) once its rows are exactly its documents' chunks in corpus order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from calm_core.errors import ArtifactError, DataError
from pipelines.data import latents as LT
from pipelines.progress import progress
from pipelines.storage import RunDir

PART_ROWS = 16384  # rows per part file (the last of a shard holds the rest): one Parquet row group each


class ShardDocuments:
    """map_batches UDF, one file per call: its bytes -> its good documents of the wanted splits, each
    with its index in the split (corpus order: files in order, records in file order; the file's
    first index comes from the scan's counts) and its shard (index // shard_documents). Documents
    of shards an earlier run committed are dropped here, so a rerun never reads them further."""

    def __init__(self, options: dict, offsets: dict[tuple[str, str], int], shard_documents: int,
                 skip: dict[str, set[int]]):
        self.options, self.offsets, self.S, self.skip = options, offsets, shard_documents, skip

    def __call__(self, batch: dict) -> pa.Table:
        from pipelines.data.parsers import parse_files

        out = []
        for data, path in zip(batch["bytes"], batch["path"]):
            t = parse_files({"bytes": [data], "path": [path]}, self.options)
            source = self.options["source_prefix"] + str(path)
            status, split = np.asarray(t["status"].to_pylist()), np.asarray(t["split"].to_pylist())
            for name, skip in self.skip.items():
                rows = np.flatnonzero((status == "ok") & (split == name))
                if not len(rows):
                    continue
                if (source, name) not in self.offsets:
                    raise DataError(f"'{source}' was not seen when the corpus was counted (did the files change?)")
                index = self.offsets[source, name] + np.arange(len(rows), dtype=np.int64)
                shard = (index // self.S).astype(np.int32)
                keep = ~np.isin(shard, list(skip)) if skip else np.ones(len(rows), bool)
                out.append(pa.table({"doc_id": t["doc_id"].take(rows[keep]), "text": t["text"].take(rows[keep]),
                                     "split": pa.array([name] * int(keep.sum()), pa.string()),
                                     "shard": shard[keep], "doc_index": index[keep]}))
        schema = pa.schema([("doc_id", pa.string()), ("text", pa.large_string()), ("split", pa.string()),
                            ("shard", pa.int32()), ("doc_index", pa.int64())])
        return pa.concat_tables([t.cast(schema) for t in out]) if out else schema.empty_table()


def offsets(scan, splits: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """(source, split) -> the index in the split of the file's first good document."""
    out, seen = {}, {s: 0 for s in splits}
    for f in scan.files:
        source = scan.options["source_prefix"] + str(f)
        for s in splits:
            out[source, s] = seen[s]
            seen[s] += scan.per_source.get((source, s), 0)
    for s in splits:
        if seen[s] != scan.stats.documents.get(s, 0):
            raise DataError(f"the corpus's {s} documents could not be placed in file order ({seen[s]:,} of "
                            f"{scan.stats.documents.get(s, 0):,}); file names as read differ from those listed")
    return out


def committed(run: RunDir, split: str, shard: int) -> dict[str, Any] | None:
    """The shard's commit record if it exists and its files are all there with their sizes."""
    rec_path = (LT.ARTIFACT, split, f"shard-{shard:05d}.json")
    if not run.exists(*rec_path):
        return None
    rec = run.read_json(*rec_path)
    sizes = dict(run.list_files(LT.ARTIFACT, split, f"shard-{shard:05d}"))
    if all(sizes.get(Path(p["path"]).name) == p["bytes"] for p in rec["parts"]):
        return rec
    progress(f"[latents] {split} shard {shard}: committed files are missing or changed; writing it again")
    run.delete(*rec_path)
    return None


@dataclasses.dataclass
class _Shard:
    """A shard being written by the driver: part files so far, rows not yet in a part, what arrived."""

    split: str
    shard: int
    documents: int  # how many documents it has
    schema: pa.Schema
    parts: list = dataclasses.field(default_factory=list)
    pending: list = dataclasses.field(default_factory=list)
    pending_rows: int = 0
    keys: list = dataclasses.field(default_factory=list)  # (doc_index [n], position [n]) per batch, as written
    rows: int = 0
    docs_done: int = 0  # documents whose last chunk arrived
    rows_expected: int = 0  # their chunks (the last chunk's position + 1)

    @property
    def folder(self) -> tuple[str, ...]:
        return (LT.ARTIFACT, self.split, f"shard-{self.shard:05d}")

    @property
    def complete(self) -> bool:
        return self.docs_done == self.documents and self.rows == self.rows_expected


class ShardWriter:
    """The driver's end of the stream: encoded rows (any order, routed by split and shard) -> part
    files of ``PART_ROWS`` rows per shard; a shard whose every document has all its chunks is
    checked (exactly its documents' chunks, in corpus order: put in order if Ray Data permuted
    them) and committed by its record. Holds at most ``PART_ROWS`` rows per shard in flight."""

    def __init__(self, run: RunDir, K: int, latent_dim: int, dtype: str, meta: dict, documents: dict[str, int],
                 shard_documents: int):
        self.run, self.K, self.l, self.dtype, self.meta = run, K, latent_dim, dtype, meta
        self.documents, self.S = documents, shard_documents
        self.open: dict[tuple[str, int], _Shard] = {}
        self.records: dict[tuple[str, int], dict] = {}
        self.encoders: set[str] = set()
        self.rows_written = 0

    def add(self, table: pa.Table) -> None:
        if not len(table):
            return
        self.encoders.update(pc.unique(table["encoder"]).to_pylist())
        split = table["split"].to_numpy(zero_copy_only=False)
        shard = table["shard"].to_numpy()
        key = np.where(split == "train", 0, 1).astype(np.int64) << 32 | shard.astype(np.int64)
        edges = [0, *(np.flatnonzero(key[1:] != key[:-1]) + 1).tolist(), len(key)]
        for a, b in zip(edges, edges[1:]):  # runs of one shard (in corpus order: one or two runs per batch)
            self._add(str(split[a]), int(shard[a]), table.slice(a, b - a))

    def _add(self, split: str, shard: int, t: pa.Table) -> None:
        sh = self.open.get((split, shard))
        if sh is None:
            n = min(self.S, self.documents[split] - shard * self.S)
            schema = LT.latents_schema(self.K, self.l, self.dtype, {**self.meta, "split": split, "shard": shard})
            sh = self.open[split, shard] = _Shard(split, shard, n, schema)
            self.run.delete(*sh.folder)  # whatever an interrupted attempt left
            self.run.fs.create_dir(self.run.path(*sh.folder), recursive=True)
        pos = t["position"].to_numpy()
        last = t["last"].to_numpy(zero_copy_only=False)
        sh.keys.append((t["doc_index"].to_numpy(), pos))
        sh.docs_done += int(last.sum())
        sh.rows_expected += int((pos[last] + 1).sum())
        sh.rows += len(t)
        sh.pending.append(t.select([f.name for f in sh.schema]))
        sh.pending_rows += len(t)
        if sh.pending_rows >= PART_ROWS:
            self._write_part(sh, PART_ROWS)
        if sh.complete:
            self._commit(sh)

    def _write_part(self, sh: _Shard, rows: int | None = None) -> None:
        """Write the first ``rows`` pending rows (all with None) as the shard's next part file."""
        table = pa.concat_tables(sh.pending)
        rows = len(table) if rows is None else rows
        piece, rest = table.slice(0, rows), table.slice(rows)
        sh.pending, sh.pending_rows = ([rest] if len(rest) else []), len(rest)
        name = f"part-{len(sh.parts):06d}.parquet"
        sh.parts.append({"path": f"{sh.split}/shard-{sh.shard:05d}/{name}", **self._put(sh, name, piece)})

    def _put(self, sh: _Shard, name: str, table: pa.Table) -> dict:
        table = pa.Table.from_arrays(table.columns, schema=sh.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **LT.PARQUET_OPTIONS)
        data = sink.getvalue()
        with self.run.fs.open_output_stream(self.run.path(*sh.folder, name)) as f:
            f.write(data)
        return {"rows": len(table), "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}

    def _commit(self, sh: _Shard) -> None:
        """Check the shard's rows, put them in corpus order if they are not, write its record."""
        if sh.pending_rows:
            self._write_part(sh)
        doc = np.concatenate([k[0] for k in sh.keys])
        pos = np.concatenate([k[1] for k in sh.keys])
        perm = LT.corpus_order(doc, pos, sh.shard * self.S, sh.documents)
        if not np.array_equal(perm, np.arange(len(perm))):
            first = int(np.argmax(perm != np.arange(len(perm))))
            progress(f"[latents] {sh.split} shard {sh.shard}: Ray Data delivered its rows out of corpus order "
                     f"(row {first} holds chunk {pos[first]} of document {doc[first]}); putting them in order")
            table = pa.concat_tables([_read(self.run, self.run.path(LT.ARTIFACT, p["path"])) for p in sh.parts])
            table = table.take(perm)
            for part in sh.parts:
                piece, table = table.slice(0, part["rows"]), table.slice(part["rows"])
                part.update(self._put(sh, Path(part["path"]).name, piece))
        rec = {"split": sh.split, "shard": sh.shard, "parts": sh.parts, "rows": sh.rows}
        self.run.write_text(json.dumps(rec, indent=1), LT.ARTIFACT, sh.split, f"shard-{sh.shard:05d}.json")  # commit
        self.records[sh.split, sh.shard] = rec
        self.rows_written += sh.rows
        del self.open[sh.split, sh.shard]

    def finish(self) -> None:
        if self.open:
            sh = next(iter(self.open.values()))
            raise ArtifactError(f"latents: the stream ended with {len(self.open)} shard(s) incomplete ({sh.split} "
                                f"shard {sh.shard}: {sh.docs_done} of {sh.documents} documents); nothing of "
                                "them was committed, rerun to write them")


def _read(run: RunDir, path: str, columns: list[str] | None = None) -> pa.Table:
    with run.fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)
