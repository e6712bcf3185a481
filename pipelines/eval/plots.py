"""The evaluation report's plots: BrierLM against training FLOPs, the temperature trade-off and the
AE's reconstruction by token frequency (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plots(rep: dict[str, Any], folder: Path) -> list[str]:
    """brierlm_vs_flops.png, temperature.png, ae_bands.png (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, pts in rep["curves"].items():
        if pts:
            ax.plot([p["train_flops"] for p in pts], [p["val_brierlm"] for p in pts], marker="o", label=k)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="held-out BrierLM (training's split)",
           title="BrierLM during training")
    ax.legend() if ax.lines else ax.text(0.5, 0.5, "no training metrics", ha="center", transform=ax.transAxes)
    fig.tight_layout(), fig.savefig(folder / "brierlm_vs_flops.png", dpi=120), plt.close(fig)
    made.append("brierlm_vs_flops.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in rep["models"]:
        pts = rep[k]["temperature"]
        ax.plot([p["collision"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=k)
        for p in pts:
            ax.annotate(f"T={p['temperature']}", (p["collision"], p["accuracy"]), fontsize=7)
    ax.set(xlabel="collision rate (diversity ->  lower)", ylabel="next-chunk accuracy", title="Temperature trade-off")
    ax.legend(), fig.tight_layout(), fig.savefig(folder / "temperature.png", dpi=120), plt.close(fig)
    made.append("temperature.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bands = [b for b in rep["ae"]["bands"] if b["tokens"]]
    x = np.arange(len(bands))
    for i, v in enumerate(("mu", "sample", "noise")):
        ax.bar(x + (i - 1) * 0.27, [b[f"acc_{v}"] for b in bands], width=0.27, label=v)
    ax.set_xticks(x, [b["band"] for b in bands], rotation=20, fontsize=7)
    ax.set(ylabel="token accuracy", title="AE reconstruction by token frequency", ylim=(0, 1.02))
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(folder / "ae_bands.png", dpi=120), plt.close(fig)
    made.append("ae_bands.png")
    return made
