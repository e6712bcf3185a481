"""The evaluation report: per-block sums (pipelines.eval.scores) -> report.json, report.md and plots.

Means are ratios of sums over all scored blocks (as the in-training estimator). Confidence
intervals (95%) come from the per-block spread: for a mean of per-position values, the normal
interval of the per-block means weighted by positions; for BrierLM, the percentiles of
``eval.bootstrap`` resamples of the blocks (BrierLM is a geometric mean of clamped ratios, so it
gets no closed form).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from calm_core.brierlm import ORDERS, brier_lm, brier_lm_official
from calm_core.checkpoint import write_manifest
from calm_core.config import Config
from calm_core.evaluate import PREFIXES, gap_closed
from pipelines.eval.scores import RS
from pipelines.storage import RunDir


def col(rows: list[dict], key: str) -> np.ndarray:
    return np.stack([np.asarray(r[key], dtype=np.float64) for r in rows])


def ratio_ci(num: np.ndarray, den: np.ndarray) -> dict[str, float]:
    """sum(num) / sum(den) with a 95% interval from the per-block ratios (weighted by den)."""
    total = den.sum()
    mean = float(num.sum() / max(total, 1e-12))
    if len(num) < 2 or total <= 0:
        return {"mean": mean, "ci95": [math.nan, math.nan]}
    w = den / total
    per = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    var = float((w * (per - mean) ** 2).sum() / (1 - (w ** 2).sum() + 1e-12))  # weighted sample variance
    half = 1.96 * math.sqrt(var * (w ** 2).sum())
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def brier_block(rows: list[dict], prefix: str, n_boot: int, seed: int, positions: str) -> dict[str, Any]:
    """Brier-1..4 with intervals and BrierLM (also in the official combination) with bootstrap
    intervals, from ``{prefix}brier{n}``, and the number of scored ``positions``. The intervals come
    from the spread between blocks, so they hold both the text's variation and the Monte Carlo
    noise of the samples (with one block there is no spread to use: no interval)."""
    pos = col(rows, positions)
    sums = np.stack([col(rows, f"{prefix}brier{n}") for n in ORDERS], 1)  # [blocks, 4]
    out: dict[str, Any] = {f"brier{n}": ratio_ci(sums[:, i], pos) for i, n in enumerate(ORDERS)}
    out["positions"] = int(pos.sum())
    out["brierlm"] = brier_lm({n: out[f"brier{n}"]["mean"] for n in ORDERS})
    out["brierlm_official"] = brier_lm_official({n: out[f"brier{n}"]["mean"] for n in ORDERS})
    if n_boot and len(pos) > 1:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(pos), size=(n_boot, len(pos)))
        means = sums[idx].sum(1) / pos[idx].sum(1)[:, None]  # [n_boot, 4]
        for key, combine in (("brierlm_ci95", brier_lm), ("brierlm_official_ci95", brier_lm_official)):
            boot = [combine(dict(zip(ORDERS, m))) for m in means]
            out[key] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def bleu(rows: list[dict], prefix: str) -> float:
    """Corpus BLEU (sacrebleu) of the predicted next chunks' text against the true ones."""
    import sacrebleu

    hyp, ref = [], []
    for r in rows:
        h, t = r[f"{prefix}pred_text"].split(RS), r[f"{prefix}true_text"].split(RS)
        keep = [i for i, x in enumerate(t) if x.strip()]
        hyp += [h[i] for i in keep]
        ref += [t[i] for i in keep]
    return float(sacrebleu.corpus_bleu(hyp, [ref]).score) if ref else math.nan


def agreement_part(rows: list[dict], prefix: str) -> dict[str, Any]:
    pos = col(rows, f"{prefix}positions")
    return {"token_accuracy": ratio_ci(col(rows, f"{prefix}token_correct"), col(rows, f"{prefix}true_tokens")),
            "exact_chunk": ratio_ci(col(rows, f"{prefix}exact"), pos),
            "bleu": bleu(rows, prefix),
            "rouge_l": ratio_ci(col(rows, f"{prefix}rouge_l"), col(rows, f"{prefix}text_positions"))["mean"]}


def sweep_part(rows: list[dict], prefix: str, temps: list[float]) -> list[dict[str, float]]:
    n = col(rows, f"{prefix}sweep_positions").sum()
    acc, colli = col(rows, f"{prefix}sweep_accuracy").sum(0), col(rows, f"{prefix}sweep_collision").sum(0)
    return [{"temperature": t, "accuracy": float(acc[i] / max(n, 1)), "collision": float(colli[i] / max(n, 1)),
             "positions": int(n)} for i, t in enumerate(temps)]


