"""Scoring held-out blocks with every model of a run: what one evaluation actor computes, in plain
PyTorch (no Ray; ``pipelines.eval.job`` runs it in Ray Data actors, the models loaded once each).

Per block of L chunks (tokens [b, L, K], the AE posteriors mu / log_sigma [b, L, l], a key [b]
that seeds the block's noise) it returns per-block sums, each a column:

    ae_*        the AE's reconstruction of every chunk (decoding mu, a posterior sample, mu + noise),
                correct tokens per frequency band of the training corpus [b, bands]
    calm_*      ``calm_core.evaluate.calm_block_scores`` (the in-training estimator: energy loss,
                Brier-1..4), ``calm_core.agreement`` latent MSE / cosine / energy score, agreement
                of a decoded head sample with the true next chunk, ROUGE-L, and the temperature
                sweep (accuracy and collision per temperature [b, temperatures])
    baseline_*  ``baseline_block_scores`` (cross-entropy, Brier-1..4 from probabilities and from
                samples at the chunk starts; under ``eval.protocol=paper`` the official estimator at
                every token position, ``baseline_every_token_scores``), agreement of a sampled
                K-token continuation, ROUGE-L, the sweep
    *_text      the predicted and true next chunks as text (joined by RS), for corpus BLEU

The temperature sweep runs on blocks whose key is a multiple of ``eval.sweep_every``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calm_core import agreement as A
from calm_core.artifacts import load_ae, load_model
from calm_core.autoencoder import ChunkAutoencoder, decode_tokens
from calm_core.baseline import TokenLM
from calm_core.calm_model import CALM
from calm_core.config import EvalConfig
from calm_core.evaluate import baseline_block_scores, baseline_every_token_scores, block_generators, calm_block_scores
from calm_core import rng
from calm_core.tokenizer import CalmTokenizer

RS = "\x1e"  # separates the texts of a block's positions


@dataclass
class Models:
    ae: ChunkAutoencoder
    tok: CalmTokenizer
    calm: CALM | None
    baseline: TokenLM | None
    band: torch.Tensor  # [V] frequency band of every token id
    device: torch.device

    @classmethod
    def load(cls, paths: dict[str, Path], band: np.ndarray, device: str = "cpu") -> "Models":
        """The AE (``paths["ae"]``) and the models among "calm" and "baseline" that ``paths`` names."""
        dev = torch.device(device)
        ae = load_ae(paths["ae"])
        calm = load_model(paths["calm"], "calm", expected_ae_sha256=ae.sha256).model if "calm" in paths else None
        base = load_model(paths["baseline"], "baseline").model if "baseline" in paths else None
        return cls(ae.model.to(dev).eval(), ae.tok, calm.to(dev).eval() if calm else None,
                   base.to(dev).eval() if base else None, torch.as_tensor(band, device=dev), dev)


def _text(m: Models, chunks: torch.Tensor) -> list[str]:
    skip = (m.tok.eot_id, m.tok.pad_id)
    return [m.tok.decode([i for i in row if i not in skip]) for row in chunks.tolist()]


def _text_scores(m: Models, pred: torch.Tensor, true: torch.Tensor, b: int, prefix: str) -> dict[str, np.ndarray]:
    """ROUGE-L F1 (rouge-score) per block over positions whose true chunk has text, and the texts."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    hyp, ref = _text(m, pred), _text(m, true)
    has = np.array([bool(r.strip()) for r in ref], dtype=np.float64)
    rouge = np.array([scorer.score(r, h)["rougeL"].fmeasure if r.strip() else 0.0 for h, r in zip(hyp, ref)])
    per = len(hyp) // b
    return {f"{prefix}rouge_l": rouge.reshape(b, per).sum(1), f"{prefix}text_positions": has.reshape(b, per).sum(1),
            f"{prefix}pred_text": np.array([RS.join(hyp[i * per:(i + 1) * per]) for i in range(b)], dtype=object),
            f"{prefix}true_text": np.array([RS.join(ref[i * per:(i + 1) * per]) for i in range(b)], dtype=object)}


