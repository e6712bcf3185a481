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

For CALM, x1 and x2 are the first n tokens of two independently sampled and decoded next chunks;
for a softmax model they are two sampled continuations, and Brier-1 can also be computed exactly
from its probabilities (``brier1_exact``).
"""

from __future__ import annotations

import torch

ORDERS = (1, 2, 3, 4)


def brier_two_sample(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position unbiased estimate from two samples: x1, x2, y [P, n] (n-grams) -> [P] float."""
    hit1 = (x1 == y).all(-1)
    hit2 = (x2 == y).all(-1)
    same = (x1 == x2).all(-1)
    return hit1.float() + hit2.float() - same.float()


def brier_n_estimates(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor,
                      orders: tuple[int, ...] = ORDERS) -> dict[int, torch.Tensor]:
    """Per-position Brier-n for every n in ``orders`` from the first n tokens of two sampled
    continuations: x1, x2, y [P, >= max(orders)] -> {n: [P]}."""
    if x1.shape[-1] < max(orders):
        raise ValueError(f"continuations of {x1.shape[-1]} tokens cannot give Brier-{max(orders)}")
    return {n: brier_two_sample(x1[:, :n], x2[:, :n], y[:, :n]) for n in orders}


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


class BrierAccumulator:
    """Sums per-position estimates over a corpus (and over ranks by adding ``sums``)."""

    def __init__(self, orders: tuple[int, ...] = ORDERS):
        self.orders = orders
        self.sums = {n: 0.0 for n in orders}
        self.count = 0

    def add(self, per_position: dict[int, torch.Tensor]) -> None:
        for n in self.orders:
            self.sums[n] += float(per_position[n].double().sum())
        self.count += int(per_position[self.orders[0]].numel())

    def means(self) -> dict[int, float]:
        return {n: self.sums[n] / max(1, self.count) for n in self.orders}

    def score(self) -> float:
        return brier_lm(self.means())
