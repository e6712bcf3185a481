#!/usr/bin/env python
"""How much each energy head's first block does at initialisation, and how much of it depends on h.

    python bench/bench_head_init.py --widths 256 768

For each head (paper / adanorm) and init scheme (normal = N(0, 0.02^2) / torch = PyTorch's default)
at width d: the block's residual update relative to its input, ||x_1 - x_0|| / ||x_0||, and the
share of the update that follows h: the spread over 64 hidden states of the update averaged over 16
noise draws, divided by its spread over the noise draws (~0.25 = 1/sqrt(16) when the update ignores h).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from calm_core.heads import AdaNormEnergyHead, PaperEnergyHead  # noqa: E402


def probe(arch: str, init: str, d: int, latent: int = 128, n_h: int = 64, n_noise: int = 16) -> tuple[float, float]:
    torch.manual_seed(0)
    head = (PaperEnergyHead(d, latent, 1, init=init) if arch == "paper"
            else AdaNormEnergyHead(d, latent, int(2.7 * d), 1, init=init))
    h, eps = torch.randn(n_h, d), torch.rand(n_h, n_noise, head.noise_dim) - 0.5
    with torch.no_grad():
        c = head.cond_norm(head.cond(h)).unsqueeze(-2)  # [n_h, 1, d]
        x = head.noise_norm(head.noise(eps))  # [n_h, n_noise, d]
        b = head.blocks[0]
        upd = (b(x, b.cond(c)) if arch == "paper" else b(x, c)) - x
    return float(upd.norm() / x.norm()), float(upd.mean(1).std(0).mean() / upd.std(1).mean())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 768])
    return ap


def main() -> None:
    args = parser().parse_args()
    print("| d | head | init | block update / input | share following h (0.25 = none) |")
    print("| ---: | --- | --- | ---: | ---: |")
    for d in args.widths:
        for arch in ("paper", "adanorm"):
            for init in ("normal", "torch"):
                ratio, share = probe(arch, init, d)
                print(f"| {d} | {arch} | {init} | {ratio:.2e} | {share:.2f} |")


if __name__ == "__main__":
    main()
