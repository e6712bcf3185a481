"""The autoencoder's reconstruction report on held-out text: RUN/eval/ae_reconstruction/.

Loads RUN/ae with plain PyTorch (the consolidated safetensors: no Ray, no DeepSpeed needed),
re-reads the corpus's held-out split through Ray Data with the run's tokenizer and chunk rule,
and measures token accuracy decoding mu, a posterior sample and mu + N(0, 0.3^2); shows a few
held-out passages next to their reconstructions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm_core.autoencoder import active_dims, load_autoencoder_dir, mu_variance, reconstruct, reconstruction_metrics
from calm_core.checkpoint import write_manifest
from calm_core.config import Config

from pipelines.storage import RunDir
from pipelines.progress import progress

ARTIFACT = "eval/ae_reconstruction"


def _strip(ids: list[int], eot: int, pad: int) -> list[int]:
    return [i for i in ids if i not in (eot, pad)]


def _examples(model, tok, rows: list[dict], examples: int) -> list[dict]:
    """A few held-out passages next to their reconstructions (decoding mu)."""
    shown = []
    doc_ids = []
    for r in rows:
        if r["doc_id"] not in doc_ids:
            doc_ids.append(r["doc_id"])
        if len(doc_ids) > examples:
            break
    for did in doc_ids[:examples]:
        doc_chunks = torch.as_tensor(np.stack([np.asarray(r["tokens"], np.int64) for r in rows if r["doc_id"] == did][:24]))
        rec = reconstruct(model, doc_chunks)
        orig_text = tok.decode(_strip(doc_chunks.reshape(-1).tolist(), tok.eot_id, tok.pad_id))
        rec_text = tok.decode(_strip(rec.reshape(-1).tolist(), tok.eot_id, tok.pad_id))
        shown.append({"original": orig_text, "reconstructed": rec_text, "identical": orig_text == rec_text})
    return shown


def _print_report(report: dict[str, Any]) -> None:
    progress(f"[report] autoencoder reconstruction on {report['chunks']:,} {report['split']} chunks "
             f"({report['tokens']:,} tokens, padding excluded):")
    progress(f"[report]   token accuracy decoding mu           {100 * report['acc_mu']:.2f}%")
    progress(f"[report]   token accuracy decoding z ~ q(z|x)    {100 * report['acc_sample']:.2f}%")
    progress(f"[report]   token accuracy decoding mu + N(0,{report['noise_std']}^2) {100 * report['acc_noise']:.2f}%")
    progress(f"[report]   active latent dimensions          {report['active_dims']}/{report['latent_dim']}")
    if "mean_sigma" in report:
        progress(f"[report]   mean sigma {report['mean_sigma']:.4f}; Var(mu) per dimension mean {report['mu_var_mean']:.4f} "
                 f"(min {report['mu_var_min']:.4f}, max {report['mu_var_max']:.4f}); std(mu) / sigma {report['mu_std_over_sigma']:.2f}")
    for ex in report["examples"]:
        progress(f"[report] original:      {ex['original'][:160]!r}")
        progress(f"[report] reconstructed: {ex['reconstructed'][:160]!r}")


def latent_geometry(sums: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The latent space's scale, from the summed metrics: the posterior's mean sigma and the
    variance of mu across chunks, overall and per dimension. Their ratio says how far apart chunk
    means lie against one chunk's spread: what the energy loss of stage 2 can resolve."""
    n = float(sums["chunks"])
    var = mu_variance(sums["mu_sum"], sums["mu_sq_sum"], n)  # [l]
    sigma = torch.as_tensor(sums["sigma_sum"]).double() / n  # [l]
    return {"mean_sigma": float(sigma.mean()), "mu_var_mean": float(var.mean()), "mu_var_min": float(var.min()),
            "mu_var_max": float(var.max()), "mu_std_over_sigma": float((var.sqrt() / sigma.clamp_min(1e-12)).mean()),
            "mu_var_per_dim": [round(float(v), 6) for v in var], "sigma_per_dim": [round(float(v), 6) for v in sigma]}


def ae_report(cfg: Config, corpus: str, run: RunDir, max_chunks: int = 20000, examples: int = 3) -> dict[str, Any]:
    from calm_core.chunking import layout_of
    from pipelines.data.chunks import chunk_dataset
    from pipelines.data.ingest import load_corpus

    model, ae_cfg, tok, manifest = load_autoencoder_dir(run.local_artifact("ae"))
    _, val_docs, stats = load_corpus(corpus, cfg.data)
    split = "validation"
    if stats.documents.get("val", 0) == 0:
        split = "training (the corpus has no held-out documents)"
        val_docs, _, _ = load_corpus(corpus, cfg.data)
    rows = chunk_dataset(val_docs, tok, ae_cfg.ae.K, cfg.data.read_cpus,
                         layout=layout_of(ae_cfg.data.layout)).limit(max_chunks).take_all()
    chunks = torch.as_tensor(np.stack([np.asarray(r["tokens"], dtype=np.int64) for r in rows]))
    gen = torch.Generator().manual_seed(0)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(0, len(chunks), 1024):
            m = reconstruction_metrics(model, chunks[i : i + 1024], tok.pad_id, ae_cfg.ae.eval_noise_std, gen)
            for k, v in m.items():
                v = torch.as_tensor(v, dtype=torch.float64)
                sums[k] = sums[k] + v if k in sums else v
    n_tok = float(sums["tokens"])
    report = {
        "split": split,
        "chunks": int(sums["chunks"]),
        "tokens": int(n_tok),
        "acc_mu": float(sums["correct_mu"]) / n_tok,
        "acc_sample": float(sums["correct_sample"]) / n_tok,
        "acc_noise": float(sums["correct_noise"]) / n_tok,
        "noise_std": ae_cfg.ae.eval_noise_std,
        "active_dims": active_dims(sums["mu_sum"], sums["mu_sq_sum"], float(sums["chunks"])),
        "latent_dim": ae_cfg.ae.latent_dim,
        "ae_step": manifest["metrics"].get("step"),
        **latent_geometry(sums),
    }
    shown = _examples(model, tok, rows, examples)
    report["examples"] = shown

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        write_manifest(tmp, "ae_reconstruction", inputs={"ae_manifest_files": manifest["files"], "corpus": corpus},
                       metrics={k: v for k, v in report.items() if k != "examples" and not k.endswith("_per_dim")})
        uri = run.publish_artifact(tmp, ARTIFACT)
    _print_report(report)
    progress(f"[report] wrote {uri}/report.json")
    return report
