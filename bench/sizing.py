#!/usr/bin/env python
"""Memory per GPU of each config's training stages, computed from the models (docs/CLUSTER.md).

    python bench/sizing.py                      # debug, demo, small, paper; 1 / 8 GPUs; ZeRO 1 and 3
    python bench/sizing.py --configs paper --gpus 8 64 --zero 1 2 3

Per GPU, with P parameters, N data-parallel GPUs and ZeRO stage s, mixed precision (bf16 weights
and gradients, fp32 master weights and Adam moments in the optimizer; DeepSpeed's bf16 mode):

    weights   2P   (s = 3: 2P / N)
    gradients 2P   (s >= 2: 2P / N)
    optimizer 12P / N for s >= 1 (fp32 master 4P, Adam m 4P, v 4P), else 12P

Activations kept for the backward of one micro-batch (B sequences of T positions, width d,
n layers, no recomputation, fused attention that stores no T x T scores), in bf16, after
Korthikanti et al. (2022) with a SwiGLU FFN of width f:

    per layer  ~ B T (16 d + 6 f) bytes          (attention block ~16 d, SwiGLU ~6 f per position)

plus the output head: CALM's energy head on N samples per position (~B T N (8 h_w) bytes, h_w its
width) and the baseline's logits (B T V x 6 bytes: bf16 logits and their fp32 softmax). T is in
chunk positions for CALM (L - 1) and in tokens for the baseline (L K - 1): at the same context CALM
keeps K times fewer positions. The AE (stage 1) works on single chunks and is small.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def state_bytes(P: int, N: int, zero: int) -> float:
    weights = 2 * P / (N if zero >= 3 else 1)
    grads = 2 * P / (N if zero >= 2 else 1)
    optim = 12 * P / (N if zero >= 1 else 1)
    return weights + grads + optim


def activation_bytes(B: int, T: int, d: int, f: int, layers: int, head: float) -> float:
    return B * T * (16 * d + 6 * f) * layers + head


def rows(config: str, gpus: list[int], zeros: list[int]) -> list[dict]:
    import torch

    from calm_core.artifacts import build_model
    from calm_core.config import load_config

    cfg = load_config(config)
    V, m, K, L = cfg.tokenizer.vocab_size, cfg.model, cfg.ae.K, cfg.model.block_chunks
    with torch.device("meta"):
        models = {k: build_model(k, cfg, V) for k in ("calm", "baseline")}
    out = []
    for kind, model in models.items():
        P = sum(p.numel() for p in model.parameters())
        B = (cfg.stage2 if kind == "calm" else cfg.baseline).batch_size
        T = L - 1 if kind == "calm" else L * K - 1
        head = (B * T * cfg.head.n_samples * 8 * m.d_model) if kind == "calm" else B * T * V * 6
        act = activation_bytes(B, T, m.d_model, m.ffn_dim, m.n_layers, head)
        for n in gpus:
            for z in zeros:
                out.append({"config": config, "model": kind, "params": P, "batch": B, "positions": T, "gpus": n,
                            "zero": z, "states_gb": state_bytes(P, n, z) / 1e9, "activations_gb": act / 1e9,
                            "total_gb": (state_bytes(P, n, z) + act) / 1e9})
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["debug", "demo", "small", "paper"])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--zero", type=int, nargs="+", default=[1, 3])
    return ap


def main() -> None:
    args = parser().parse_args()
    print("| config | model | parameters | batch x positions per GPU | GPUs | ZeRO | weights + grads + Adam (GB) "
          "| activations (GB) | total per GPU (GB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in args.configs:
        for r in rows(c, args.gpus, args.zero):
            print(f"| {r['config']} | {r['model']} | {r['params'] / 1e6:,.1f}M | {r['batch']} x {r['positions']} | "
                  f"{r['gpus']} | {r['zero']} | {r['states_gb']:.2f} | {r['activations_gb']:.2f} | {r['total_gb']:.2f} |")


if __name__ == "__main__":
    main()
