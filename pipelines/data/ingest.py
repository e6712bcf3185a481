"""Corpus ingest on Ray Data: files -> documents -> a deterministic train/val split.

This module is the Ray Data wiring only: which files and which format come from
``pipelines.data.files`` (``resolve_corpus_files``), how each file becomes records (formats,
normalisation, bad records, the split rule) from ``pipelines.data.parsers`` (``parse_files``).

Parquet files are checked on the driver before anything runs: a file without the
``data.text_field`` column (or with a non-string one) is a ``DataError``.

On a tiny corpus the val split can be empty even with ``val_fraction`` > 0: ``load_corpus`` does
not fix that, it reports it (``CorpusStats.documents["val"] == 0``) and the caller decides (e.g.
validate on training data).

Order: the datasets made here preserve order (files sorted, documents in file order), and so do
the datasets derived from them, so ``iter_texts(ds, N)`` is reproducible run to run.

Ray resources: every task asks for ``data.read_cpus`` (fractional) CPUs and there are no actor
pools, so ingest runs on a 2-CPU cluster next to training workers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from calm_core.config import DataConfig
from calm_core.errors import DataError
from pipelines.data.files import resolve_corpus_files
from pipelines.data.parsers import BAD_STATUSES, SPLITS, parse_files
from pipelines.progress import progress

if TYPE_CHECKING:
    import ray.data


def _check_parquet_column(fs: pafs.FileSystem, files: list[str], text_field: str) -> None:
    """Read each Parquet footer on the driver: a missing or non-string text column is a DataError."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            schema = pq.read_schema(f, filesystem=fs)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"'{f}' is not a readable Parquet file ({msg}); remove it from the corpus "
                            "or set data.format") from None
        if text_field not in schema.names:
            raise DataError(f"Parquet file '{f}' has no column '{text_field}' (columns: {', '.join(schema.names)}); "
                            "set data.text_field to the column that holds the text")
        t = schema.field(text_field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise DataError(f"column '{text_field}' of Parquet file '{f}' holds {t}, not strings; "
                            "set data.text_field to the column that holds the text")


def _source_prefix(spec: str, fs: pafs.FileSystem) -> str:
    """``s3://`` etc. for remote filesystems, so that ``source`` reads like the user's URI."""
    if isinstance(fs, pafs.LocalFileSystem) or "://" not in spec:
        return ""
    return spec.split("://", 1)[0] + "://"


def parse_options(spec: str, cfg: DataConfig, fs: pafs.FileSystem, fmt: str, sections: int = 0) -> dict:
    """What ``pipelines.data.parsers.parse_files`` needs to turn one file into records."""
    return {
        "format": fmt,
        "separator": cfg.separator,
        "eot_marker": cfg.eot_marker,
        "text_field": cfg.text_field,
        "split_salt": cfg.split_salt,
        "val_fraction": cfg.val_fraction,
        "max_documents": cfg.max_documents,
        "source_prefix": _source_prefix(spec, fs),
        "sections": sections,
    }


def _read(spec: str, cfg: DataConfig, fs: pafs.FileSystem, files: list[str], fmt: str,
          sections: int = 0) -> "ray.data.Dataset":
    import ray.data

    if fmt == "parquet":
        _check_parquet_column(fs, files, cfg.text_field)
    opts = parse_options(spec, cfg, fs, fmt, sections)
    raw = ray.data.read_binary_files(files, filesystem=fs, include_paths=True, num_cpus=cfg.read_cpus)
    raw.context.execution_options.preserve_order = True  # a copy of the global context, shared by derived datasets
    return raw.map_batches(parse_files, fn_kwargs={"opts": opts}, batch_size=1, batch_format="numpy",
                           num_cpus=cfg.read_cpus)


@dataclass
class CorpusStats:
    """What ``load_corpus`` found: files, good documents and characters per split, bad records."""

    files: int
    format: str
    documents: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    characters: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    skipped: dict[str, int] = field(default_factory=lambda: {s: 0 for s in BAD_STATUSES})

    @property
    def total_documents(self) -> int:
        return sum(self.documents.values())

    def skipped_text(self) -> str:
        return ", ".join(f"{n:,} {s}" for s, n in self.skipped.items() if n) or "none"

    def summary(self) -> str:
        d, c = self.documents, self.characters
        text = (f"{self.files} {self.format} file{'s' if self.files != 1 else ''}: "
                f"{self.total_documents:,} documents ({d['train']:,} train / {d['val']:,} val), "
                f"{sum(c.values()):,} characters ({c['train']:,} / {c['val']:,}); skipped: {self.skipped_text()}")
        return text + ("; no held-out documents" if d["val"] == 0 else "")

    def to_dict(self) -> dict:
        return asdict(self)


def _block_counts(batch: pa.Table) -> pa.Table:
    """map_batches UDF: records and characters per (status, split) within one block."""
    t = pa.table({"status": batch["status"], "split": batch["split"], "source": batch["source"],
                  "chars": pc.utf8_length(batch["text"])})
    return t.group_by(["status", "split", "source"]).aggregate([("chars", "sum"), ("chars", "count")])


def _stats(docs: "ray.data.Dataset", files: int, fmt: str, cpus: float,
           per_source: dict[tuple[str, str], int] | None = None) -> CorpusStats:
    """One pass over the blocks (per-block partial counts, summed on the driver); ``per_source``
    receives the good documents per (source file, split)."""
    stats = CorpusStats(files=files, format=fmt)
    parts = docs.map_batches(_block_counts, batch_size=None, batch_format="pyarrow", num_cpus=cpus).take_all()
    for row in parts:
        if row["status"] == "ok":
            if per_source is not None:
                key = (row["source"], row["split"])
                per_source[key] = per_source.get(key, 0) + int(row["chars_count"])
            stats.documents[row["split"]] += int(row["chars_count"])
            stats.characters[row["split"]] += int(row["chars_sum"] or 0)
        else:
            stats.skipped[row["status"]] += int(row["chars_count"])
    return stats


def _only_ok(batch: pa.Table, split: str) -> pa.Table:
    keep = pc.and_(pc.equal(batch["status"], "ok"), pc.equal(batch["split"], split))
    return batch.filter(keep).select(["doc_id", "text"])


def load_corpus(spec: str, cfg: DataConfig) -> tuple["ray.data.Dataset", "ray.data.Dataset", CorpusStats]:
    """Read the corpus once (materialised), count it, and return (train, val, stats).

    ``train`` and ``val`` hold only good documents, columns ``doc_id`` and ``text``, in corpus order
    (lazy filters over the one materialised read). ``val`` may be empty (tiny corpus, or
    ``val_fraction`` 0): check ``stats.documents["val"]``. When no whole document is held out (one
    long text, or a few) the documents are cut into sections of ``data.section_chars`` at line ends
    and sections are held out instead. Raises ``DataError`` when no document is usable.
    """
    scan, docs = _counted(spec, cfg, materialize=True)
    split = {
        s: docs.map_batches(_only_ok, fn_kwargs={"split": s}, batch_size=None, batch_format="pyarrow",
                            num_cpus=cfg.read_cpus)
        for s in SPLITS
    }
    return split["train"], split["val"], scan.stats


@dataclass
class CorpusScan:
    """A corpus counted in one pass, and how to read it again the same way (the files in corpus
    order, the parse options, the section cut chosen)."""

    fs: pafs.FileSystem
    files: list[str]
    options: dict
    stats: CorpusStats
    per_source: dict[tuple[str, str], int]  # good documents per (source, split); source = prefix + path


def scan_corpus(spec: str, cfg: DataConfig) -> CorpusScan:
    """``load_corpus``'s counting without keeping the documents: the read streams through (nothing
    materialised), so memory does not grow with the corpus. A consumer reads the files again
    (``pipelines.data.precompute``)."""
    return _counted(spec, cfg, materialize=False)[0]


def _counted(spec: str, cfg: DataConfig, materialize: bool) -> tuple[CorpusScan, "ray.data.Dataset"]:
    fs, files, fmt = resolve_corpus_files(spec, cfg.format)

    def count(sections: int):
        docs = _read(spec, cfg, fs, files, fmt, sections)
        docs = docs.materialize() if materialize else docs
        per_source: dict = {}
        stats = _stats(docs, len(files), fmt, cfg.read_cpus, per_source)
        return CorpusScan(fs, files, parse_options(spec, cfg, fs, fmt, sections), stats, per_source), docs

    scan, docs = count(0)
    stats = scan.stats
    if stats.documents["val"] == 0 and stats.documents["train"] and cfg.val_fraction > 0 and cfg.section_chars:
        cut, cut_docs = count(cfg.section_chars)
        if cut.stats.documents["val"]:
            progress(f"[corpus] no whole document is held out ({stats.documents['train']:,} documents); holding "
                     f"out sections of about {cfg.section_chars:,} characters instead (data.section_chars)")
            scan, docs, stats = cut, cut_docs, cut.stats
    if stats.total_documents == 0:
        raise DataError(f"corpus '{spec}' has no usable documents ({stats.skipped_text()} in {stats.files} "
                        f"file{'s' if stats.files != 1 else ''}); check the files, data.format "
                        f"({cfg.format}), data.separator ({cfg.separator}) and data.text_field ({cfg.text_field})")
    return scan, docs


def iter_texts(ds: "ray.data.Dataset", limit: int | None = None, batch_size: int = 1024) -> Iterator[str]:
    """The ``text`` column of ``ds`` on the driver, in order; at most ``limit`` (None or <= 0: all)."""
    if limit is not None and limit > 0:
        ds = ds.limit(limit)
    for batch in ds.select_columns(["text"]).iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield from batch.column("text").to_pylist()

