"""Offline latent precomputation: the frozen encoder over every K-token chunk, into Parquet, once.

Two passes (docs/LATENTS.md "The pipeline"). The corpus is counted first
(``pipelines.data.ingest.scan_corpus``: documents per split and per file, nothing kept), which
fixes where every document lands: its index in its split (corpus order: files sorted, records in
file order) and its shard, index // ``latents.shard_documents``. Then one Ray Data execution for
the whole job: read -> ``ShardDocuments`` (tasks: parse a file, tag each document, drop those of
committed shards; ``pipelines.data.shards``) -> ``TokenizeChunk`` (tasks) -> ``EncodeChunks`` (one
actor pool for the job; ``pipelines.data.encoder``) -> the driver's ``ShardWriter``
(``pipelines.data.shards``), which writes part files with pyarrow and commits each shard once all
its documents' chunks are in. The speed does not depend on the number of shards, and memory is
bounded by the streaming, not by the corpus.

Exactly once. A shard is committed by an atomic JSON record (files, rows, bytes, sha256) written
after its rows were checked to be exactly its documents' chunks in corpus order; the final
manifest lists the committed parts and is written last. A rerun checks the identity of the output
(AE, tokenizer, K, dtype, corpus, sharding), keeps committed shards and drops their documents at
the read, deletes whatever an interrupted shard left behind and writes it again; so a job killed
at any point and run again ends with every chunk exactly once. A complete output is left alone.
Different inputs are refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from calm_core.artifacts import AEArtifact, load_ae
from calm_core.checkpoint import code_version
from calm_core.chunking import layout_of
from calm_core.config import Config
from calm_core.errors import ArtifactError
from pipelines.claim import Spot, claim
from pipelines.data import latents as LT
from pipelines.data.chunks import check_layout
from pipelines.data.encoder import AESource, EncodeChunks, actor_memory_bytes
from pipelines.data.packing import Packing
from pipelines.data.shards import ShardDocuments, ShardWriter, committed, offsets, shard_units
from pipelines.progress import progress
from pipelines.storage import RunDir

BLOCK_BYTES = 8 * 2**20  # Ray Data's target block size in this job (see _encode)


def _params(ae: AEArtifact) -> int:
    return sum(p.numel() for p in ae.model.parameters())


def _identity(cfg: Config, ae_ident: dict, stats, corpus: str) -> dict[str, Any]:
    d = cfg.data
    # (the layout only when packed: the identities of latents made before the setting existed stay the same)
    packed = {"layout": "packed", "pack_documents": d.pack_documents} if d.layout == "packed" else {}
    return {**ae_ident, **packed, "dtype": cfg.latents.dtype, "shard_documents": cfg.latents.shard_documents,
            "corpus_documents": stats.documents, "corpus_characters": stats.characters,
            "data": {"format": d.format, "separator": d.separator, "eot_marker": d.eot_marker,
                     "text_field": d.text_field, "val_fraction": d.val_fraction, "split_salt": d.split_salt,
                     "max_documents": d.max_documents}}


def _encode(run: RunDir, scan, splits: tuple[str, ...], todo: dict[str, set[int]], skip: dict[str, set[int]],
            cfg: Config, ae: AEArtifact, meta: dict, memory: int) -> ShardWriter:
    """One Ray Data execution for every shard still to write: read -> documents with their shard
    (tasks) -> tokenise + chunk (tasks) -> encode (one actor pool for the job) -> the driver's
    ShardWriter, which writes and commits shards as they complete."""
    import ray
    import ray.data

    from pipelines.data.chunks import chunk_dataset

    lc, rc = cfg.latents, cfg.data.read_cpus
    packing = Packing(ae.tok.to_str(), cfg.ae.K, cfg.data.pack_documents) if cfg.data.layout == "packed" else None
    units = shard_units(scan, splits, lc.shard_documents, packing.group if packing else None)
    writer = ShardWriter(run, cfg.ae.K, cfg.ae.latent_dim, lc.dtype, meta, units)
    if not any(todo.values()):
        return writer
    blob = {"config_yaml": (ae.path / "config.yaml").read_text(), "weights": (ae.path / "model.safetensors").read_bytes()}
    source = AESource(str(ae.path.resolve()), ae.sha256, ae.tok.vocab_size, ae.tok.mask_id, ae.tok.pad_id,
                      [ray.put(blob)])
    del blob
    raw = ray.data.read_binary_files(scan.files, filesystem=scan.fs, include_paths=True, num_cpus=rc)
    raw.context.execution_options.preserve_order = True  # rows reach the driver in corpus order (checked anyway)
    # blocks of 8 MiB, not Ray Data's 128: with the default the encoder actor buffered ~117k rows per
    # output block (Ray Data measured its peak at 2.5-4.0 GiB on the demo corpus, and the driver got
    # its first rows after 60 s); at 8 MiB the peak stays under 1.25 x 720 MiB and rows flow every ~1 s
    raw.context.target_max_block_size = BLOCK_BYTES
    docs = raw.map_batches(ShardDocuments(scan.options, offsets(scan, splits), lc.shard_documents, skip, packing),
                           batch_size=1, batch_format="numpy", num_cpus=rc)
    # packed: the read tasks cut the chunks themselves (a group's documents are all in one file)
    chunks = docs if packing else chunk_dataset(docs, ae.tok, cfg.ae.K, rc, carry=("split", "shard", "doc_index"),
                                                last=True)
    encoded = chunks.map_batches(
        EncodeChunks,
        fn_constructor_kwargs={"source": source, "dtype": lc.dtype, "use_gpu": lc.use_gpu,
                               "threads": int(lc.cpus_per_actor)},
        batch_size=lc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=lc.num_actors),
        num_cpus=lc.cpus_per_actor,
        num_gpus=1 if lc.use_gpu else 0,
        memory=memory,
    )
    t0, said = time.perf_counter(), time.perf_counter()
    total = sum(len(v) for v in todo.values())
    for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        before = len(writer.records)
        writer.add(batch)
        now = time.perf_counter()
        if len(writer.records) > before and (now - said > 10 or len(writer.records) == total):
            said = now
            progress(f"[latents] {len(writer.records)}/{total} shards committed, {writer.rows_written:,} chunks, "
                     f"{writer.rows_written * cfg.ae.K / (now - t0):,.0f} tokens/s")
    writer.finish()
    return writer


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
    from pipelines.data.ingest import scan_corpus

    t0 = time.perf_counter()
    ae = load_ae(Path(ae_path) if ae_path else run.local_artifact("ae"))  # verifies the AE's files
    # the chunking and the model come from the AE; the layout too unless data.layout names one
    layout = layout_of(ae.cfg.data.layout) if cfg.data.layout == "auto" else cfg.data.layout
    cfg = dataclasses.replace(cfg, ae=ae.cfg.ae, data=dataclasses.replace(cfg.data, layout=layout))
    check_layout(ae.tok, layout)
    spot = latents_spot(run)
    if overwrite:
        spot.discard()
    scan = scan_corpus(corpus, cfg.data)
    stats, t_scan = scan.stats, time.perf_counter() - t0
    progress(f"[corpus] {stats.summary()} (counted in {t_scan:.1f}s)")
    ident = _identity(cfg, ae.identity, stats, corpus)
    if tuple(splits) != ("train", "val"):
        ident["splits"] = list(splits)
    done = claim(spot, ident, lambda m: f"{m['metrics']['rows']:,} rows" if m.get("identity") == ident else None,
                 replace_stale=replace_stale, hint="--overwrite recomputes")
    if done is not None:
        return done
    lc = cfg.latents
    meta = {k: ident[k] for k in ("ae_sha256", "tokenizer_sha256", "K", "latent_dim", "dtype")}
    memory = actor_memory_bytes(cfg, _params(ae))
    progress(f"[latents] encoder: {lc.num_actors} actor(s) x "
             f"{'1 GPU' if lc.use_gpu else f'{lc.cpus_per_actor} CPU'} and {memory / 2**20:,.0f} MiB, batch "
             f"{lc.batch_size}, dtype {lc.dtype}, K={cfg.ae.K}, l={cfg.ae.latent_dim}, {layout} layout")
    splits = tuple(s for s in LT.SPLITS if s in splits)
    n_shards = {s: math.ceil(scan.stats.documents.get(s, 0) / lc.shard_documents) for s in splits}
    kept = {(s, i): rec for s in splits for i in range(n_shards[s]) if (rec := committed(run, s, i)) is not None}
    skip = {s: {i for (t, i) in kept if t == s} for s in splits}
    todo = {s: set(range(n_shards[s])) - skip[s] for s in splits}
    if kept:
        progress(f"[latents] {len(kept)} shard(s) were already committed by an earlier run and were kept")
    t1 = time.perf_counter()
    writer = _encode(run, scan, splits, todo, skip, cfg, ae, meta, memory)
    t_stream = time.perf_counter() - t1
    records = {**kept, **writer.records}
    missing = [k for k in ((s, i) for s in splits for i in range(n_shards[s])) if k not in records]
    if missing:
        raise ArtifactError(f"latents: {len(missing)} shard(s) were never written ({missing[0][0]} shard "
                            f"{missing[0][1]}, ...); rerun to write them")
    parts = {s: [p for i in range(n_shards[s]) for p in records[s, i]["parts"]] for s in splits}
    rows = {s: sum(records[s, i]["rows"] for i in range(n_shards[s])) for s in splits}
    extra = {"encoder_actors": len(writer.encoders), "shards_kept": len(kept), "count_s": t_scan,
             "stream_s": t_stream, "actor_memory_bytes": memory}
    return _finish(run, cfg, ae, ident, corpus, stats, parts, rows, writer.rows_written,
                   time.perf_counter() - t0, extra)


def _finish(run: RunDir, cfg: Config, ae: AEArtifact, ident: dict, corpus: str, stats, parts: dict, rows: dict,
            written_rows: int, dt: float, extra: dict | None = None) -> dict[str, Any]:
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
                    "rows_written_this_run": written_rows, **(extra or {})},
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
