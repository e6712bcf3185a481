#!/usr/bin/env python
"""Importing an official CALM checkpoint: peak memory against the checkpoint's size, one file
against shards, .bin against safetensors, and the time it takes.

    python bench/bench_official.py --hidden 1024 --layers 16 --vocab 32000 --shards 4

Builds a random official-format CALM folder (a CALM-M-like backbone with its AE inside, written as
the official scripts write it) in --work for each layout, then runs ``jobs/official.py import`` on
it in a fresh process and reads that process's peak resident memory (ru_maxrss). The figure that
matters is (peak - the RSS of a process that only imports torch and the job) / checkpoint bytes:
about 1 means the import holds one copy of the weights at a time; 2 would mean two full copies.
No corpus: the weights are random.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # its helper modules (official_folders, session_memory), however it is loaded

import torch  # noqa: E402
from official_folders import SCALES, llama_style_tokenizer, official_state, special_ids, write_folder  # noqa: E402

from calm_core.config import load_config  # noqa: E402


def official_calm(out: Path, hidden: int, layers: int, vocab: int, fmt: str, shards: int) -> int:
    """A random official EnergyTransformer folder (with its AE under ae_model.); returns its weight bytes."""
    from calm_core import official as O

    scale = SCALES["released"]
    model = {"d_model": hidden, "n_layers": layers, "n_heads": hidden // 64, "ffn_dim": int(hidden * 2.75) // 64 * 64,
             "rope_pairing": "halves", "layernorm_eps": 1e-6}
    head = {**scale.head, "blocks": max(1, layers // 4)}
    cfg = O.official_config(load_config("demo"), scale.ae, {"model": model, "head": head})
    torch.manual_seed(0)
    state = official_state("calm", cfg, vocab, official_state("ae", cfg, vocab))
    conf = O.export_config("calm", cfg, vocab, special_ids(vocab), "ae")
    # both names of the head kept (dedupe=False), as when the table in docs/BENCHMARKS.md was measured
    return write_folder(out, state, conf, fmt, shards if shards > 1 else 0, dedupe=False)


def measure(folder: Path, tok: Path, run: Path) -> tuple[float, float]:
    """(seconds, peak RSS bytes) of `jobs/official.py import` in a fresh process."""
    t0 = time.perf_counter()
    code = ("import resource, subprocess, sys; "
            f"p = subprocess.run([sys.executable, {str(ROOT / 'jobs' / 'official.py')!r}, 'import', '--calm', "
            f"{str(folder)!r}, '--tokenizer', {str(tok)!r}, '--run', {str(run)!r}]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return time.perf_counter() - t0, int(out.stdout.strip().splitlines()[-1]) * 1024


def idle_rss() -> int:
    """Peak RSS of a process that only imports what the import job imports (the fixed cost)."""
    inner = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch, pipelines.official"
    code = (f"import resource, subprocess, sys; subprocess.run([sys.executable, '-c', {inner!r}]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()) * 1024


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--work", default="/tmp/bench-official")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def main() -> None:
    a = parser().parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = llama_style_tokenizer(work / "tokenizer.json", a.vocab)
    rows = []
    idle = idle_rss()
    for fmt, shards in (("bin", 1), ("bin", a.shards), ("safetensors", a.shards)):
        folder = work / f"{fmt}-{shards}"
        size = official_calm(folder, a.hidden, a.layers, a.vocab, fmt, shards)
        seconds, peak = measure(folder, tok, work / f"run-{fmt}-{shards}")
        rows.append({"format": fmt, "shards": shards, "checkpoint_gb": size / 1e9, "peak_rss_gb": peak / 1e9,
                     "idle_rss_gb": idle / 1e9, "added_over_checkpoint": (peak - idle) / size, "seconds": seconds})
        shutil.rmtree(folder)
    print(f"\nimport of a random official CALM (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; "
          f"{platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__})\n")
    print(f"(a process that only imports torch and the job: {idle / 1e9:.2f} GB)\n")
    print("| format | shards | checkpoint GB | peak RSS GB | (peak - idle) / checkpoint | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['format']} | {r['shards']} | {r['checkpoint_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
              f"{r['added_over_checkpoint']:.2f} | {r['seconds']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
