"""BrierLM: a likelihood-free language-model metric (CALM.md section 3).

Brier score of a predictive distribution P at the observed outcome y (higher is better):

    Brier(P, y) = 2 P(y) - sum_x P(x)^2

Two independent samples x1, x2 ~ P give an unbiased estimate without any likelihood:

    E[ 1[x1 = y] + 1[x2 = y] - 1[x1 = x2] ] = 2 P(y) - sum_x P(x)^2

Brier-n takes the next n tokens as one outcome; over a corpus it is the mean of the per-position
estimates. Each Brier-n is clamped at 0 (an estimate can be negative: a confident wrong model, or
estimator noise) and then

    BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4) ^ (1/4)

Clamping each term, not only the product, keeps two negative terms from multiplying into a large
positive score. A perfect deterministic predictor scores 100.

With R >= 2 independent samples the U-statistic over all pairs is unbiased too and has less
variance (R = 2 is the rule above):

    (2 / R) sum_r 1[x_r = y]  -  (2 / (R (R - 1))) sum_{r < r'} 1[x_r = x_r']       (``brier_u_statistic``)

For CALM, the x_r are the first n tokens of independently sampled and decoded next chunks. For a
softmax model they are sampled continuations, and its probabilities give more (``brier_n_from_probs``):
P(y_1..n) exactly by teacher forcing, and the collision term sum_x P(x)^2 = E_{x ~ P}[P(x)] from the
exact probabilities of the sampled continuations (exactly, sum_x P(x)^2, for n = 1):

    Brier-n  =  2 P(y_1..n)  -  (1 / R) sum_r P(x_r,1..n)

Both estimators have the same expectation; the second has far less variance.
"""

from __future__ import annotations

import torch

ORDERS = (1, 2, 3, 4)


def brier_u_statistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position unbiased estimate from R >= 2 samples: x [P, R, n], y [P, n] -> [P] float."""
    R = x.shape[1]
    if R < 2:
        raise ValueError(f"the sample estimate of the Brier score needs at least 2 samples, got {R}")
    hits = (x == y[:, None]).all(-1).float().sum(1)  # [P]
    same = (x[:, :, None] == x[:, None]).all(-1).float()  # [P, R, R]
    pairs = (same.sum((1, 2)) - R) / 2  # [P] pairs r < r' that coincide
    return 2.0 * hits / R - 2.0 * pairs / (R * (R - 1))


def brier_n_estimates(x: torch.Tensor, y: torch.Tensor, orders: tuple[int, ...] = ORDERS) -> dict[int, torch.Tensor]:
    """Per-position Brier-n for every n in ``orders`` from the first n tokens of R sampled
    continuations: x [P, R, >= max(orders)], y [P, >= max(orders)] -> {n: [P]}."""
    if x.shape[-1] < max(orders):
        raise ValueError(f"continuations of {x.shape[-1]} tokens cannot give Brier-{max(orders)}")
    return {n: brier_u_statistic(x[..., :n], y[:, :n]) for n in orders}


def brier_n_from_probs(logp_true: torch.Tensor, logp_samples: torch.Tensor, collision1: torch.Tensor | None = None,
                       orders: tuple[int, ...] = ORDERS) -> dict[int, torch.Tensor]:
    """Per-position Brier-n of an autoregressive model from its probabilities.

    logp_true [P, n_max]: log P(y_i | context, y_<i) of the true continuation (teacher forcing);
    logp_samples [P, R, n_max]: the same along R sampled continuations; collision1 [P] (optional):
    the exact sum_x P(x)^2 of the first token. -> {n: [P]} = 2 P(y_1..n) - mean_r P(x_r,1..n).
    """
    if logp_true.shape[-1] < max(orders):
        raise ValueError(f"continuations of {logp_true.shape[-1]} tokens cannot give Brier-{max(orders)}")
    p_true = logp_true.double().cumsum(-1).exp()  # [P, n_max]
    p_samp = logp_samples.double().cumsum(-1).exp().mean(1)  # [P, n_max]
    out = {n: 2.0 * p_true[:, n - 1] - p_samp[:, n - 1] for n in orders}
    if collision1 is not None and 1 in out:
        out[1] = 2.0 * p_true[:, 0] - collision1.double()
    return out


def brier1_exact(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact per-position Brier-1 of a categorical prediction: probs [P, V], y [P] -> [P]."""
    p = probs.float()
    return 2.0 * p.gather(-1, y.long().unsqueeze(-1)).squeeze(-1) - p.pow(2).sum(-1)


def brier_lm(brier_n: dict[int, float]) -> float:
    """100 * geometric mean of max(0, Brier-n) over n = 1..4 (``brier_n``: corpus means)."""
    missing = [n for n in ORDERS if n not in brier_n]
    if missing:
        raise ValueError(f"BrierLM needs Brier-n for n = 1..4; missing {missing}")
    prod = 1.0
    for n in ORDERS:
        prod *= max(0.0, float(brier_n[n]))
    return 100.0 * prod ** 0.25


def brier_lm_official(brier_n: dict[int, float]) -> float:
    """BrierLM as the official evaluation combines it: 100 * max(0, Brier-1 * .. * Brier-4)^(1/4).
    Only the product is clamped, so two negative terms give a positive score (``brier_lm`` clamps each
    term); reported beside it under ``eval.protocol=paper``."""
    prod = 1.0
    for n in ORDERS:
        prod *= float(brier_n[n])
    return 100.0 * max(0.0, prod) ** 0.25
