"""Offline latent precomputation (Ray Data actor pool -> Parquet) and the reader stage 2 uses.

The AE artifact is a randomly initialised tiny autoencoder written by the project's artifact writer
(conftest ``make_ae``: what matters here is that the stored values are exactly what the encoder
computes), so no Ray Train run is needed.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_same_latent_rows, latent_rows

from calm_core.artifacts import load_ae
from calm_core.config import load_config
from calm_core.errors import ArtifactError, DataError
from pipelines.data import latents as LT
from pipelines.data.precompute import precompute_latents
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
    docs = ["a", "b", "c"]
    ids, pos = ["a", "a", "b", "c", "c"], np.array([0, 1, 0, 0, 1])
    np.testing.assert_array_equal(LT.corpus_order(ids, pos, docs), np.arange(5))
    # two encoder batches swapped: [c0 c1] came before [a0 a1 b0]
    np.testing.assert_array_equal(LT.corpus_order(["c", "c", "a", "a", "b"], np.array([0, 1, 0, 1, 0]), docs),
                                  [2, 3, 4, 0, 1])
    # a document that appears twice takes its rows in turn
    np.testing.assert_array_equal(LT.corpus_order(["b", "a", "a"], np.array([0, 0, 0]), ["a", "b", "a"]), [1, 0, 2])
    with pytest.raises(ArtifactError, match="chunk 0 of document b is missing"):
        LT.corpus_order(["a", "b"], np.array([0, 1]), docs)
    with pytest.raises(ArtifactError, match="1 rows written belong to no document"):
        LT.corpus_order(["a", "z"], np.array([0, 0]), docs)


def test_rows_written_out_of_order_are_put_in_corpus_order_before_the_commit(ray_session, setup, monkeypatch,
                                                                              capsys):
    from pipelines.data import precompute as P

    run, model, tok, corpus = setup
    clean = precompute_latents(cfg_for(), str(corpus), run)
    want = latent_rows(run, clean)
    real = P._encode_and_write

    def batches_permuted(run_, split, shard, *args):  # as Ray Data did in the full suite: encoder batches permuted
        rec = real(run_, split, shard, *args)
        if split == "train" and shard == 1:
            path = run_.path(LT.ARTIFACT, rec["parts"][0]["path"])
            t = pq.read_table(path)
            t = pa.concat_tables([t.slice(64), t.slice(0, 64)])
            pq.write_table(t, path, **LT.PARQUET_OPTIONS)
        return rec

    monkeypatch.setattr(P, "_encode_and_write", batches_permuted)
    again = precompute_latents(cfg_for(), str(corpus), run, overwrite=True)
    assert "train shard 1: Ray Data wrote its rows out of corpus order" in capsys.readouterr().out
    assert_same_latent_rows(latent_rows(run, again), want)
    LT.read_latents(run, "train")  # the commit record's sizes and hashes are those of the files now there


def test_crash_between_parts_then_rerun_gives_the_clean_rows(ray_session, setup, capsys):
    run, model, tok, corpus = setup
    cfg = cfg_for()
    clean = precompute_latents(cfg, str(corpus), run)
    clean_rows = latent_rows(run, clean)
    root = run.local_root / "latents"

    # a crash after shard 0 of train was committed and while shard 1 was being written:
    (root / "manifest.json").unlink()
    for rec in ("train/shard-00001.json", "train/shard-00002.json", "val/shard-00000.json"):
        (root / rec).unlink(missing_ok=True)
    part = sorted((root / "train" / "shard-00001").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # half-written file
    (root / "train" / "shard-00001" / "part-999999.parquet").write_bytes(b"junk from a dead writer")

    again = precompute_latents(cfg, str(corpus), run)
    assert "1 shard(s) were already committed" in capsys.readouterr().out
    assert again["metrics"]["rows"] == clean["metrics"]["rows"]
    assert_same_latent_rows(latent_rows(run, again), clean_rows)
    assert not (root / "train" / "shard-00001" / "part-999999.parquet").exists()

    # a rerun on the complete output does nothing and says so
    third = precompute_latents(cfg, str(corpus), run)
    assert "nothing to do" in capsys.readouterr().out
    assert third["parts"] == again["parts"]


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
