"""Offline latent precomputation (one streaming Ray Data execution per job: read -> tokenise ->
encoder actor pool -> the driver's shard writer) and the reader stage 2 uses.

The AE artifact is a randomly initialised tiny autoencoder written by the project's artifact writer
(conftest ``make_ae``: what matters here is that the stored values are exactly what the encoder
computes), so no Ray Train run is needed.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, assert_same_latent_rows, latent_rows, stop_group

from calm_core.artifacts import load_ae
from calm_core.config import load_config
from calm_core.errors import ArtifactError, DataError
from pipelines.data import latents as LT
from pipelines.data.precompute import precompute_latents
from pipelines.data.shards import corpus_order
from pipelines.storage import RunDir

pytestmark = pytest.mark.slow


def cfg_for(*overrides):
    return load_config("debug", ["latents.shard_documents=20", "latents.batch_size=64", *overrides])


def read_rows(run: RunDir, manifest: dict, split: str):
    files = LT.part_files(run, manifest, split)
    tables = [pq.read_table(f) for f in files]
    return tables


@pytest.fixture
def setup(tmp_path, tiny_corpus, make_ae):
    run = RunDir(str(tmp_path / "run"))
    model, tok = make_ae(tmp_path / "run" / "ae", tiny_corpus.read_text())
    return run, model, tok, tiny_corpus


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 1e-2)])
def test_schema_metadata_and_stored_values_equal_the_encoder(ray_session, setup, dtype, tol):
    run, model, tok, corpus = setup
    m = precompute_latents(cfg_for(f"latents.dtype={dtype}"), str(corpus), run)
    assert m["identity"]["dtype"] == dtype and m["metrics"]["rows"] > 0
    assert len(m["parts"]["train"]) >= 2  # several shards (20 documents each)
    expected_schema = LT.latents_schema(4, 16, dtype)
    n_rows = 0
    for split in LT.SPLITS:
        for t in read_rows(run, m, split):
            assert t.schema.remove_metadata().equals(expected_schema.remove_metadata())
            meta = json.loads(t.schema.metadata[LT.META_KEY])
            assert meta["ae_sha256"] == m["identity"]["ae_sha256"] and meta["K"] == 4 and meta["dtype"] == dtype
            tokens = torch.from_numpy(LT.column_matrix(t, "tokens").astype(np.int64))
            with torch.no_grad():
                mu, log_sigma = model.encode(tokens)
            got_mu = LT.decode_floats(LT.column_matrix(t, "mu"), dtype)
            got_ls = LT.decode_floats(LT.column_matrix(t, "log_sigma"), dtype)
            torch.testing.assert_close(got_mu, mu, rtol=tol, atol=tol)
            torch.testing.assert_close(got_ls, log_sigma, rtol=tol, atol=tol)
            # stream order: the chunks of a document are consecutive, positions 0, 1, 2, ...
            docs, pos = t.column("doc_id").to_pylist(), t.column("position").to_pylist()
            for i in range(1, len(docs)):
                if docs[i] == docs[i - 1]:
                    assert pos[i] == pos[i - 1] + 1
                else:
                    assert pos[i] == 0
            n_rows += len(t)
    assert n_rows == m["metrics"]["rows"]


def test_rows_are_every_chunk_of_the_corpus_in_order(ray_session, setup):
    from calm_core.chunking import chunk_documents
    from pipelines.data.ingest import iter_texts, load_corpus

    run, model, tok, corpus = setup
    cfg = cfg_for()
    m = precompute_latents(cfg, str(corpus), run)
    train_docs, _, _ = load_corpus(str(corpus), cfg.data)
    want, _, _ = chunk_documents(tok.encode_batch(list(iter_texts(train_docs))), 4, tok.eot_id, tok.pad_id)
    got = np.concatenate([LT.column_matrix(t, "tokens") for t in read_rows(run, m, "train")])
    np.testing.assert_array_equal(got, want)


def test_corpus_order_is_the_permutation_back_to_the_documents():
    # documents 10, 11, 12 (the shard's first is 10); 10 and 12 have two chunks
    doc, pos = np.array([10, 10, 11, 12, 12]), np.array([0, 1, 0, 0, 1])
    np.testing.assert_array_equal(corpus_order(doc, pos, [10, 11, 12]), np.arange(5))
    # two encoder batches swapped: [12/0 12/1] came before [10/0 10/1 11/0]
    np.testing.assert_array_equal(corpus_order(np.array([12, 12, 10, 10, 11]), np.array([0, 1, 0, 1, 0]), [10, 11, 12]),
                                  [2, 3, 4, 0, 1])
    with pytest.raises(ArtifactError, match="chunk 0 of document 11 is missing"):
        corpus_order(np.array([10, 12]), np.array([0, 0]), [10, 11, 12])
    with pytest.raises(ArtifactError, match="document 13 are not of this shard"):
        corpus_order(np.array([10, 11, 12, 13]), np.array([0, 0, 0, 0]), [10, 11, 12])
    with pytest.raises(ArtifactError, match="document 10 has chunk 1 where chunk 2"):  # a chunk written twice
        corpus_order(np.array([10, 10, 10, 11, 12]), np.array([0, 1, 1, 0, 0]), [10, 11, 12])
    # packed groups are named by their first document: groups 10 and 13 (11, 12 inside group 10)
    np.testing.assert_array_equal(corpus_order(np.array([13, 10, 10]), np.array([0, 0, 1]), [10, 13]), [1, 2, 0])


def test_rows_delivered_out_of_order_are_put_in_corpus_order_before_the_commit(ray_session, setup, monkeypatch,
                                                                                capsys):
    from pipelines.data import precompute as P
    from pipelines.data import shards

    run, model, tok, corpus = setup
    cfg = cfg_for("latents.shard_documents=100", "latents.batch_size=32")  # one train shard of many batches
    clean = precompute_latents(cfg, str(corpus), run)
    want = latent_rows(run, clean)

    class Swapping(P.ShardWriter):  # as Ray Data did in the full suite: whole encoder batches permuted
        done = False

        def add(self, table):
            if not Swapping.done and table["split"][0].as_py() == "train" and len(table) > 64:
                Swapping.done = True
                super().add(table.slice(64))
                table = table.slice(0, 64)
            super().add(table)

    Swapping.done = False
    monkeypatch.setattr(P, "ShardWriter", Swapping)
    monkeypatch.setattr(shards, "PART_ROWS", 40)  # several part files: the repair keeps the cut
    again = precompute_latents(cfg, str(corpus), run, overwrite=True)
    assert Swapping.done
    assert "train shard 0: Ray Data delivered its rows out of corpus order" in capsys.readouterr().out
    assert len(again["parts"]["train"]) > 2
    assert_same_latent_rows(latent_rows(run, again), want)
    LT.read_latents(run, "train")  # the commit record's sizes and hashes are those of the files now there


def test_one_encoder_pool_for_the_whole_job_whatever_the_shard_size(ray_session, setup):
    run, model, tok, corpus = setup
    m = precompute_latents(cfg_for("latents.shard_documents=2", "latents.num_actors=2", "latents.batch_size=16"),
                           str(corpus), run)
    shards = len(list((run.local_root / "latents" / "train").glob("shard-*.json")))
    assert shards == 28 and len(list((run.local_root / "latents" / "val").glob("shard-*.json"))) == 3
    # the actors that encoded (each tags its rows with an id made in its constructor): at most the
    # pool's 2, where a pool per shard would have made up to 2 x 31
    assert 1 <= m["metrics"]["encoder_actors"] <= 2
    one = RunDir(str(run.local_root.parent / "one"))
    (run.local_root.parent / "one").mkdir()
    os.symlink(run.local_root / "ae", run.local_root.parent / "one" / "ae")
    big = precompute_latents(cfg_for("latents.shard_documents=1000"), str(corpus), one)
    assert_same_latent_rows(latent_rows(run, m), latent_rows(one, big))  # the shard size changes no row


def test_crash_between_parts_then_rerun_gives_the_clean_rows(ray_session, setup, capsys):
    run, model, tok, corpus = setup
    cfg = cfg_for("latents.shard_documents=5")  # 11 train shards, 1 val
    clean = precompute_latents(cfg, str(corpus), run)
    clean_rows = latent_rows(run, clean)
    root = run.local_root / "latents"

    # a crash after train shards 0-3 were committed and while shard 4 was being written:
    (root / "manifest.json").unlink()
    for rec in [f"train/shard-{i:05d}.json" for i in range(4, 11)] + ["val/shard-00000.json"]:
        (root / rec).unlink()
    part = sorted((root / "train" / "shard-00004").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # half-written file
    (root / "train" / "shard-00004" / "part-999999.parquet").write_bytes(b"junk from a dead writer")

    again = precompute_latents(cfg, str(corpus), run)
    assert "4 shard(s) were already committed" in capsys.readouterr().out
    assert again["metrics"]["shards_kept"] == 4
    # rows written this run = the rows of the Parquet parts of the shards it wrote again, counted in the files
    rewritten = [p for i in range(4, 11) for p in (root / "train" / f"shard-{i:05d}").glob("*.parquet")]
    rewritten += list((root / "val" / "shard-00000").glob("*.parquet"))
    assert again["metrics"]["rows_written_this_run"] == sum(pq.ParquetFile(p).metadata.num_rows for p in rewritten)
    assert_same_latent_rows(latent_rows(run, again), clean_rows)
    assert not (root / "train" / "shard-00004" / "part-999999.parquet").exists()

    # a rerun on the complete output does nothing and says so
    third = precompute_latents(cfg, str(corpus), run)
    assert "nothing to do" in capsys.readouterr().out
    assert third["parts"] == again["parts"]


JOB = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from pipelines.ray_env import ray_environment
    ray_environment()  # the environment every job sets
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory={store},
             log_to_driver=True)
    from calm_core.config import load_config
    from pipelines.data.precompute import precompute_latents
    from pipelines.storage import RunDir
    m = precompute_latents(load_config("debug", json.loads(sys.argv[3])), sys.argv[1], RunDir(sys.argv[2]))
    print("metrics", json.dumps(m["metrics"]))
""")