def _agreement(pred: torch.Tensor, true: torch.Tensor, b: int, pad_id: int, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": A.per_block(v, b) for k, v in A.agreement(pred, true, pad_id).items()}


def _sweep(picks, true: torch.Tensor, keys: torch.Tensor, ev: EvalConfig, prefix: str) -> dict[str, torch.Tensor]:
    """Accuracy and collision per temperature [b, T] on the sweep's blocks (zeros elsewhere)."""
    b = len(keys)
    sel = torch.nonzero(keys % ev.sweep_every == 0).flatten()
    acc, col = torch.zeros(b, len(ev.temperatures), dtype=torch.float64), torch.zeros(b, len(ev.temperatures),
                                                                                      dtype=torch.float64)
    per = true.shape[0] // b
    if len(sel):
        rows = (sel[:, None] * per + torch.arange(per)).flatten().to(true.device)
        for i, t in enumerate(ev.temperatures):
            x1, x2 = picks(sel, t, block_generators(ev.seed + 2 + i, keys[sel]))
            tr = A.tradeoff(x1, x2, true[rows])
            acc[sel, i], col[sel, i] = A.per_block(tr["accuracy"], len(sel)).cpu(), A.per_block(tr["collision"], len(sel)).cpu()
    sweep_pos = torch.zeros(b, dtype=torch.float64)
    sweep_pos[sel] = float(per)
    return {f"{prefix}sweep_accuracy": acc, f"{prefix}sweep_collision": col, f"{prefix}sweep_positions": sweep_pos}


@torch.no_grad()
def ae_scores(m: Models, tok: torch.Tensor, mu: torch.Tensor, ls: torch.Tensor, keys: torch.Tensor,
              ev: EvalConfig) -> dict[str, torch.Tensor]:
    """Correct tokens per frequency band decoding mu, a posterior sample and mu + noise: [b, bands]
    (mu, log_sigma [b, L, l]: the encoder's posteriors that the latents hold, not recomputed)."""
    b, L, K = tok.shape
    flat = tok.flatten(0, 1)  # [b*L, K]
    mu, log_sigma = mu.flatten(0, 1), ls.flatten(0, 1)  # [b*L, l]
    gen = block_generators(ev.seed + 1000, keys).repeat(L)
    eps1, eps2 = rng.normal(tuple(mu.shape), mu.device, gen), rng.normal(tuple(mu.shape), mu.device, gen)
    n_bands = len(ev.band_edges) + 2  # the rank bands, the tail, the unseen
    keep = flat != m.tok.pad_id
    band = m.band[flat]  # [b*L, K]
    block = torch.arange(b, device=tok.device).repeat_interleave(L)[:, None].expand(-1, K)  # [b*L, K]
    index = (block * n_bands + band)[keep]

    def count(mask: torch.Tensor) -> torch.Tensor:
        return torch.bincount(index, weights=mask[keep].double(), minlength=b * n_bands).view(b, n_bands)

    out = {"ae_band_tokens": count(torch.ones_like(keep))}
    for name, z in (("mu", mu), ("sample", mu + log_sigma.exp() * eps1), ("noise", mu + ev.noise_std * eps2)):
        out[f"ae_band_{name}"] = count(decode_tokens(m.ae, z) == flat)
    return out


@torch.no_grad()
def calm_scores(m: Models, tok: torch.Tensor, mu: torch.Tensor, ls: torch.Tensor, keys: torch.Tensor,
                ev: EvalConfig) -> dict:
    model, b = m.calm, tok.shape[0]
    h = model.hidden(tok[:, :-1], mu[:, :-1])  # [b, L-1, d]: one backbone pass for every CALM metric
    out = {f"calm_{k}": v for k, v in calm_block_scores(model, m.ae, tok, mu, ls, ev.samples,
                                                         block_generators(ev.seed, keys), h).items()}
    gen = block_generators(ev.seed + 1, keys)
    out.update({f"calm_{k}": v for k, v in A.latent_scores(model, h, mu[:, 1:], model.hcfg.n_samples, gen).items()})
    true = tok[:, 1:].flatten(0, 1)  # [b*(L-1), K]
    pred, _ = A.calm_picks(model, m.ae, h, 1.0, ev.candidates, gen)
    out.update(_agreement(pred, true, b, m.tok.pad_id, "calm_"))
    out.update(_text_scores(m, pred, true, b, "calm_"))
    out.update(_sweep(lambda sel, t, g: A.calm_picks(model, m.ae, h[sel], t, ev.candidates, g), true, keys, ev, "calm_"))
    return out


@torch.no_grad()
def baseline_scores(m: Models, tok: torch.Tensor, keys: torch.Tensor, ev: EvalConfig) -> dict:
    lm, (b, L, K) = m.baseline, tok.shape
    flat = tok.flatten(1)  # [b, L*K]
    gen = block_generators(ev.seed, keys)
    brier = (baseline_every_token_scores(lm, flat, gen, m.tok.pad_id) if ev.protocol == "paper"  # the official estimator
             else baseline_block_scores(lm, flat, K, ev.samples, gen, m.tok.pad_id))
    out = {f"baseline_{k}": v for k, v in brier.items()}
    starts = torch.arange(K, L * K - K + 1, K, device=tok.device)  # the L-1 chunk starts CALM predicts at
    true = tok[:, 1:].flatten(0, 1)  # [b*(L-1), K]
    pred, _ = A.baseline_picks(lm, flat, starts, K, 1.0, block_generators(ev.seed + 1, keys))
    out.update(_agreement(pred, true, b, m.tok.pad_id, "baseline_"))
    out.update(_text_scores(m, pred, true, b, "baseline_"))
    out.update(_sweep(lambda sel, t, g: A.baseline_picks(lm, flat[sel], starts, K, t, g), true, keys, ev, "baseline_"))
    return out


def score_blocks(m: Models, batch: dict[str, np.ndarray], ev: EvalConfig, ae: bool = True) -> dict[str, np.ndarray]:
    """One batch of blocks -> per-block columns (the module docstring); ``ae``: with the AE's."""
    # copied once on purpose: Ray Data hands the batch's arrays over read-only (zero-copy)
    tok = torch.tensor(batch["tokens"], dtype=torch.long, device=m.device)  # [b, L, K]
    mu = torch.tensor(batch["mu"], dtype=torch.float32, device=m.device)
    ls = torch.tensor(batch["log_sigma"], dtype=torch.float32, device=m.device)
    keys = torch.tensor(batch["key"], dtype=torch.long)
    out: dict = {"key": keys, **(ae_scores(m, tok, mu, ls, keys, ev) if ae else {})}
    if m.calm is not None:
        out.update(calm_scores(m, tok, mu, ls, keys, ev))
    if m.baseline is not None:
        out.update(baseline_scores(m, tok, keys, ev))
    return {k: v if isinstance(v, np.ndarray) else v.double().cpu().numpy() if v.is_floating_point() or v.dtype == torch.bool
            else v.cpu().numpy() for k, v in out.items()}