def calm_part(rows: list[dict], cfg: Config) -> dict[str, Any]:
    ev, blocks = cfg.eval, len(rows)
    pos = col(rows, "calm_positions")
    out = brier_block(rows, "calm_", ev.bootstrap, ev.seed, "calm_positions")
    out.update({k: float(col(rows, f"calm_{k}").sum() / blocks) for k in ("loss", "fidelity", "diversity",
                                                                          "loss_perfect", "loss_uncond")})
    out["gap_closed"] = gap_closed(out["loss"], out["loss_perfect"], out["loss_uncond"])
    have = set(rows[0]) if rows else set()
    out["prefix"] = {str(k): {"loss": float(col(rows, f"calm_loss_prefix{k}").sum() / blocks)} for k in PREFIXES
                     if f"calm_loss_prefix{k}" in have}  # partial credit: the first k tokens known
    for v in out["prefix"].values():
        v["gap_closed"] = gap_closed(v["loss"], out["loss_perfect"], out["loss_uncond"])
    if "calm_loss_shuffled" in have:  # the context ablation
        out["loss_shuffled"] = float(col(rows, "calm_loss_shuffled").sum() / blocks)
    out["energy_score"] = ratio_ci(col(rows, "calm_energy_score"), pos)
    out["latent"] = {k: ratio_ci(col(rows, f"calm_latent_{k}"), pos)["mean"]
                     for k in ("mse_one", "mse_mean", "cos_one", "cos_mean")}
    out["agreement"] = agreement_part(rows, "calm_")
    out["temperature"] = sweep_part(rows, "calm_", ev.temperatures)
    return out


def baseline_part(rows: list[dict], cfg: Config) -> dict[str, Any]:
    ev = cfg.eval
    out = brier_block(rows, "baseline_", ev.bootstrap, ev.seed, "baseline_positions")
    if rows and "baseline_sampled_brier1" in rows[0]:  # (the official estimator has no sample-only twin)
        sampled = brier_block(rows, "baseline_sampled_", 0, ev.seed, "baseline_positions")
        for n in ORDERS:
            out[f"sampled_brier{n}"] = sampled[f"brier{n}"]
        out["sampled_brierlm"] = sampled["brierlm"]
    ce = ratio_ci(col(rows, "baseline_loss"), col(rows, "baseline_loss_tokens"))
    out["cross_entropy"], out["perplexity"] = ce, math.exp(ce["mean"])
    out["brier1_every_token"] = ratio_ci(col(rows, "baseline_brier1_exact"), col(rows, "baseline_tokens"))["mean"]
    out["agreement"] = agreement_part(rows, "baseline_")
    out["temperature"] = sweep_part(rows, "baseline_", ev.temperatures)
    return out


def ae_part(rows: list[dict], cfg: Config, band_source: str) -> dict[str, Any]:
    edges = cfg.eval.band_edges
    names = [f"rank {lo}-{hi - 1}" for lo, hi in zip([0, *edges], edges)] + [f"rank >= {edges[-1]}", "unseen"]
    tokens = col(rows, "ae_band_tokens").sum(0)
    out: dict[str, Any] = {"tokens": int(tokens.sum()), "noise_std": cfg.eval.noise_std, "band_source": band_source}
    for v in ("mu", "sample", "noise"):
        out[f"acc_{v}"] = float(col(rows, f"ae_band_{v}").sum() / max(tokens.sum(), 1))
    out["bands"] = [{"band": names[i], "tokens": int(tokens[i]),
                     **{f"acc_{v}": float(col(rows, f"ae_band_{v}").sum(0)[i] / tokens[i]) if tokens[i] else None
                        for v in ("mu", "sample", "noise")}} for i in range(len(tokens))]
    return out


def curve(run: RunDir, kind: str) -> list[dict[str, float]]:
    """Held-out BrierLM against training FLOPs from RUN/KIND/metrics.jsonl (empty when absent)."""
    if not run.exists(kind, "metrics.jsonl"):
        return []
    recs = [json.loads(x) for x in run.read_text(kind, "metrics.jsonl").splitlines() if x.strip()]
    return [{"train_flops": r["train_flops"], "val_brierlm": r["val_brierlm"]} for r in recs
            if r.get("val_brierlm") is not None and r.get("train_flops") is not None]


ESTIMATORS = {"calm": "two or more decoded head samples per chunk start (U-statistic)",
              "baseline": "its probabilities at every chunk start (exact P(y), the collision from the samples' "
                          "exact probabilities)",
              "baseline_paper": "the official estimator at every token position (exact P(y); the collision along "
                                "one sampled path: two draws' prefix agreement x the exact last-step sum)"}