def _job(tmp_path: Path, corpus: Path, run: Path, overrides: list[str], store_mb: int = 1000) -> subprocess.Popen:
    """The precompute in its own process with its own Ray (a new process group, so that a kill takes
    its Ray with it)."""
    script = tmp_path / "job.py"
    script.write_text(JOB.format(root=str(ROOT), store=store_mb * 2**20))
    return subprocess.Popen([sys.executable, str(script), str(corpus), str(run), json.dumps(overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=tmp_path)


def test_killed_job_then_rerun_gives_the_clean_rows_with_many_small_shards(ray_session, tmp_path, tiny_corpus_text,
                                                                          make_ae):
    """kill -9 of the whole job (driver, Ray, encoder actors) once a random number of its ~150 shards
    are committed, then the same job again: every chunk once, equal to a clean run."""
    import random

    docs = [d for d in tiny_corpus_text.split("<|endoftext|>") if d.strip()]
    corpus = tmp_path / "corpus.txt"  # 480 distinct documents
    corpus.write_text("".join(f"{i} {d.strip()}\n<|endoftext|>\n" for i in range(8) for d in docs))
    overrides = ["latents.shard_documents=3", "latents.batch_size=8"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    make_ae(killed / "ae", corpus.read_text())
    clean.mkdir()
    os.symlink(killed / "ae", clean / "ae")

    at = random.Random(os.getpid()).randint(1, 40)
    records = killed / "latents" / "train"
    proc = _job(tmp_path, corpus, killed, overrides)
    deadline = time.time() + 120
    while len(list(records.glob("shard-*.json"))) < at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    stop_group(proc, signal.SIGKILL)
    out = proc.stdout.read()
    committed = len(list(records.glob("shard-*.json")))
    assert not (killed / "latents" / "manifest.json").exists(), f"the job ended before the kill:\n{out[-2000:]}"
    assert committed >= at, out[-3000:]

    again = precompute_latents(load_config("debug", overrides), str(corpus), RunDir(str(killed)))
    assert again["metrics"]["shards_kept"] >= at
    assert again["metrics"]["rows_written_this_run"] < again["metrics"]["rows"]
    want = precompute_latents(load_config("debug", overrides), str(corpus), RunDir(str(clean)))
    assert_same_latent_rows(latent_rows(RunDir(str(killed)), again), latent_rows(RunDir(str(clean)), want))


def test_a_corpus_larger_than_the_object_store(tmp_path, make_ae):
    """76 MiB of text through a Ray whose object store holds 75 MiB (Ray's minimum): the job streams
    (no split is materialised) and completes with every chunk. Words of 1,000 letters that the
    tokenizer learnt whole keep the encoder's share small; the read, the parse and the tokenizer see
    every byte (four files, so that two cores share them)."""
    word = "a" * 1000
    docs = [f"{i} " + " ".join([word] * 100) for i in range(800)]  # 800 documents of 100 kB
    corpus = tmp_path / "big"
    corpus.mkdir()
    for f in range(4):
        (corpus / f"part-{f}.txt").write_text("".join(d + "\n<|endoftext|>\n" for d in docs[f * 200:(f + 1) * 200]))
    assert sum(f.stat().st_size for f in corpus.iterdir()) > 76 * 2**20
    run = tmp_path / "run"
    _, tok = make_ae(run / "ae", "\n<|endoftext|>\n".join(docs[:4] + [" ".join([word] * 50)] * 50))
    want = sum(len(tok.encode(d)) // 4 + 1 for d in docs)  # chunks of K=4 with end-of-text, by hand
    proc = _job(tmp_path, corpus, run, ["latents.shard_documents=100", "latents.batch_size=4096", "data.val_fraction=0"],
                store_mb=75)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    metrics = json.loads(out.split("metrics ", 1)[1].splitlines()[0])
    assert metrics["rows"] == want and metrics["rows_per_split"]["train"] == want


def test_other_ae_or_dtype_is_refused_and_reader_checks_the_ae(ray_session, setup, tmp_path, make_ae):
    run, model, tok, corpus = setup
    cfg = cfg_for()
    m = precompute_latents(cfg, str(corpus), run)
    mine = load_ae(run.local_root / "ae").identity

    with pytest.raises(ArtifactError, match="dtype"):
        precompute_latents(cfg_for("latents.dtype=float16"), str(corpus), run)
    other_dir = tmp_path / "other_ae"
    make_ae(other_dir, corpus.read_text(), seed=1)
    with pytest.raises(ArtifactError, match="ae_sha256"):
        precompute_latents(cfg, str(corpus), run, ae_path=str(other_dir))

    ds, _ = LT.read_latents(run, "train", expected=mine)
    assert ds.count() == m["metrics"]["rows_per_split"]["train"]
    other = load_ae(other_dir).identity
    with pytest.raises(ArtifactError, match="ae_sha256"):
        LT.read_latents(run, "train", expected=other)

    # --overwrite replaces them
    m2 = precompute_latents(cfg, str(corpus), run, ae_path=str(other_dir), overwrite=True)
    assert m2["identity"]["ae_sha256"] == other["ae_sha256"]


def test_truncated_or_corrupted_part_is_detected(ray_session, setup):
    run, model, tok, corpus = setup
    m = precompute_latents(cfg_for(), str(corpus), run)
    part = run.local_root / "latents" / m["parts"]["train"][0]["path"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        LT.read_latents(run, "train")
    part.write_bytes(bytes(data[:-100]))
    with pytest.raises(ArtifactError, match="truncated"):
        LT.read_latents(run, "train")
    (run.local_root / "latents" / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        LT.read_latents(run, "train")


def test_training_blocks_of_L_consecutive_chunks(ray_session, setup):
    run, model, tok, corpus = setup
    m = precompute_latents(cfg_for("latents.dtype=bfloat16"), str(corpus), run)
    ds, _ = LT.read_latents(run, "train")
    blocks = LT.latent_blocks(ds, m, L=8).take_all()
    assert blocks and all(b["tokens"].shape == (8, 4) and b["mu"].shape == (8, 16) for b in blocks)
    assert blocks[0]["mu"].dtype == np.float32
    # every block is 8 consecutive chunks of the stream (blocks may arrive in any order)
    tables = read_rows(run, m, "train")
    stream = np.concatenate([LT.column_matrix(t, "tokens") for t in tables])
    mus = torch.cat([LT.decode_floats(LT.column_matrix(t, "mu"), "bfloat16") for t in tables]).numpy()
    for b in blocks:
        starts = [i for i in range(len(stream) - 7) if np.array_equal(stream[i : i + 8], b["tokens"])]
        assert starts, "a block is not a run of consecutive chunks"
        np.testing.assert_array_equal(mus[starts[0] : starts[0] + 8], b["mu"])
    assert len(blocks) * 8 > len(stream) - 8 * len(tables)  # at most L-1 rows dropped per batch

    # stage 2's validation blocks are the first ones in file order, every time (runs compare on them)
    from pipelines.train.stage2 import held_out_blocks

    val, label = held_out_blocks(run, m, m["identity"], 8, 8 * 3)
    split = "val" if label == "held-out" else "train"
    first = np.concatenate([LT.column_matrix(t, "tokens") for t in read_rows(run, m, split)])[:8]
    np.testing.assert_array_equal(val["tokens"][0], first)
    again, _ = held_out_blocks(run, m, m["identity"], 8, 8 * 3)
    np.testing.assert_array_equal(again["tokens"], val["tokens"])
    # at least one block per worker, whatever max_chunks asks (with fewer, some rank would have none
    # and its validation nothing to sum); the training split stands in when the held-out one is short
    two, _ = held_out_blocks(run, m, m["identity"], 8, 8, workers=2)
    assert len(two["tokens"]) == 2
    many = m["metrics"]["rows_per_split"]["val"] // 8 + 1
    more, label = held_out_blocks(run, m, m["identity"], 8, 8, workers=many)
    assert len(more["tokens"]) >= many and label == "training-block"
    with pytest.raises(DataError, match="fewer than the 1000000 workers"):
        held_out_blocks(run, m, m["identity"], 8, 8, workers=10**6)
    # read lazily in record batches that cut blocks (5 rows, L = 8) from every file of the training
    # split: the first blocks of each file's run of consecutive chunks, in file order
    want = [(LT.column_matrix(t, "tokens")[i : i + 8], mus_t[i : i + 8])
            for t, mus_t in zip(tables, np.split(mus, np.cumsum([t.num_rows for t in tables])[:-1]))
            for i in range(0, t.num_rows - 7, 8)]
    got = LT.first_blocks(run, "train", 8, len(want) + 5, expected=m["identity"], manifest=m, batch_rows=5)
    assert len(got) == len(want)
    for g, (tok_w, mu_w) in zip(got, want):
        np.testing.assert_array_equal(g["tokens"], tok_w)
        np.testing.assert_array_equal(g["mu"], mu_w)
    assert [b["key"] for b in LT.first_blocks(run, "train", 8, 2, manifest=m, batch_rows=5)] == [b["key"] for b in got[:2]]


def test_empty_corpus_and_missing_ae(ray_session, tmp_path, setup):
    run, model, tok, corpus = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(DataError, match="no usable documents"):
        precompute_latents(cfg_for(), str(empty), run)
    with pytest.raises(ArtifactError, match="does not exist"):
        precompute_latents(cfg_for(), str(corpus), RunDir(str(tmp_path / "no_run")))
    with pytest.raises(ArtifactError, match="does not exist"):
        LT.read_latents(RunDir(str(tmp_path / "no_run")), "train")


def _official_latent_layout(files: list, cfg, tok, S: int, G: int) -> dict:
    """The packed layout of a corpus as the official code cuts it, group by group (the reference the
    precompute must equal), with this project's groups: documents of one file, split and shard, at
    most G of them -> {split: (first-token doc_ids, positions, tokens [N, K])}."""
    import pyarrow.fs as pafs

    from pipelines.data.ingest import parse_options
    from pipelines.data.parsers import parse_files
    from test_tokenizer_chunking import official_group_texts

    out = {}
    for split in LT.SPLITS:
        ids, pos, tokens, index, groups = [], [], [], 0, []
        for f in files:  # a file's documents of the split, in order; a group never spans two files or shards
            t = parse_files({"bytes": [f.read_bytes()], "path": [str(f)]},
                            parse_options(str(f), cfg.data, pafs.LocalFileSystem(), "text")).to_pylist()
            rows = [r for r in t if r["status"] == "ok" and r["split"] == split]
            for i, r in enumerate(rows):
                if i == 0 or index % S == 0 or len(groups[-1]) == G:
                    groups.append([])
                groups[-1].append((r["doc_id"], r["text"]))
                index += 1
        for g in groups:
            lengths = np.cumsum([0] + [len(tok.encode(t)) + 1 for _, t in g])
            for p, chunk in enumerate(official_group_texts([t for _, t in g], tok, 4)):
                ids.append(g[int(np.searchsorted(lengths, p * 4, side="right") - 1)][0])
                pos.append(p)
                tokens.append(chunk)
        out[split] = (ids, pos, np.asarray(tokens, dtype=np.int32).reshape(-1, 4))
    return out


def test_packed_latents_are_the_official_cut_and_a_killed_run_gives_the_same_rows(ray_session, tmp_path,
                                                                                   tiny_corpus_text, make_ae, capsys):
    """data.layout=packed over three files (one holding a single one-word document: a group with no
    chunk): every row is the official group_texts cut of its group, in corpus order; a run that
    died between shards, rerun, gives the same rows; stage 2 on the document layout refuses them."""
    from pipelines.train.stage2 import run_stage2

    run = RunDir(str(tmp_path / "run"))
    _, tok = make_ae(tmp_path / "run" / "ae", tiny_corpus_text)
    docs = [d for d in tiny_corpus_text.split("<|endoftext|>") if d.strip()]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n<|endoftext|>\n".join(docs[:25]))
    (corpus / "b.txt").write_text("\n<|endoftext|>\n".join(docs[25:]))
    (corpus / "c.txt").write_text("Cat")
    cfg = cfg_for("data.layout=packed", "data.pack_documents=3", "latents.shard_documents=7")
    clean = precompute_latents(cfg, str(corpus), run)
    assert clean["identity"]["layout"] == "packed" and clean["identity"]["pack_documents"] == 3
    want = _official_latent_layout(sorted(corpus.iterdir()), cfg, tok, 7, 3)
    rows = latent_rows(run, clean)
    for split in LT.SPLITS:
        keys, tokens = rows[split][0], rows[split][1]
        assert [k[0] for k in keys] == want[split][0] and [k[1] for k in keys] == want[split][1], split
        np.testing.assert_array_equal(tokens, want[split][2])
        assert tok.eot_id not in tokens and tok.pad_id not in tokens
    records = [json.loads(p.read_text()) for p in (run.local_root / "latents").glob("*/shard-*.json")]
    assert sum(r.get("empty_groups", 0) for r in records) == 1  # c.txt's document: BOS + 1 token < K

    root = run.local_root / "latents"  # died after train shards 0-1, while writing shard 2
    (root / "manifest.json").unlink()
    for rec in sorted((root / "train").glob("shard-*.json"))[2:] + list((root / "val").glob("shard-*.json")):
        rec.unlink()
    part = sorted((root / "train" / "shard-00002").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    again = precompute_latents(cfg, str(corpus), run)
    assert again["metrics"]["shards_kept"] == 2
    assert_same_latent_rows(latent_rows(run, again), rows)

    with pytest.raises(ArtifactError, match="latents of the packed layout and this calm run trains on the document"):
        run_stage2(load_config("debug"), run, "calm")  # the AE's layout (auto): document
