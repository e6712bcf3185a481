#!/usr/bin/env python
"""Summarise a scripts/gpu-check.sh output folder: each step's status, and for every trained
artifact its tokens/s, training FLOPs per token, achieved TFLOP/s and MFU.

    python bench/gpu_summary.py OUT [--peak-tflops 989]

MFU = tokens/s x training FLOPs per token (the manifest's ``flops_per_token``) / peak; the default
peak is the H200's dense bf16 figure (989 TFLOP/s; a bf16 matmul measured 806 there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the folder scripts/gpu-check.sh wrote")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    return ap


def main() -> None:
    args = parser().parse_args()
    out = Path(args.out)
    status = out / "status.txt"
    print("| step | status |\n| --- | --- |")
    for line in (status.read_text().splitlines() if status.exists() else []):
        name, _, rest = line.partition(" ")
        print(f"| {name} | {rest} |")
    print("\n| artifact | steps | tokens/s | FLOPs/token | TFLOP/s | MFU | peak GPU memory (GB) | held-out BrierLM |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for man in sorted(out.glob("*_artifact/manifest.json")):
        m = json.loads(man.read_text())
        met, fpt = m.get("metrics", {}), m.get("flops_per_token") or 0.0
        tps = met.get("tokens_per_s", 0.0)
        tflops = tps * fpt / 1e12
        print(f"| {man.parent.name.removesuffix('_artifact')} | {met.get('step', '?')} | {tps:,.0f} | {fpt:.3g} "
              f"| {tflops:.1f} | {100 * tflops / args.peak_tflops:.1f}% | {met.get('peak_memory_gb', float('nan')):.2f} "
              f"| {met.get('val_brierlm', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