def build_report(passes: list, cfg: Config, run: RunDir, corpus: str, lman: dict, kinds: list[str],
                 missing: list[str], band_source: str, layout: str) -> dict[str, Any]:
    """The report from the scoring ``passes`` (``pipelines.eval.job.Pass``: the models of one
    context, their rows); the AE's figures come from the first pass."""
    K = lman["identity"]["K"]
    of = {k: p for p in passes for k in p.kinds}
    scored = sum(len(p.rows) * p.L * K for p in passes)
    seconds = sum(p.seconds for p in passes)
    rep: dict[str, Any] = {
        "run": run.uri(), "corpus": corpus, "documents": lman["inputs"]["corpus"].get("documents"),
        "split": ("every document of the corpus" if cfg.eval.split == "all" else
                  "the documents the run's split rule held out of training"),
        "layout": layout, "corpus_chunks": lman["metrics"]["rows"], "K": K,
        "context": "eval.block_chunks" if cfg.eval.block_chunks else "each model's trained context",
        "context_chunks": {k: of[k].L for k in kinds}, "blocks": {k: len(of[k].rows) for k in kinds},
        "samples": cfg.eval.samples, "seed": cfg.eval.seed, "protocol": cfg.eval.protocol,
        "models": kinds, "missing": missing, "ae": ae_part(passes[0].rows, cfg, band_source),
        "throughput": {"tokens_scored": scored, "seconds": seconds, "tokens_per_s": scored / max(seconds, 1e-9),
                       "actors": cfg.eval.actors},
        "curves": {k: curve(run, k) for k in kinds},
    }
    if "calm" in kinds:
        rep["calm"] = calm_part(of["calm"].rows, cfg)
    if "baseline" in kinds:
        rep["baseline"] = baseline_part(of["baseline"].rows, cfg)
    for k in kinds:
        est = "baseline_paper" if k == "baseline" and cfg.eval.protocol == "paper" else k
        rep[k].update({"context_chunks": of[k].L, "context_tokens": of[k].L * K, "blocks": len(of[k].rows),
                       "estimator": ESTIMATORS[est]})
    return rep


