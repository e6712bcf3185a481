#!/usr/bin/env python
"""Stage-1 benchmark: held-out accuracy after a wall-clock budget, chunks/s, and the step-time ratio
of Ray Train + DeepSpeed against a plain single-process PyTorch loop on the same model and batch.

    python bench/bench_stage1.py --corpus tinystories-sample.txt --minutes 20 --plain-seconds 90

Prints a table and writes the figures as JSON (``--out``). Held-out text: the documents that the
deterministic hash split (data.val_fraction) keeps out of training, from the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calm_core.autoencoder import ChunkAutoencoder  # noqa: E402
from calm_core.config import load_config  # noqa: E402
from calm_core.optim import param_groups  # noqa: E402
from pipelines.data.files import default_corpus  # noqa: E402


def plain_loop(cfg, vocab: int, ids: dict, chunks: np.ndarray, seconds: float, threads: int) -> dict:
    """The same model, optimiser and global batch in one process, no Ray, no DeepSpeed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t = cfg.stage1
    batch = t.batch_size * cfg.distributed.num_workers  # the global batch of the Ray run
    model = ChunkAutoencoder(cfg.ae, vocab, ids["mask"], ids["pad"])
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95))
    data = torch.as_tensor(chunks.astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    steps, t0, warm = 0, None, 5
    while True:
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        out = model(data[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        steps += 1
        if steps == warm:
            t0 = time.perf_counter()
        if t0 is not None and time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    n = steps - warm
    return {"steps": n, "step_s": dt / n, "chunks_per_s": n * batch / dt, "batch": batch, "threads": threads}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=None, help="file, directory or glob (default: the project's default "
                    "corpus, the Shakespeare plays; docs/BENCHMARKS.md says which corpus each figure used)")
    ap.add_argument("--config", default="small")
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget of the Ray run")
    ap.add_argument("--plain-seconds", type=float, default=90.0, help="how long to time the plain loop")
    ap.add_argument("--run", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--out", default="bench/results/stage1.json")
    ap.add_argument("overrides", nargs="*")
    return ap


def main() -> None:
    args = parser().parse_args()
    args.corpus = args.corpus or default_corpus()

    cfg = load_config(args.config, [f"stage1.max_minutes={args.minutes}", *args.overrides])
    run_dir = args.run or tempfile.mkdtemp(prefix="calm-bench-stage1-")

    from pipelines.ray_env import init_ray
    from pipelines.train.stage1 import run_stage1
    from pipelines.storage import RunDir

    init_ray(cfg.ray)
    run = RunDir(run_dir)
    t0 = time.perf_counter()
    manifest = run_stage1(cfg, args.corpus, run, overwrite=args.run is None)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (Path(run.path("ae")) / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    steady = [r["tokens_per_s"] for r in records[1:]] or [last["tokens_per_s"]]
    ray_tok_s = float(np.median(steady))
    K = cfg.ae.K
    ray_chunks_s = ray_tok_s / K
    ray_step_s = cfg.stage1.batch_size * cfg.distributed.num_workers / ray_chunks_s

    # the plain loop on the same chunks (tokenised with the run's tokenizer), Ray shut down first
    import ray

    from calm_core.chunking import chunk_documents
    from calm_core.tokenizer import CalmTokenizer
    from pipelines.data.ingest import load_corpus

    train_docs, _, _ = load_corpus(args.corpus, cfg.data)
    texts = [r["text"] for r in train_docs.limit(2000).take_all()]
    ray.shutdown()
    tok = CalmTokenizer.from_file(Path(run.path("ae")) / "tokenizer.json")
    chunks, _, _ = chunk_documents(tok.encode_batch(texts), K, tok.eot_id, tok.pad_id)
    threads = max(1, int(round(cfg.distributed.num_workers * cfg.distributed.cpus_per_worker)))
    plain = plain_loop(cfg, tok.vocab_size, {"mask": tok.mask_id, "pad": tok.pad_id}, chunks,
                       args.plain_seconds, threads=os.cpu_count() or threads)

    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}",
        "corpus": args.corpus,
        "config": args.config,
        "parameters": manifest["parameters"],
        "budget_min": args.minutes,
        "wall_s": wall,
        "steps": last["step"],
        "held_out_acc_mu": last["val_acc_mu"],
        "held_out_acc_sample": last["val_acc_sample"],
        "held_out_acc_noise": last["val_acc_noise"],
        "active_dims": last["active_dims"],
        "ray_chunks_per_s": ray_chunks_s,
        "ray_step_s": ray_step_s,
        "plain_chunks_per_s": plain["chunks_per_s"],
        "plain_step_s": plain["step_s"],
        "step_time_ratio_ray_over_plain": ray_step_s / plain["step_s"],
        "global_batch": plain["batch"],
        "workers": cfg.distributed.num_workers,
        "zero_stage": cfg.distributed.zero_stage,
        "curve": [{k: r[k] for k in ("step", "elapsed_s", "val_acc_mu", "val_acc_sample", "val_acc_noise")}
                  for r in records],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))

    print()
    print(f"stage 1, config {args.config}, {res['parameters']:,} parameters, corpus {args.corpus}")
    print(f"| quantity | Ray Train + DeepSpeed ({cfg.distributed.num_workers} workers, ZeRO-{cfg.distributed.zero_stage}) | plain torch loop (1 process) |")
    print("| --- | ---: | ---: |")
    print(f"| global batch (chunks) | {plain['batch']} | {plain['batch']} |")
    print(f"| step time (s) | {ray_step_s:.3f} | {plain['step_s']:.3f} |")
    print(f"| chunks/s | {ray_chunks_s:,.0f} | {plain['chunks_per_s']:,.0f} |")
    print(f"| step-time ratio (Ray / plain) | {res['step_time_ratio_ray_over_plain']:.2f} | 1.00 |")
    print(f"| steps in {args.minutes} min budget | {res['steps']} | - |")
    print(f"| held-out token acc, decode mu | {100 * res['held_out_acc_mu']:.2f}% | - |")
    print(f"| held-out token acc, posterior sample | {100 * res['held_out_acc_sample']:.2f}% | - |")
    print(f"| held-out token acc, mu + N(0, 0.3^2) | {100 * res['held_out_acc_noise']:.2f}% | - |")
    print(f"| active latent dims | {res['active_dims']}/{cfg.ae.latent_dim} | - |")
    print("\nlearning curve (held-out acc: mu / sample / noise):")
    for r in res["curve"]:
        print(f"  step {r['step']:>6} {r['elapsed_s'] / 60:6.1f} min  {100 * r['val_acc_mu']:6.2f}% "
              f"{100 * r['val_acc_sample']:6.2f}% {100 * r['val_acc_noise']:6.2f}%")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
