"""Parsing corpus files into documents: bytes of one file -> records (``DOC_SCHEMA``). No Ray here.

``parse_files`` is the body of the Ray Data ``map_batches`` UDF that ``pipelines.data.ingest`` runs
(plain pyarrow in, plain pyarrow out); which files and which format: ``pipelines.data.files``.

Formats (``data.format``)
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
             column (or with a non-string one) is a ``DataError``, raised before anything runs
             (``pipelines.data.ingest`` reads each footer on the driver).

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
changing ``data.split_salt`` draws another split.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterator

import pyarrow as pa

STATUSES = ("ok", "empty", "undecodable", "malformed", "missing_field")
BAD_STATUSES = STATUSES[1:]
SPLITS = ("train", "val")
DOC_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("text", pa.large_string()), ("split", pa.string()),
     ("status", pa.string()), ("source", pa.string())]
)
_BINARY_SNIFF = 8192


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


def sections(text: str, size: int) -> list[str]:
    """``text`` cut after the first line end at or past every ``size`` characters (size 0: whole)."""
    if size <= 0 or len(text) <= size:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _file_records(data: bytes, source: str, opts: dict) -> list[dict]:
    """Every record of one file (at least one, so that an empty file is counted). With
    ``opts["sections"]`` > 0 every document is cut into sections of about that many characters,
    each a record of its own (the fallback split of ``pipelines.data.ingest.load_corpus``)."""
    salt, frac, limit = opts["split_salt"], opts["val_fraction"], opts["max_documents"]
    out, good = [], 0
    for text, status in _PARSERS[opts["format"]](data, opts):
        for piece in sections(text, opts.get("sections", 0)) if text is not None and status == "ok" else [text]:
            rec = _record(piece, status, source, salt, frac)
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
