"""A sweep's results: DIR/sweep/results.parquet (one row per trial), results.md (the table, the
paper's number beside each row) and curves.png (held-out loss and BrierLM against training FLOPs,
one line per trial), from Tune's ResultGrid and each trial's own metrics log."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from pipelines.storage import RunDir
from pipelines.sweep.spec import SweepSpec, TrialSpec, folder_name

COLUMNS = [  # (key, header, format)
    ("step", "steps", "{:,.0f}"), ("train_flops", "train FLOPs", "{:.3g}"), ("val_loss", "held-out loss", "{:.4f}"),
    ("val_gap_closed", "gap closed", "{:.1%}"), ("val_gap_prefix1", "gap, 1st token known", "{:.1%}"),
    ("val_gap_prefix3", "gap, 3 tokens known", "{:.1%}"), ("val_loss_shuffled", "loss, context shuffled", "{:.4f}"),
    ("val_brier1", "Brier-1", "{:.4f}"), ("val_brierlm", "BrierLM", "{:.2f}"),
    ("ae_acc_mu", "AE acc (mu)", "{:.2%}"), ("ae_acc_sample", "AE acc (sample)", "{:.2%}"),
    ("ae_acc_noise", "AE acc (mu+noise)", "{:.2%}"), ("ae_active_dims", "active dims", "{:.0f}"),
    ("ae_mean_sigma", "mean sigma", "{:.3f}"), ("ae_mu_std_over_sigma", "std(mu)/sigma", "{:.2f}"),
    ("latents_bytes_per_token", "latent bytes/token", "{:.1f}"), ("tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("gen_tokens_per_s", "generated tokens/s", "{:,.0f}"),
    ("wall_s", "wall (s)", "{:,.0f}"),
]


def curve(root: RunDir, trial: TrialSpec) -> list[dict[str, float]]:
    """The trial's validation points (its artifact's metrics log)."""
    parts = ("trials", folder_name(trial.name), trial.model, "metrics.jsonl")
    if trial.model == "ae" or not root.exists(*parts):
        return []
    lines = root.read_text(*parts).splitlines()
    return [{k: r.get(k) for k in ("step", "train_flops", "val_loss", "val_brierlm", "val_brier1", "val_gap_closed")}
            for r in map(json.loads, lines) if r.get("val_loss") is not None]


def rows_from(grid, trials: list[TrialSpec]) -> list[dict[str, Any]]:
    """One row per trial of the spec, in the spec's order: its final report, or its error."""
    by_name = {}
    for r in grid:
        name = (r.config or {}).get("trial", {}).get("name")
        if name is not None:
            by_name[name] = r
    rows = []
    for t in trials:
        r = by_name.get(t.name)
        row: dict[str, Any] = {"trial": t.name, "model": t.model, "overrides": " ".join(t.overrides), "paper": t.paper}
        m = (r.metrics or {}) if r is not None else {}
        if r is None:
            row["status"] = "not run"
        elif r.error is not None:
            row["status"] = f"error: {str(r.error).splitlines()[0][:200]}"
        else:
            row["status"] = "done" if m.get("done") else "stopped early (scheduler)"
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in row:
                row[k] = float(v)
        row["ae_key"] = m.get("ae_key", "")
        rows.append(row)
    return rows


def correlation(x: list[float], y: list[float]) -> tuple[float, float]:
    """Pearson and Spearman (ranks with ties averaged) of two equally long lists."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    if len(a) < 3:
        return math.nan, math.nan

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for u in np.unique(v):  # ties: their mean rank
            r[v == u] = r[v == u].mean()
        return r

    return float(np.corrcoef(a, b)[0, 1]), float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def markdown(spec: SweepSpec, rows: list[dict[str, Any]], curves: dict[str, list[dict]]) -> str:
    cols = [c for c in COLUMNS if any(not _missing(r.get(c[0])) for r in rows)]
    lines = [f"# Sweep {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += [f"Config `{spec.config}`, overrides `{' '.join(spec.overrides) or '-'}`, corpus `{spec.corpus or '(default)'}`"
              + (f", {spec.budget_flops:.3g} training FLOPs per trial" if spec.budget_flops else "") + ".", ""]
    head = ["trial", "model", "overrides", *[c[1] for c in cols], "status", "paper"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " if i < 3 or i >= len(head) - 2 else " ---: "
                                                              for i in range(len(head))) + "|"]
    for r in rows:
        cells = [r["trial"], r["model"], f"`{r['overrides']}`" if r["overrides"] else "-"]
        cells += ["-" if _missing(r.get(k)) else fmt.format(r[k]) for k, _, fmt in cols]
        cells += [r["status"], r.get("paper") or "-"]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    if spec.correlate:
        a, b = spec.correlate
        done = [r for r in rows if not _missing(r.get(a)) and not _missing(r.get(b))]
        p, s = correlation([r[a] for r in done], [r[b] for r in done])
        pts = [c for cs in curves.values() for c in cs if not _missing(c.get(a)) and not _missing(c.get(b))]
        cp, cs_ = correlation([c[a] for c in pts], [c[b] for c in pts])
        lines += ["", f"{a} against {b}: Pearson {p:.3f}, Spearman {s:.3f} over the {len(done)} trials' final values; "
                  f"Pearson {cp:.3f}, Spearman {cs_:.3f} over their {len(pts)} validation points."]
    if spec.paper:
        lines += ["", f"Paper: {spec.paper}"]
    return "\n".join(lines) + "\n"


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def plot(rows: list[dict[str, Any]], curves: dict[str, list[dict]], path: str) -> bool:
    """Held-out loss and BrierLM against training FLOPs, a panel row per model; False if no curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("calm", "baseline") if any(curves.get(r["trial"]) for r in rows if r["model"] == m)]
    if not models:
        return False
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, (key, label) in enumerate((("val_loss", "held-out loss"), ("val_brierlm", "BrierLM"))):
            ax = axes[i][j]
            for r in rows:
                pts = [c for c in curves.get(r["trial"], []) if c.get(key) is not None] if r["model"] == m else []
                if pts:
                    ax.plot([c["train_flops"] for c in pts], [c[key] for c in pts], marker="o", ms=3, label=r["trial"])
            ax.set_xscale("log")
            ax.set_xlabel("training FLOPs")
            ax.set_ylabel(f"{m}: {label}")
            ax.grid(alpha=0.3)
        axes[i][1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(root: RunDir, spec: SweepSpec, trials: list[TrialSpec], grid) -> tuple[list[dict], str]:
    """Write DIR/sweep/results.{parquet,md} and curves.png; returns the rows and the Markdown."""
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rows_from(grid, trials)
    curves = {t.name: curve(root, t) for t in trials}
    for r in rows:
        r["curve"] = json.dumps(curves.get(r["trial"], []))
    text = markdown(spec, rows, curves)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("trial", "model", "overrides", "status"), k))
    columns = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        numeric = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals)
        columns[k] = pa.array([None if v is None else float(v) for v in vals], pa.float64()) if numeric else \
            pa.array([None if v is None else str(v) for v in vals], pa.string())
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table(columns), f"{tmp}/results.parquet")
        Path(tmp, "results.md").write_text(text)
        plot(rows, curves, f"{tmp}/curves.png")
        root.fs.create_dir(root.path("sweep"), recursive=True)
        for f in Path(tmp).iterdir():
            with root.fs.open_output_stream(root.path("sweep", f.name)) as out:
                out.write(f.read_bytes())
    return rows, text