def _f(x: Any, digits: int = 4) -> str:
    if isinstance(x, dict):
        lo, hi = x["ci95"]
        return f"{x['mean']:.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f})" if not math.isnan(lo) else f"{x['mean']:.{digits}f}"
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(rep: dict[str, Any]) -> str:
    kinds = rep["models"]
    scored = "; ".join(f"{k}: {rep[k]['blocks']:,} blocks of {rep[k]['context_chunks']:,} chunks "
                       f"({rep[k]['context_tokens']:,} tokens), Brier-n by {rep[k]['estimator']}" for k in kinds)
    out = [f"# Evaluation of `{rep['run']}` on `{rep['corpus']}`", "",
           f"Scored: {rep['split']}, in the {rep.get('layout', 'document')} layout, protocol {rep['protocol']}, "
           f"at {rep.get('context', 'the trained context')} (K = {rep['K']}): {scored}. {rep['samples']} samples per "
           f"position, seed {rep['seed']}; 95% intervals from the per-block spread (BrierLM: bootstrap over blocks; "
           "they hold the text's variation and the sampling noise)."
           + (f" Not in this run: {', '.join(rep['missing'])}." if rep["missing"] else ""), "",
           "| metric | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]

    def row(label: str, get) -> None:
        out.append(f"| {label} | " + " | ".join(_f(get(rep[k])) if get(rep[k]) is not None else "-" for k in kinds) + " |")

    row("BrierLM", lambda m: m["brierlm"])
    row("BrierLM 95% interval", lambda m: "{:.2f}..{:.2f}".format(*m["brierlm_ci95"]) if "brierlm_ci95" in m else None)
    if rep.get("protocol") == "paper":
        row("BrierLM, official combination (clamps only the product)", lambda m: m.get("brierlm_official"))
        row("its 95% interval", lambda m: "{:.2f}..{:.2f}".format(*m["brierlm_official_ci95"])
            if "brierlm_official_ci95" in m else None)
    row("scored positions", lambda m: f"{m['positions']:,}" if "positions" in m else None)
    for n in ORDERS:
        row(f"Brier-{n}", lambda m, n=n: m[f"brier{n}"])
    row("BrierLM, sample-only", lambda m: m.get("sampled_brierlm"))
    row("cross-entropy (nats/token)", lambda m: m.get("cross_entropy"))
    row("perplexity", lambda m: m.get("perplexity"))
    row("energy score vs mu", lambda m: m.get("energy_score"))
    row("energy loss (perfect / unconditional reference)", lambda m: "{:.4f} ({:.4f} / {:.4f})".format(
        m["loss"], m["loss_perfect"], m["loss_uncond"]) if "loss_perfect" in m else None)
    row("energy-loss gap closed", lambda m: "{:.1%}".format(m["gap_closed"]) if "gap_closed" in m else None)
    for k in PREFIXES:
        row(f"reference: first {k} token{'s' if k > 1 else ''} of the chunk known (gap closed)",
            lambda m, k=str(k): "{:.4f} ({:.1%})".format(m["prefix"][k]["loss"], m["prefix"][k]["gap_closed"])
            if k in m.get("prefix", {}) else None)
    row("energy loss, context shuffled across positions", lambda m: m.get("loss_shuffled"))
    row("latent MSE (1 sample / mean)", lambda m: "{:.4f} / {:.4f}".format(m["latent"]["mse_one"], m["latent"]["mse_mean"])
        if "latent" in m else None)
    row("latent cosine (1 sample / mean)", lambda m: "{:.4f} / {:.4f}".format(m["latent"]["cos_one"], m["latent"]["cos_mean"])
        if "latent" in m else None)
    row("next-chunk token accuracy", lambda m: m["agreement"]["token_accuracy"])
    row("next-chunk exact match", lambda m: m["agreement"]["exact_chunk"])
    row("next-chunk BLEU (sacrebleu)", lambda m: m["agreement"]["bleu"])
    row("next-chunk ROUGE-L F1", lambda m: m["agreement"]["rouge_l"])
    out += ["", "Temperature trade-off (two picks per position: accuracy against the true chunk, collision "
            "of the two):", "", "| model | T | accuracy | collision |", "| --- | ---: | ---: | ---: |"]
    for k in kinds:
        out += [f"| {k} | {t['temperature']} | {t['accuracy']:.4f} | {t['collision']:.4f} |" for t in rep[k]["temperature"]]
    ae = rep["ae"]
    out += ["", f"Autoencoder reconstruction of every scored chunk ({ae['tokens']:,} tokens; bands by {ae['band_source']}):",
            "", "| band | tokens | decoding mu | a posterior sample | mu + N(0, %s^2) |" % ae["noise_std"],
            "| --- | ---: | ---: | ---: | ---: |",
            f"| all | {ae['tokens']:,} | {ae['acc_mu']:.4%} | {ae['acc_sample']:.4%} | {ae['acc_noise']:.4%} |"]
    for b in ae["bands"]:
        acc = [f"{b[f'acc_{v}']:.4%}" if b[f"acc_{v}"] is not None else "-" for v in ("mu", "sample", "noise")]
        out.append(f"| {b['band']} | {b['tokens']:,} | " + " | ".join(acc) + " |")
    t = rep["throughput"]
    out += ["", f"Scored {t['tokens_scored']:,} tokens (every model's blocks) in {t['seconds']:.1f} s ({t['tokens_per_s']:,.0f} tokens/s, "
            f"{t['actors']} actor(s)).", ""]
    return "\n".join(out)


def short_table(rep: dict[str, Any]) -> str:
    """A few lines for the end of a chained run: BrierLM, Brier-1..4 and next-chunk agreement per model."""
    lines = [f"{'model':<9} {'BrierLM (95%)':>20} {'Brier-1':>8} {'Brier-2':>8} {'Brier-3':>8} {'Brier-4':>8} "
             f"{'chunk acc':>9} {'BLEU':>6}"]
    for k in rep["models"]:
        m = rep[k]
        ci = "{:.2f}..{:.2f}".format(*m["brierlm_ci95"]) if "brierlm_ci95" in m else ""
        lines.append(f"{k:<9} {m['brierlm']:>7.2f} ({ci:>11}) " + " ".join(f"{m[f'brier{n}']['mean']:>8.4f}" for n in ORDERS)
                     + f" {m['agreement']['token_accuracy']['mean']:>9.4f} {m['agreement']['bleu']:>6.2f}")
    return "\n".join(lines)


def publish(rep: dict[str, Any], run: RunDir, tmp: Path, artifact: str, ident: dict) -> str:
    (tmp / "report.json").write_text(json.dumps(rep, indent=1, default=float))
    (tmp / "report.md").write_text(markdown(rep))
    from pipelines.eval.plots import plots

    plots(rep, tmp)
    metrics = {k: rep[k]["brierlm"] for k in ("calm", "baseline") if k in rep}
    write_manifest(tmp, "evaluation", inputs={"corpus": rep["corpus"]}, metrics=metrics, extra={"identity": ident})
    return run.publish_artifact(tmp, artifact)
