"""Shards of the latent precompute: which shard a document is in, and the driver's writer that
commits shards as their rows arrive.

A document's shard is its index in its split (corpus order) // ``latents.shard_documents``;
``ShardDocuments`` tags documents at the read and drops those of committed shards. In the
``packed`` layout (``calm_core.chunking``) it also packs them: a read task holds one whole file,
so it cuts the file's documents of each shard into groups of ``data.pack_documents`` (a group
never spans two files or two shards: it starts at the file's first document of the shard and
every ``pack_documents`` documents after) and emits each group's packed chunks, named by the
group's first document (``doc_index``) and their number in the group (``position``).
``ShardWriter`` takes the encoded rows in any order, writes each shard's part files and commits a
shard (its JSON record) once its rows are exactly its units' chunks in corpus order: the units
are its documents, or its packed groups (``shard_units``). A group too short for one chunk sends
one marker row (``position`` -1) so that the writer knows it is whole and empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from calm_core.errors import ArtifactError, DataError
from pipelines.data import latents as LT
from pipelines.data.packing import Packing, group_starts, pack_groups
from pipelines.progress import progress
from pipelines.storage import RunDir

PART_ROWS = 16384  # rows per part file (the last of a shard holds the rest): one Parquet row group each


class ShardDocuments:
    """map_batches UDF, one file per call: its bytes -> its good documents of the wanted splits, each
    with its index in the split (corpus order: files in order, records in file order; the file's
    first index comes from the scan's counts) and its shard (index // shard_documents). Documents
    of shards an earlier run committed are dropped here, so a rerun never reads them further.
    With ``packing`` the documents leave as packed chunks instead (the module docstring)."""

    def __init__(self, options: dict, offsets: dict[tuple[str, str], int], shard_documents: int,
                 skip: dict[str, set[int]], packing: Packing | None = None):
        self.options, self.offsets, self.S, self.skip = options, offsets, shard_documents, skip
        self.packing = packing

    def __call__(self, batch: dict) -> pa.Table | dict[str, np.ndarray]:
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
                first = self.offsets[source, name]
                index = first + np.arange(len(rows), dtype=np.int64)
                shard = (index // self.S).astype(np.int32)
                keep = ~np.isin(shard, list(skip)) if skip else np.ones(len(rows), bool)
                docs = pa.table({"doc_id": t["doc_id"].take(rows[keep]), "text": t["text"].take(rows[keep]),
                                 "split": pa.array([name] * int(keep.sum()), pa.string()),
                                 "shard": shard[keep], "doc_index": index[keep]})
                if self.packing is not None:
                    docs = docs.append_column("group", pa.array(group_starts(index[keep], first, self.S,
                                                                             self.packing.group)))
                out.append(docs)
        if self.packing is not None:
            return pack_groups(out, self.packing)
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


def shard_units(scan, splits: tuple[str, ...], S: int, group: int | None) -> Callable[[str, int], np.ndarray]:
    """(split, shard) -> the units the shard holds rows of, in corpus order: its documents' indices,
    or (``group``: the packed layout) the first document of each of its packed groups."""
    docs = {s: int(scan.stats.documents.get(s, 0)) for s in splits}
    if group is None:
        return lambda split, shard: np.arange(shard * S, min((shard + 1) * S, docs[split]), dtype=np.int64)
    firsts = offsets(scan, splits)
    units: dict[tuple[str, int], list[np.ndarray]] = {}
    for f in scan.files:
        source = scan.options["source_prefix"] + str(f)
        for s in splits:
            n = scan.per_source.get((source, s), 0)
            if not n:
                continue
            index = firsts[source, s] + np.arange(n, dtype=np.int64)
            starts = np.unique(group_starts(index, firsts[source, s], S, group))
            for sh in np.unique(starts // S):
                units.setdefault((s, int(sh)), []).append(starts[starts // S == sh])
    done = {k: np.concatenate(v) for k, v in units.items()}
    return lambda split, shard: done.get((split, shard), np.zeros(0, np.int64))


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
    units: np.ndarray  # the units (documents or packed groups) it holds, by their first document's index
    schema: pa.Schema
    parts: list = dataclasses.field(default_factory=list)
    pending: list = dataclasses.field(default_factory=list)
    pending_rows: int = 0
    keys: list = dataclasses.field(default_factory=list)  # (doc_index [n], position [n]) per batch, as written
    rows: int = 0
    units_done: int = 0  # units whose last chunk (or empty marker) arrived
    empty: list = dataclasses.field(default_factory=list)  # packed groups without a chunk
    rows_expected: int = 0  # their chunks (the last chunk's position + 1)

    @property
    def folder(self) -> tuple[str, ...]:
        return (LT.ARTIFACT, self.split, f"shard-{self.shard:05d}")

    @property
    def complete(self) -> bool:
        return self.units_done == len(self.units) and self.rows == self.rows_expected


class ShardWriter:
    """The driver's end of the stream: encoded rows (any order, routed by split and shard) -> part
    files of ``PART_ROWS`` rows per shard; a shard whose every unit has all its chunks is checked
    (exactly its units' chunks, in corpus order: put in order if Ray Data permuted them) and
    committed by its record. Holds at most ``PART_ROWS`` rows per shard in flight. ``units``:
    (split, shard) -> the shard's units (``shard_units``)."""

    def __init__(self, run: RunDir, K: int, latent_dim: int, dtype: str, meta: dict,
                 units: Callable[[str, int], np.ndarray]):
        self.run, self.K, self.l, self.dtype, self.meta = run, K, latent_dim, dtype, meta
        self.units = units
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
            schema = LT.latents_schema(self.K, self.l, self.dtype, {**self.meta, "split": split, "shard": shard})
            sh = self.open[split, shard] = _Shard(split, shard, self.units(split, shard), schema)
            self.run.delete(*sh.folder)  # whatever an interrupted attempt left
            self.run.fs.create_dir(self.run.path(*sh.folder), recursive=True)
        pos = t["position"].to_numpy()
        marker = pos < 0  # a packed group without a chunk: whole, nothing to write
        if marker.any():
            sh.units_done += int(marker.sum())
            sh.empty += t["doc_index"].to_numpy()[marker].tolist()
            t, pos = t.filter(pa.array(~marker)), pos[~marker]
        last = t["last"].to_numpy(zero_copy_only=False)
        sh.keys.append((t["doc_index"].to_numpy(), pos))
        sh.units_done += int(last.sum())
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
        perm = corpus_order(doc, pos, np.setdiff1d(sh.units, sh.empty))
        if not np.array_equal(perm, np.arange(len(perm))):
            first = int(np.argmax(perm != np.arange(len(perm))))
            progress(f"[latents] {sh.split} shard {sh.shard}: Ray Data delivered its rows out of corpus order "
                     f"(row {first} holds chunk {pos[first]} of document {doc[first]}); putting them in order")
            table = pa.concat_tables([_read(self.run, self.run.path(LT.ARTIFACT, p["path"])) for p in sh.parts])
            table = table.take(perm)
            for part in sh.parts:
                piece, table = table.slice(0, part["rows"]), table.slice(part["rows"])
                part.update(self._put(sh, Path(part["path"]).name, piece))
        rec = {"split": sh.split, "shard": sh.shard, "parts": sh.parts, "rows": sh.rows,
               **({"empty_groups": len(sh.empty)} if sh.empty else {})}
        self.run.write_text(json.dumps(rec, indent=1), LT.ARTIFACT, sh.split, f"shard-{sh.shard:05d}.json")  # commit
        self.records[sh.split, sh.shard] = rec
        self.rows_written += sh.rows
        del self.open[sh.split, sh.shard]

    def finish(self) -> None:
        if self.open:
            sh = next(iter(self.open.values()))
            raise ArtifactError(f"latents: the stream ended with {len(self.open)} shard(s) incomplete ({sh.split} "
                                f"shard {sh.shard}: {sh.units_done} of {len(sh.units)} documents or groups); nothing of "
                                "them was committed, rerun to write them")


def _read(run: RunDir, path: str, columns: list[str] | None = None) -> pa.Table:
    with run.fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def corpus_order(doc_index: np.ndarray, position: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The permutation that puts a shard's rows in corpus order: units (documents, or packed groups
    named by their first document's index) in increasing order, each one's chunks 0, 1, 2, ...
    ``doc_index`` / ``position`` [N]: each row's unit and chunk number; ``units``: the units the
    shard must hold rows of. Raises ``ArtifactError`` unless the rows are exactly the chunks of
    those units (none missing, none twice, none of another unit)."""
    doc, pos = np.asarray(doc_index, dtype=np.int64), np.asarray(position, dtype=np.int64)
    units = np.asarray(units, dtype=np.int64)
    perm = np.lexsort((pos, doc))
    d, p = doc[perm], pos[perm]
    new = np.ones(len(d), dtype=bool)
    new[1:] = d[1:] != d[:-1]
    present = d[new]
    if not np.array_equal(present, units):
        extra, missing = np.setdiff1d(present, units), np.setdiff1d(units, present)
        if len(extra):
            raise ArtifactError(f"latents: rows of document {extra[0]} are not of this shard "
                                f"({units[0] if len(units) else '-'}..{units[-1] if len(units) else '-'})")
        raise ArtifactError(f"latents: chunk 0 of document {missing[0] if len(missing) else '?'} is missing from the "
                            "rows written")
    want = np.arange(len(d)) - np.maximum.accumulate(np.where(new, np.arange(len(d)), 0))  # 0, 1, .. per doc
    if not np.array_equal(p, want):
        i = int(np.argmax(p != want))
        raise ArtifactError(f"latents: document {d[i]} has chunk {p[i]} where chunk {want[i]} belongs (a chunk "
                            "missing or written twice)")
    return perm
