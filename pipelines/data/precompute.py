"""Offline latent precomputation: the frozen encoder over every K-token chunk, into Parquet, once.

Ray Data reads the corpus (``pipelines.data.ingest``), tokenises and chunks it with the AE's own tokenizer
(``pipelines.data.chunks``, the code stage 1 uses), runs the frozen encoder in an actor pool
(``latents.num_actors`` actors, ``latents.cpus_per_actor`` CPUs or one GPU each) and writes Parquet
with ``Dataset.write_parquet`` and the explicit schema of ``pipelines.data.latents``.

Exactly once. Each split's documents are cut into shards of ``latents.shard_documents`` documents
(by position in the corpus order, so the cut is the same on every run). A shard is written into
its own folder and then committed by an atomic JSON record (files, rows, bytes, sha256); the final
manifest lists the committed parts and is written last. A rerun checks the identity of the output
(AE, tokenizer, K, dtype, corpus, sharding), skips committed shards, deletes whatever an interrupted
shard left behind and writes it again; so a job killed at any point and run again ends with every
chunk exactly once. A complete output is left alone. Different inputs are refused unless
``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from calm_core.artifacts import AEArtifact, load_ae
from calm_core.checkpoint import code_version
from calm_core.config import Config
from pipelines.claim import Spot, claim
from pipelines.data import latents as LT
from pipelines.progress import progress
from pipelines.storage import RunDir


class EncodeChunks:
    """Ray Data actor: {"doc_id", "position", "tokens"[K]} -> a table of the latents schema.

    The AE arrives as bytes (config, tokenizer, safetensors), so actors on any node build it without
    a shared filesystem."""

    def __init__(self, ae_blob: dict[str, Any], dtype: str, use_gpu: bool, threads: int, schema_meta: dict):
        from safetensors.torch import load as load_safetensors

        from calm_core.autoencoder import ChunkAutoencoder
        from calm_core.config import config_from_yaml

        torch.set_num_threads(max(1, threads))
        cfg = config_from_yaml(ae_blob["config_yaml"])
        self.model = ChunkAutoencoder(cfg.ae, ae_blob["vocab_size"], ae_blob["mask_id"], ae_blob["pad_id"])
        self.model.load_state_dict(load_safetensors(ae_blob["weights"]))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.dtype = dtype
        self.schema = LT.latents_schema(cfg.ae.K, cfg.ae.latent_dim, dtype, schema_meta)

    def __call__(self, batch: dict[str, np.ndarray]):
        tokens = np.asarray(batch["tokens"])  # [B, K]
        with torch.inference_mode():
            mu, log_sigma = self.model.encode(torch.from_numpy(tokens.astype(np.int64)).to(self.device))  # [B, l]
        return LT.to_table(batch["doc_id"], batch["position"], tokens, mu, log_sigma, self.schema, self.dtype)


def _ordered_names():
    from ray.data.datasource import FilenameProvider

    class Ordered(FilenameProvider):
        """part-<task index>.parquet: write task i holds the i-th block in stream order."""

        def __init__(self):
            super().__init__(file_format="parquet")

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06d}.parquet"

    return Ordered()


def _part_order(name: str) -> tuple[int, int]:
    stem = name.removesuffix(".parquet").removeprefix("part-")  # "000003" or "000003-0"
    task, _, i = stem.partition("-")
    return int(task), int(i or 0)


def _ae_blob(ae: AEArtifact) -> dict[str, Any]:
    return {"config_yaml": (ae.path / "config.yaml").read_text(), "weights": (ae.path / "model.safetensors").read_bytes(),
            "vocab_size": ae.tok.vocab_size, "mask_id": ae.tok.mask_id, "pad_id": ae.tok.pad_id}


def _identity(cfg: Config, ae_ident: dict, stats, corpus: str) -> dict[str, Any]:
    d = cfg.data
    return {**ae_ident, "dtype": cfg.latents.dtype, "shard_documents": cfg.latents.shard_documents,
            "corpus_documents": stats.documents, "corpus_characters": stats.characters,
            "data": {"format": d.format, "separator": d.separator, "eot_marker": d.eot_marker,
                     "text_field": d.text_field, "val_fraction": d.val_fraction, "split_salt": d.split_salt,
                     "max_documents": d.max_documents}}


def _committed(run: RunDir, split: str, shard: int) -> dict[str, Any] | None:
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


def _write_shard(run: RunDir, split: str, shard: int, docs, tok, cfg: Config, blob: dict, meta: dict) -> dict:
    """Encode and write one shard, check that its rows are in corpus order, commit it.

    Ray Data's ``preserve_order`` is set, yet in full test-suite runs whole encoder batches of a
    shard came out permuted now and then (never reproduced alone). So the rows' (doc_id, position)
    are read back and matched against the shard's documents; rows out of order are put in order
    on the driver (``LT.corpus_order``) and the shard's part files written again with the same cut
    before the commit record is written."""
    want_docs = [d for b in docs.select_columns(["doc_id"]).iter_batches(batch_format="pyarrow")
                 for d in b.column("doc_id").to_pylist()]
    rec = _encode_and_write(run, split, shard, docs, tok, cfg, blob, meta)
    paths = [run.path(LT.ARTIFACT, p["path"]) for p in rec["parts"]]
    keys = [_read(run, path, ["doc_id", "position"]) for path in paths]
    ids = [d for t in keys for d in t.column("doc_id").to_pylist()]
    pos = np.concatenate([t.column("position").to_numpy() for t in keys]) if keys else np.zeros(0, np.int32)
    perm = LT.corpus_order(ids, pos, want_docs)
    if not np.array_equal(perm, np.arange(len(perm))):
        first = int(np.argmax(perm != np.arange(len(perm))))
        progress(f"[latents] {split} shard {shard}: Ray Data wrote its rows out of corpus order (row {first} holds "
                 f"chunk {pos[first]} of document {ids[first][:12]}); putting them in order")
        table = pa.concat_tables([_read(run, path) for path in paths]).take(perm)
        for path, part in zip(paths, rec["parts"]):
            piece, table = table.slice(0, part["rows"]), table.slice(part["rows"])
            with run.fs.open_output_stream(path) as f:
                pq.write_table(piece, f, **LT.PARQUET_OPTIONS)
            part["bytes"] = run.fs.get_file_info(path).size
            part["sha256"] = LT.sha256_of(run, path)
    run.write_text(json.dumps(rec, indent=1), LT.ARTIFACT, split, f"shard-{shard:05d}.json")  # the commit
    return rec


def _read(run: RunDir, path: str, columns: list[str] | None = None) -> pa.Table:
    with run.fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def _encode_and_write(run: RunDir, split: str, shard: int, docs, tok, cfg: Config, blob: dict, meta: dict) -> dict:
    """Ray Data encodes and writes the shard's part files -> its commit record (not yet written)."""
    import ray.data

    from pipelines.data.chunks import chunk_dataset

    lc = cfg.latents
    folder = (LT.ARTIFACT, split, f"shard-{shard:05d}")
    run.delete(*folder)  # whatever an interrupted attempt left
    schema = LT.latents_schema(cfg.ae.K, cfg.ae.latent_dim, lc.dtype, {**meta, "split": split, "shard": shard})
    chunks = chunk_dataset(docs, tok, cfg.ae.K, cfg.data.read_cpus)
    encoded = chunks.map_batches(
        EncodeChunks,
        fn_constructor_kwargs={"ae_blob": blob, "dtype": lc.dtype, "use_gpu": lc.use_gpu,
                               "threads": int(lc.cpus_per_actor),
                               "schema_meta": {**meta, "split": split, "shard": shard}},
        batch_size=lc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=lc.num_actors),
        num_cpus=lc.cpus_per_actor,
        num_gpus=1 if lc.use_gpu else 0,
    )
    # write task i = the i-th block in corpus order (the ingest sets the flag already: derived
    # datasets share its context; said again here where the order matters). Ray Data still
    # permuted encoder batches now and then in the full test suite: _write_shard checks and repairs
    encoded.context.execution_options.preserve_order = True
    encoded.write_parquet(run.path(*folder), filesystem=run.fs, filename_provider=_ordered_names(),
                          schema=schema, ray_remote_args={"num_cpus": cfg.data.read_cpus},
                          mode=ray.data.SaveMode.OVERWRITE, min_rows_per_file=16384, **LT.PARQUET_OPTIONS)
    parts = []
    for name, size in sorted(run.list_files(*folder), key=lambda x: _part_order(x[0])):
        path = run.path(*folder, name)
        with run.fs.open_input_file(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        parts.append({"path": f"{split}/shard-{shard:05d}/{name}", "rows": rows, "bytes": size,
                      "sha256": LT.sha256_of(run, path)})
    return {"split": split, "shard": shard, "parts": parts, "rows": sum(p["rows"] for p in parts)}


def _encode_split(run: RunDir, split: str, docs, n_docs: int, cfg: Config, ae: AEArtifact, blob: dict,
                  meta: dict) -> tuple[list[dict], int, int, int]:
    """Encode one split shard by shard, keeping committed shards: (parts, rows, rows written, shards kept)."""
    lc = cfg.latents
    n_shards = math.ceil(n_docs / lc.shard_documents) if n_docs else 0
    parts, rows, written, kept = [], 0, 0, 0
    if n_shards == 0:
        return parts, rows, written, kept
    docs = docs.materialize()
    cuts = [lc.shard_documents * i for i in range(1, n_shards)]
    for shard, piece in enumerate(docs.split_at_indices(cuts) if cuts else [docs]):
        rec = _committed(run, split, shard)
        if rec is not None:
            kept += 1
        else:
            t_shard = time.perf_counter()
            rec = _write_shard(run, split, shard, piece, ae.tok, cfg, blob, meta)
            dt = time.perf_counter() - t_shard
            written += rec["rows"]
            mb = sum(p["bytes"] for p in rec["parts"]) / 2**20
            progress(f"[latents] {split} shard {shard + 1}/{n_shards}: {rec['rows']:,} chunks, "
                     f"{rec['rows'] * cfg.ae.K / dt:,.0f} tokens/s, {mb:.1f} MiB in {dt:.1f}s")
        parts += rec["parts"]
        rows += rec["rows"]
    return parts, rows, written, kept


def latents_spot(run: RunDir) -> Spot:
    return Spot(run, LT.ARTIFACT, record=(LT.ARTIFACT, "_identity.json"), work=((LT.ARTIFACT,),), label="latents",
                what="latents", remedy="pass --overwrite to replace them, or use another --run")


def precompute_latents(cfg: Config, corpus: str, run: RunDir, ae_path: str | None = None,
                       overwrite: bool = False, replace_stale: bool = False,
                       splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    """Make (or finish, or leave alone if complete) RUN/latents; returns its manifest.

    Latents of another setup are refused unless ``overwrite``; ``replace_stale`` (the chained
    ``run_all`` job) replaces them with a message instead, since there they are stale outputs of
    the same run's earlier AE. ``splits`` ("val" alone: the evaluation of held-out documents)
    leaves the others out (recorded in the identity)."""
    from pipelines.data.ingest import load_corpus

    t0 = time.perf_counter()
    ae = load_ae(Path(ae_path) if ae_path else run.local_artifact("ae"))  # verifies the AE's files
    cfg = dataclasses.replace(cfg, ae=ae.cfg.ae)  # the chunking and the model come from the AE
    spot = latents_spot(run)
    if overwrite:
        spot.discard()
    train_docs, val_docs, stats = load_corpus(corpus, cfg.data)
    progress(f"[corpus] {stats.summary()}")
    ident = _identity(cfg, ae.identity, stats, corpus)
    if tuple(splits) != ("train", "val"):
        ident["splits"] = list(splits)
    done = claim(spot, ident, lambda m: f"{m['metrics']['rows']:,} rows" if m.get("identity") == ident else None,
                 replace_stale=replace_stale, hint="--overwrite recomputes")
    if done is not None:
        return done
    lc = cfg.latents
    meta = {k: ident[k] for k in ("ae_sha256", "tokenizer_sha256", "K", "latent_dim", "dtype")}
    blob = _ae_blob(ae)
    progress(f"[latents] encoder: {lc.num_actors} actor(s) x "
             f"{'1 GPU' if lc.use_gpu else f'{lc.cpus_per_actor} CPU'}, batch {lc.batch_size}, dtype {lc.dtype}, "
             f"K={cfg.ae.K}, l={cfg.ae.latent_dim}")
    parts, rows, written, kept = {}, {}, 0, 0
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if split not in splits:
            continue
        parts[split], rows[split], w, k = _encode_split(run, split, docs, stats.documents.get(split, 0), cfg, ae,
                                                        blob, meta)
        written, kept = written + w, kept + k
    if kept:
        progress(f"[latents] {kept} shard(s) were already committed by an earlier run and were kept")
    return _finish(run, cfg, ae, ident, corpus, stats, parts, rows, written, time.perf_counter() - t0)


def _finish(run: RunDir, cfg: Config, ae: AEArtifact, ident: dict, corpus: str, stats, parts: dict, rows: dict,
            written_rows: int, dt: float) -> dict[str, Any]:
    """Write config.yaml and, last, the manifest that marks RUN/latents complete."""
    total = sum(rows.values())
    nbytes = sum(p["bytes"] for ps in parts.values() for p in ps)
    manifest = {
        "artifact": "latents",
        "identity": ident,
        "inputs": {"ae": str(ae.path), "ae_sha256": ae.sha256, "tokenizer_sha256": ae.tok.sha256,
                   "corpus": {"spec": corpus, **stats.to_dict()}},
        "schema": str(LT.latents_schema(cfg.ae.K, cfg.ae.latent_dim, cfg.latents.dtype)),
        "parts": parts,
        "metrics": {"rows": total, "rows_per_split": rows, "tokens": total * cfg.ae.K, "bytes": nbytes,
                    "bytes_per_token": nbytes / max(1, total * cfg.ae.K), "wall_s": dt,
                    "rows_written_this_run": written_rows},
        "config": cfg.to_dict(),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    run.write_text(cfg.to_yaml(), LT.ARTIFACT, "config.yaml")
    run.write_text(json.dumps(manifest, indent=1), LT.ARTIFACT, "manifest.json")  # last: marks completion
    progress(f"[latents] wrote {run.uri(LT.ARTIFACT)}: {total:,} chunks ({rows.get('train', 0):,} train / "
             f"{rows.get('val', 0):,} val), {nbytes / 2**20:.1f} MiB, {nbytes / max(1, total * cfg.ae.K):.1f} "
             f"bytes/token, {written_rows * cfg.ae.K / dt:,.0f} tokens/s overall in {dt:.1f}s")
    return manifest
