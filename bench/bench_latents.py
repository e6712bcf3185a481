#!/usr/bin/env python
"""Latent precomputation benchmark: where the time goes, and whether the shard size costs anything.

    python bench/bench_latents.py --ae /tmp/demo-token/ae --config demo \
        --shard-documents 20000 2000 500 --out bench/results/latents_shakespeare.json   # the default corpus

1. Stages, one process and one thread each (so tokens/s per CPU core), on the corpus's first
   ``--stage-chunks`` chunks: read (files -> documents: ``parsers.parse_files``), tokenise + chunk
   (``chunks.TokenizeChunk``), encode (``precompute.EncodeChunks``, ``latents.batch_size`` chunks per
   call), write (the driver's ``ShardWriter``: Arrow table -> Parquet with the project's encodings
   -> sha256).
2. The job (``precompute_latents``, a fresh run directory each time, one Ray started once): for each
   ``--shard-documents`` value with 1 encoder actor, then 2 actors, then bfloat16; tokens/s over the
   whole job and per CPU of the cluster, its counting pass and its streaming pass apart.
3. Fixed costs: the job over a one-document corpus (what any job pays: the counting pass, Ray Data
   start-up, the actor pool starting and loading the AE), and per shard: the slope of the wall
   time against the number of shards across the ``--shard-documents`` runs.

Prints a table and writes the figures as JSON (``--out``). ``--skip-stages`` / ``--skip-actors`` /
``--skip-dtype`` leave parts out (a long corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.ray_env import ray_environment  # noqa: E402

ray_environment()  # the environment every job sets, before anything imports ray
import numpy as np  # noqa: E402
import torch  # noqa: E402

from calm_core.artifacts import load_ae  # noqa: E402
from calm_core.config import load_config  # noqa: E402
from pipelines.data.files import default_corpus  # noqa: E402


def stage_costs(ae_dir: Path, corpus: str, cfg, max_chunks: int) -> dict:
    """Seconds and tokens/s of each stage alone, one thread, on the first ``max_chunks`` chunks."""
    import pyarrow as pa

    from pipelines.data.chunks import TokenizeChunk
    from pipelines.data.files import resolve_corpus_files
    from pipelines.data.ingest import parse_options
    from pipelines.data.parsers import parse_files
    from pipelines.data.precompute import AESource, EncodeChunks, ShardWriter
    from pipelines.storage import RunDir

    torch.set_num_threads(1)
    ae = load_ae(ae_dir)
    K = ae.cfg.ae.K
    fs, files, fmt = resolve_corpus_files(corpus, cfg.data.format)
    opts = parse_options(corpus, cfg.data, fs, fmt)
    est_docs = None
    t = time.perf_counter()
    docs, chars = [], 0
    for f in files:  # read + parse, file by file, until the chunk budget is surely covered
        with fs.open_input_file(f) as fh:
            table = parse_files({"bytes": [fh.read()], "path": [f]}, opts)
        ok = table.filter(pa.compute.equal(table["status"], "ok"))
        docs += list(zip(ok["doc_id"].to_pylist(), ok["text"].to_pylist()))
        chars = sum(len(x[1]) for x in docs)
        if chars > max_chunks * K * 6:  # > 6 characters per token: more than enough text
            break
    read_s = time.perf_counter() - t
    est_docs = len(docs)

    tokenize = TokenizeChunk(ae.tok.to_str(), K, carry=("split", "shard", "doc_index"), last=True)
    tokenize({"doc_id": np.array(["x"]), "text": np.array(["warm"]), "split": np.array(["train"]),
              "shard": np.zeros(1, np.int32), "doc_index": np.zeros(1, np.int64)})  # builds the tokenizer
    t = time.perf_counter()
    pieces, n = [], 0
    for i in range(0, len(docs), 256):
        part = docs[i:i + 256]
        out = tokenize({"doc_id": np.array([d for d, _ in part], dtype=object),
                        "text": np.array([x for _, x in part], dtype=object),
                        "split": np.array(["train"] * len(part), dtype=object),
                        "shard": np.zeros(len(part), np.int32), "doc_index": np.arange(i, i + len(part))})
        pieces.append(out)
        n += len(out["position"])
        if n >= max_chunks:
            break
    tok_s = time.perf_counter() - t
    batch = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    ends = np.flatnonzero(batch["last"][:max_chunks])  # whole documents only: the writer commits them
    rows = int(ends[-1]) + 1 if len(ends) else len(batch["last"])
    batch = {k: v[:rows] for k, v in batch.items()}
    used_docs = int(batch["doc_index"][-1]) + 1  # the read's share: the characters that made these chunks
    read_s *= sum(len(x) for _, x in docs[:used_docs]) / max(1, chars)

    src = AESource(str(ae.path), ae.sha256, ae.tok.vocab_size, ae.tok.mask_id, ae.tok.pad_id, [])
    enc = EncodeChunks(src, cfg.latents.dtype, False, 1)
    bs = cfg.latents.batch_size
    t = time.perf_counter()
    tables = [enc({k: v[i:i + bs] for k, v in batch.items()}) for i in range(0, rows, bs)]
    enc_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        meta = {"ae_sha256": ae.sha256, "K": K}
        writer = ShardWriter(RunDir(tmp), K, ae.cfg.ae.latent_dim, cfg.latents.dtype, meta,
                             lambda split, shard: np.arange(used_docs))  # one shard of every document
        t = time.perf_counter()
        for tb in tables:
            writer.add(tb)
        write_s = time.perf_counter() - t
        nbytes = sum(p["bytes"] for r in writer.records.values() for p in r["parts"])
    tokens = rows * K
    return {"chunks": rows, "tokens": tokens, "documents": used_docs, "documents_read": est_docs,
            "seconds": {"read": read_s, "tokenize_chunk": tok_s, "encode": enc_s, "write": write_s},
            "tokens_per_s": {"read": tokens / read_s, "tokenize_chunk": tokens / tok_s, "encode": tokens / enc_s,
                             "write": tokens / write_s},
            "bytes_per_token": nbytes / tokens, "batch_size": bs}


def job(ae_dir: Path, corpus: str, config: str, overrides: list[str]) -> dict:
    from pipelines.data.precompute import precompute_latents
    from pipelines.storage import RunDir

    run_dir = Path(tempfile.mkdtemp(prefix="calm-bench-latents-"))
    try:
        cfg = load_config(config, overrides)
        t0 = time.perf_counter()
        m = precompute_latents(cfg, corpus, RunDir(str(run_dir)), ae_path=str(ae_dir))
        dt = time.perf_counter() - t0
        met = m["metrics"]
        shards = sum(len({p["path"].split("/")[1] for p in ps}) for ps in m["parts"].values())
        return {"overrides": overrides, "rows": met["rows"], "tokens": met["tokens"], "wall_s": dt,
                "tokens_per_s": met["tokens"] / dt, "count_s": met["count_s"], "stream_s": met["stream_s"],
                "stream_tokens_per_s": met["tokens"] / met["stream_s"], "shards": shards,
                "encoder_actors": met["encoder_actors"], "bytes": met["bytes"],
                "bytes_per_token": met["bytes_per_token"], "actor_memory_mib": met["actor_memory_bytes"] / 2**20}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def one_document(corpus: str, cfg, tmp: Path) -> str:
    """A corpus of the first document of ``corpus`` (the fixed cost of a job)."""
    from pipelines.data.files import resolve_corpus_files

    fs, files, _ = resolve_corpus_files(corpus, cfg.data.format)
    with fs.open_input_file(files[0]) as f:
        text = f.read(4000).decode("utf-8", "ignore")
    path = tmp / "one.txt"
    path.write_text(text.rsplit("\n", 1)[0] + "\n")
    return str(path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ae", required=True, help="a stage-1 AE artifact folder (RUN/ae)")
    ap.add_argument("--corpus", default=None, help="file, directory or glob (default: the project's default "
                    "corpus, the Shakespeare plays; docs/BENCHMARKS.md says which corpus each figure used)")
    ap.add_argument("--config", default="demo", help="the job's config (latents, data and ray sections)")
    ap.add_argument("--shard-documents", type=int, nargs="+", default=[20000, 2000, 500])
    ap.add_argument("--stage-chunks", type=int, default=100000, help="chunks for the one-thread stage costs")
    ap.add_argument("--skip-stages", action="store_true")
    ap.add_argument("--skip-actors", action="store_true", help="no 2-actor run")
    ap.add_argument("--skip-dtype", action="store_true", help="no bfloat16 run")
    ap.add_argument("--skip-fixed", action="store_true", help="no one-document job")
    ap.add_argument("--gpu", action="store_true", help="the encoder actors on a GPU (latents.use_gpu=true)")
    ap.add_argument("--out", default="bench/results/latents.json")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every job")
    return ap


def main() -> None:
    args = parser().parse_args()
    args.corpus = args.corpus or default_corpus()
    ae_dir = Path(args.ae)
    cfg = load_config(args.config, args.overrides)
    base = list(args.overrides) + (["latents.use_gpu=true"] if args.gpu else [])
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                            f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if args.gpu else ""),
                 "corpus": args.corpus, "ae": str(ae_dir), "config": args.config, "overrides": base,
                 "batch_size": cfg.latents.batch_size}
    if not args.skip_stages:
        res["stages_one_thread"] = stage_costs(ae_dir, args.corpus, cfg, args.stage_chunks)

    import ray

    from pipelines.ray_env import init_ray

    init_ray(cfg.ray)
    cpus = ray.cluster_resources().get("CPU", 0)
    res["cluster_cpus"] = cpus
    if not args.skip_fixed:
        with tempfile.TemporaryDirectory() as tmp:
            res["fixed_job"] = job(ae_dir, one_document(args.corpus, cfg, Path(tmp)), args.config, base)
    res["shard_sizes"] = [job(ae_dir, args.corpus, args.config, base + [f"latents.shard_documents={n}"])
                          for n in args.shard_documents]
    big = args.shard_documents[0]
    if not args.skip_actors:
        per = cfg.latents.cpus_per_actor
        res["two_actors"] = job(ae_dir, args.corpus, args.config, base + [
            f"latents.shard_documents={big}", "latents.num_actors=2", f"latents.cpus_per_actor={per}"])
    if not args.skip_dtype:
        res["bfloat16"] = job(ae_dir, args.corpus, args.config, base + [f"latents.shard_documents={big}",
                                                                        "latents.dtype=bfloat16"])
    ray.shutdown()

    runs = res["shard_sizes"]
    ref = runs[0]
    if len(runs) > 1:  # seconds per extra shard: the slope of the wall time against the number of shards
        x = np.array([r["shards"] for r in runs], float)
        y = np.array([r["wall_s"] for r in runs], float)
        res["seconds_per_shard"] = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) else None
    res["ratio_to_first_shard_size"] = {str(r["overrides"][-1]): r["tokens_per_s"] / ref["tokens_per_s"] for r in runs}
    if "two_actors" in res:
        res["speedup_2_over_1_actor"] = res["two_actors"]["tokens_per_s"] / ref["tokens_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    report(res, cpus)
    print(f"\nwrote {args.out}")


def report(res: dict, cpus: float) -> None:
    print(f"\nlatent precomputation, AE {res['ae']}, corpus {res['corpus']}, config {res['config']}, "
          f"encoder batch {res['batch_size']}, {cpus:g} CPUs in Ray; {res['machine']}")
    if "stages_one_thread" in res:
        s = res["stages_one_thread"]
        print(f"\nstages alone, one thread ({s['chunks']:,} chunks = {s['tokens']:,} tokens):")
        print("| stage | seconds | tokens/s per core |")
        print("| --- | ---: | ---: |")
        for k in ("read", "tokenize_chunk", "encode", "write"):
            print(f"| {k} | {s['seconds'][k]:.2f} | {s['tokens_per_s'][k]:,.0f} |")
        total = sum(s["seconds"].values())
        print(f"| all four in a row | {total:.2f} | {s['tokens'] / total:,.0f} |")
    print("\n| run | shards | chunks | wall (s) | count pass (s) | stream (s) | tokens/s | tokens/s per CPU "
          "| ratio | encoder actors | bytes/token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ref = res["shard_sizes"][0]["tokens_per_s"]
    rows = [(" ".join(r["overrides"][-1:]), r) for r in res["shard_sizes"]]
    rows += [("2 actors", res["two_actors"])] if "two_actors" in res else []
    rows += [("bfloat16", res["bfloat16"])] if "bfloat16" in res else []
    rows += [("one document (fixed cost)", res["fixed_job"])] if "fixed_job" in res else []
    for name, r in rows:
        print(f"| {name} | {r['shards']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['count_s']:.1f} | "
              f"{r['stream_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / max(cpus, 1):,.0f} | "
              f"{r['tokens_per_s'] / ref:.2f} | {r['encoder_actors']} | {r['bytes_per_token']:.1f} |")
    if res.get("seconds_per_shard") is not None:
        print(f"\nfixed cost per shard (slope of wall time against shards): {res['seconds_per_shard']:.3f} s")
    if "fixed_job" in res:
        print(f"fixed cost per job (one document): {res['fixed_job']['wall_s']:.1f} s")
    if "speedup_2_over_1_actor" in res:
        print(f"1 -> 2 encoder actors: {res['speedup_2_over_1_actor']:.2f}x")


if __name__ == "__main__":
    main()
