"""Held-out evaluation of CALM and of the token baseline at the same points (CALM.md section 3).

Both models are scored at every chunk start of a held-out block of L chunks (L*K tokens): given
chunks 1..j, predict the first n tokens of chunk j+1, for j = 1..L-1. The context is the same for
both; only what each model predicts differs (a vector decoded into K tokens, or tokens one by one).

- CALM: R head samples of z_{j+1} per position, each decoded by the frozen AE (argmax), and the
  U-statistic of ``brier_u_statistic`` over their first n tokens. Also the energy loss with its
  fidelity and diversity terms.
- Baseline: cross-entropy and exact Brier-1 over every token; at the chunk starts, R sampled
  n-token continuations (``TokenLM.branches``) give both the probability estimate
  (``brier_n_from_probs``: exact P(y), the collision term from the samples' exact probabilities,
  Brier-1 fully exact) and the sample-only U-statistic, which must agree in expectation.

The functions return sums (float64 [1] tensors) so ranks can all-reduce them before
``heldout_record`` turns them into means and BrierLM.
"""

from __future__ import annotations

import torch

from calm_core.autoencoder import ChunkAutoencoder, decode_tokens
from calm_core.baseline import TokenLM
from calm_core.brierlm import ORDERS, brier1_exact, brier_lm, brier_n_estimates, brier_n_from_probs
from calm_core.calm_model import CALM

Sums = dict[str, torch.Tensor]
BRANCHES_PER_PASS = 4096  # sampled baseline continuations decoded together (memory: this x vocabulary floats)


def _as_sums(sums: dict[str, float]) -> Sums:
    return {k: torch.tensor([v], dtype=torch.float64) for k, v in sums.items()}


def _add(sums: dict[str, float], prefix: str, per_position: dict[int, torch.Tensor]) -> None:
    for n in ORDERS:
        sums[f"{prefix}{n}"] += float(per_position[n].double().sum())


def calm_heldout(model: CALM, ae: ChunkAutoencoder, val: dict[str, torch.Tensor], batch: int,
                 samples: int = 2, seed: int = 0) -> Sums:
    """Sums over held-out blocks (tokens [N, L, K], mu / log_sigma [N, L, l]): energy loss parts and
    Brier-n from ``samples`` decoded head samples at each of the L-1 chunk starts."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sums = {"loss": 0.0, "fidelity": 0.0, "diversity": 0.0, "blocks": 0.0, "positions": 0.0,
            **{f"brier{n}": 0.0 for n in ORDERS}}
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(val["tokens"]), batch):
            tok, mu, ls = (val[k][i : i + batch].to(device) for k in ("tokens", "mu", "log_sigma"))
            out = model(tok, mu, ls, generator=g)
            b = tok.shape[0]
            for k in ("loss", "fidelity", "diversity"):
                sums[k] += float(getattr(out, k)) * b
            sums["blocks"] += b
            z = model.sample(out.hidden, samples, generator=g)  # [b, L-1, R, l]
            chunks = decode_tokens(ae, z).flatten(0, 1)  # [P, R, K]
            truth = tok[:, 1:].flatten(0, 1)  # [P, K]
            _add(sums, "brier", brier_n_estimates(chunks, truth))
            sums["positions"] += truth.shape[0]
    model.train(was)
    return _as_sums(sums)


def baseline_heldout(lm: TokenLM, val: dict[str, torch.Tensor], batch: int, K: int, samples: int = 2,
                     seed: int = 0, pad_id: int = -100) -> Sums:
    """Sums over held-out blocks (tokens [N, L, K]): cross-entropy, exact Brier-1 over every token,
    and at the L-1 chunk starts Brier-n from probabilities and from ``samples`` samples. The
    cross-entropy ignores ``pad_id`` targets, as training does. One teacher-forced pass per block
    (inside ``TokenLM.branches``) serves all of them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sums = {"loss": 0.0, "loss_tokens": 0.0, "blocks": 0.0, "brier1_exact": 0.0, "tokens": 0.0, "positions": 0.0,
            **{f"brier{n}": 0.0 for n in ORDERS}, **{f"sampled_brier{n}": 0.0 for n in ORDERS}}
    if len(val["tokens"]) == 0:
        return _as_sums(sums)
    device = next(lm.parameters()).device
    n = max(ORDERS)
    T = val["tokens"][0].numel()
    starts = torch.arange(K, T - n + 1, K, device=device)  # chunk starts with n true tokens after them
    rows = max(1, min(batch, BRANCHES_PER_PASS // (len(starts) * samples)))  # bounds the [rows, S*R, V] logits
    was = lm.training
    lm.eval()
    with torch.no_grad():
        for i in range(0, len(val["tokens"]), rows):
            tok = val["tokens"][i : i + rows].to(device).flatten(1).long()  # [b, L*K]
            br = lm.branches(tok, starts, n, samples, generator=g)
            logp, target = br.logp_next[:, :-1].flatten(0, 1), tok[:, 1:].flatten()  # [b*(T-1), V], [b*(T-1)]
            keep = target != pad_id
            sums["loss"] -= float(logp[keep].gather(-1, target[keep, None]).sum())
            sums["loss_tokens"] += int(keep.sum())
            sums["brier1_exact"] += float(brier1_exact(logp.exp(), target).sum())
            sums["blocks"] += tok.shape[0]
            sums["tokens"] += target.numel()
            _add(sums, "brier", brier_n_from_probs(br.logp_true.flatten(0, 1), br.logp.flatten(0, 1),
                                                  br.collision1.flatten()))
            truth = tok[:, starts[:, None] + torch.arange(n, device=device)].flatten(0, 1)  # [P, n]
            _add(sums, "sampled_brier", brier_n_estimates(br.samples.flatten(0, 1), truth))
            sums["positions"] += truth.shape[0]
    lm.train(was)
    return _as_sums(sums)


def heldout_record(kind: str, tot: Sums) -> dict[str, float]:
    """Means and BrierLM from (all-reduced) sums: val_loss (CALM: per block; baseline: per non-pad
    token), val_brier1..4, val_brierlm, and
    CALM: val_fidelity, val_diversity; baseline: val_brier1_exact (every token) and
    val_sampled_brier1..4 / val_sampled_brierlm (the sample-only estimate beside the main one)."""
    blocks = max(1.0, float(tot["blocks"]))
    pos = max(1.0, float(tot["positions"]))
    brier = {n: float(tot[f"brier{n}"]) / pos for n in ORDERS}
    loss = float(tot["loss"]) / (blocks if kind == "calm" else max(1.0, float(tot["loss_tokens"])))
    rec = {"val_loss": loss, **{f"val_brier{n}": brier[n] for n in ORDERS},
           "val_brierlm": brier_lm(brier), "val_positions": pos}
    if kind == "calm":
        rec["val_fidelity"] = float(tot["fidelity"]) / blocks
        rec["val_diversity"] = float(tot["diversity"]) / blocks
    else:
        rec["val_brier1_exact"] = float(tot["brier1_exact"]) / max(1.0, float(tot["tokens"]))
        sampled = {n: float(tot[f"sampled_brier{n}"]) / pos for n in ORDERS}
        rec.update({f"val_sampled_brier{n}": sampled[n] for n in ORDERS})
        rec["val_sampled_brierlm"] = brier_lm(sampled)
    return rec
