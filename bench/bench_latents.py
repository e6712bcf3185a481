#!/usr/bin/env python
"""Latent precomputation benchmark: tokens/s of the Ray Data job (1 and 2 encoder actors) against a
plain single-process loop doing the same work (tokenise, chunk, encode with the same batch size,
write Parquet with pyarrow), bytes stored per token for float32 and float16, and the encoder
compute that precomputation saves per stage-2 epoch against the disk it costs.

    python bench/bench_latents.py --ae runs/small/ae --corpus ../shared/data/tinystories-sample/train.txt

Needs a trained RUN/ae (jobs/stage1.py or bench/bench_stage1.py --run DIR). Prints a table and
writes the figures as JSON (--out).
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

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from calm_core.autoencoder import load_autoencoder_dir  # noqa: E402
from calm_core.chunking import chunk_documents  # noqa: E402
from calm_core.config import load_config  # noqa: E402
from pipelines.data import latents as LT  # noqa: E402


def plain_loop(ae_dir: Path, texts: list[str], batch: int, dtype: str, out: Path) -> dict:
    """One process, one thread: tokenise -> chunk -> encode (same batch size) -> Parquet."""
    torch.set_num_threads(1)
    model, cfg, tok, _ = load_autoencoder_dir(ae_dir)
    schema = LT.latents_schema(cfg.ae.K, cfg.ae.latent_dim, dtype)
    t0 = time.perf_counter()
    enc_s = 0.0
    rows = 0
    writer = pq.ParquetWriter(out, schema, **LT.PARQUET_OPTIONS)
    for i in range(0, len(texts), 256):
        docs = texts[i : i + 256]
        chunks, doc_index, position = chunk_documents(tok.encode_batch(docs), cfg.ae.K, tok.eot_id, tok.pad_id)
        doc_ids = np.asarray([str(j) for j in range(i, i + len(docs))], dtype=object)[doc_index]
        for b in range(0, len(chunks), batch):
            x = chunks[b : b + batch]
            te = time.perf_counter()
            with torch.inference_mode():
                mu, ls = model.encode(torch.from_numpy(x.astype(np.int64)))
            enc_s += time.perf_counter() - te
            writer.write_table(LT.to_table(doc_ids[b : b + batch], position[b : b + batch], x, mu, ls, schema, dtype))
            rows += len(x)
    writer.close()
    dt = time.perf_counter() - t0
    enc_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("enc_"))
    return {"rows": rows, "tokens_per_s": rows * cfg.ae.K / dt, "wall_s": dt, "encode_s": enc_s,
            "encoder_matmul_params": enc_params, "bytes": out.stat().st_size}


def ray_job(ae_dir: Path, corpus: str, overrides: list[str]) -> dict:
    from pipelines.data.precompute import precompute_latents
    from pipelines.storage import RunDir

    run_dir = Path(tempfile.mkdtemp(prefix="calm-bench-latents-"))
    try:
        cfg = load_config("small", overrides)
        t0 = time.perf_counter()
        m = precompute_latents(cfg, corpus, RunDir(str(run_dir)), ae_path=str(ae_dir))
        dt = time.perf_counter() - t0
        return {"rows": m["metrics"]["rows"], "tokens": m["metrics"]["tokens"], "wall_s": dt,
                "tokens_per_s": m["metrics"]["tokens"] / dt, "bytes": m["metrics"]["bytes"],
                "bytes_per_token": m["metrics"]["bytes_per_token"]}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ae", required=True, help="a stage-1 AE artifact folder (RUN/ae)")
    ap.add_argument("--corpus", default="../shared/data/tinystories-sample/train.txt")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--out", default="bench/results/latents.json")
    args = ap.parse_args()
    ae_dir = Path(args.ae)

    from pipelines.data.ingest import iter_texts, load_corpus
    from pipelines.ray_env import init_ray

    cfg = load_config("small")
    init_ray(cfg.ray)
    # every job reads the corpus itself; the plain loop gets the same documents (train + val)
    train, val, stats = load_corpus(args.corpus, cfg.data)
    texts = list(iter_texts(train)) + list(iter_texts(val))

    common = [f"latents.batch_size={args.batch_size}", "latents.shard_documents=1000000"]
    one = ray_job(ae_dir, args.corpus, common + ["latents.num_actors=1", "latents.cpus_per_actor=1"])
    two = ray_job(ae_dir, args.corpus, common + ["latents.num_actors=2", "latents.cpus_per_actor=0.75"])
    f16 = ray_job(ae_dir, args.corpus, common + ["latents.num_actors=1", "latents.cpus_per_actor=1",
                                                 "latents.dtype=float16"])
    import ray

    ray.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_loop(ae_dir, texts, args.batch_size, "float32", Path(tmp) / "plain.parquet")

    K = load_autoencoder_dir(ae_dir)[1].ae.K
    enc_flops_per_chunk = 2 * plain["encoder_matmul_params"]  # one multiply-add per weight (embedding: a lookup)
    epoch_flops = enc_flops_per_chunk * plain["rows"]
    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "corpus": args.corpus, "ae": str(ae_dir), "batch_size": args.batch_size, "chunks": plain["rows"], "K": K,
        "ray_1_actor": one, "ray_2_actors": two, "ray_1_actor_float16": f16, "plain": plain,
        "ratio_ray1_over_plain": one["tokens_per_s"] / plain["tokens_per_s"],
        "speedup_2_over_1_actor": two["tokens_per_s"] / one["tokens_per_s"],
        "encoder_gflop_per_epoch": epoch_flops / 1e9,
        "encoder_s_per_epoch_1_thread": plain["encode_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))

    print()
    print(f"latent precomputation, AE {ae_dir}, corpus {args.corpus}: {plain['rows']:,} chunks of K={K}, "
          f"encoder batch {args.batch_size}")
    print("| run | wall (s) | tokens/s | ratio to plain | bytes/token |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| plain loop, 1 process, 1 thread, float32 | {plain['wall_s']:.1f} | {plain['tokens_per_s']:,.0f} | 1.00 | "
          f"{plain['bytes'] / (plain['rows'] * K):.1f} |")
    for name, r in (("Ray Data, 1 actor x 1 CPU, float32", one), ("Ray Data, 2 actors x 0.75 CPU, float32", two),
                    ("Ray Data, 1 actor x 1 CPU, float16", f16)):
        print(f"| {name} | {r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f} | {r['bytes_per_token']:.1f} |")
    print(f"\nspeed-up 1 -> 2 actors: {res['speedup_2_over_1_actor']:.2f}x")
    print(f"per stage-2 epoch, precomputation saves {res['encoder_gflop_per_epoch']:.1f} GFLOP of encoder "
          f"compute ({plain['encode_s']:.1f} s on 1 thread here) and costs {one['bytes'] / 2**20:.1f} MiB "
          f"(float32) or {f16['bytes'] / 2**20:.1f} MiB (float16) of disk, read once per epoch")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
