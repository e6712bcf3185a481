"""The energy score: CALM's likelihood-free training loss for the next-vector head (CALM.md section 2).

For a predictive distribution P (the head) and an observed vector y, the energy score

    S(P, y) = E ||X - X'||^alpha - 2 E ||X - y||^alpha ,      X, X' ~ P independent, alpha in (0, 2)

is strictly proper: E_{y~Q} S(P, y) is maximised only by P = Q (Szekely & Rizzo; Gneiting & Raftery
2007). alpha = 2 is proper but not strictly (it only sees the mean). CALM minimises its Monte-Carlo
negative with N head samples x_1..x_N and M targets y_1..y_M drawn from the frozen posterior of the
true next chunk:

    loss = (2 / (N M)) sum_{n,m} ||x_n - y_m||^alpha  -  (1 / (N (N - 1))) sum_{n != n'} ||x_n - x_n'||^alpha
           \\_______________ fidelity ______________/     \\______________ diversity _______________/

(paper: N = 8, M = 100, alpha = 1). Both sums are unbiased for their expectations, so the loss is
an unbiased estimate of -S averaged over the targets.

Cost. Materialising every difference x_n - y_m costs N*M*l floats per position; the distances only
need N*M: ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y, one batched matmul. The square root is taken of
max(d^2, eps), which keeps the gradient finite when two samples coincide (d = 0); distances are
computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calm_core import rng

DIST_EPS = 1e-12  # floor of the squared distance under the square root (gradient-safe at 0)


def pairwise_distances(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """||x_n - y_m||^alpha for every pair: x [..., N, l], y [..., M, l] -> [..., N, M] (fp32)."""
    x, y = x.float(), y.float()
    d2 = (x.pow(2).sum(-1)[..., :, None] + y.pow(2).sum(-1)[..., None, :]
          - 2.0 * torch.matmul(x, y.transpose(-1, -2)))  # [..., N, M]
    d2 = d2.clamp_min(DIST_EPS)
    return d2.pow(alpha / 2.0)  # (d^2)^(alpha/2) = d^alpha


@dataclass
class EnergyLoss:
    loss: torch.Tensor  # scalar: mean over positions of fidelity - diversity
    fidelity: torch.Tensor  # scalar: mean over positions of (2 / NM) sum ||x_n - y_m||^alpha
    diversity: torch.Tensor  # scalar: mean over positions of (1 / N(N-1)) sum_{n != n'} ||x_n - x_n'||^alpha


def energy_terms(samples: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (fidelity, diversity): samples [..., N, l], targets [..., M, l] -> ([...], [...])."""
    N = samples.shape[-2]
    if N < 2:
        raise ValueError("the energy score needs at least 2 head samples per position (N >= 2)")
    fidelity = 2.0 * pairwise_distances(samples, targets, alpha).mean(dim=(-2, -1))  # [...]
    return fidelity, _diversity(samples, alpha)


def _diversity(samples: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 / N(N-1)) sum_{n != n'} ||x_n - x_n'||^alpha: samples [..., N, l] -> [...]."""
    N = samples.shape[-2]
    self_d = pairwise_distances(samples, samples, alpha)  # [..., N, N]
    off_diag = ~torch.eye(N, dtype=torch.bool, device=samples.device)  # n != n'
    return (self_d * off_diag).sum(dim=(-2, -1)) / (N * (N - 1))


def _reduce(fid: torch.Tensor, div: torch.Tensor, weights: torch.Tensor | None) -> EnergyLoss:
    """Per-position terms [...] -> their (weighted) means as an EnergyLoss."""
    if weights is None:
        f, v = fid.mean(), div.mean()
    else:
        w = weights.float()
        total = w.sum().clamp_min(1e-12)
        f, v = (fid * w).sum() / total, (div * w).sum() / total
    return EnergyLoss(f - v, f, v)


def energy_score_loss(samples: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0,
                      weights: torch.Tensor | None = None) -> EnergyLoss:
    """The CALM energy loss.

    samples [..., N, l]: N >= 2 head samples per position; targets [..., M, l]: M targets per
    position; weights [...] (optional, e.g. 0 for padding positions): a weighted mean over positions.
    """
    fid, div = energy_terms(samples, targets, alpha)  # [...] each
    return _reduce(fid, div, weights)


def energy_score(samples: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Monte-Carlo S(P, y), higher is better, for one observation per position (an evaluation
    metric): samples [..., N, l], y [..., l] -> [...]."""
    fid, div = energy_terms(samples, y.unsqueeze(-2), alpha)
    return div - fid


def posterior_energy_terms(samples: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, n_targets: int,
                           alpha: float = 1.0, generator: torch.Generator | None = None,
                           eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (fidelity, diversity) against M targets y_m = mu + sigma * eps_m drawn from the
    posterior of the true next chunk, without materialising the targets.

    samples [B, T, N, l], mu / log_sigma [B, T, l] -> ([B, T], [B, T]). eps [B, T, M, l] ~ N(0, I) is
    drawn fresh per call, independently for every position (``calm_core.rng``). With a = x - mu and
    s = sigma:

        ||x_n - y_m||^2 = ||a_n||^2 - 2 (a_n * s) . eps_m + (s^2) . (eps_m^2)

    three matmul-shaped terms: memory B*T*N*M for the distances, never B*T*N*M*l. ``eps``
    [B, T, M, l]: given draws to use instead (a replay of recorded noise).
    """
    B, T, N, l = samples.shape
    if N < 2:
        raise ValueError("the energy score needs at least 2 head samples per position (N >= 2)")
    x = samples.float()
    a = x - mu.float().unsqueeze(-2)  # [B, T, N, l]
    s = log_sigma.float().exp().unsqueeze(-2)  # [B, T, 1, l]
    if eps is None:
        eps = rng.normal((B, T, n_targets, l), x.device, generator)  # [B, T, M, l]
    eps = eps.float()
    t1 = a.pow(2).sum(-1)  # [B, T, N]
    t2 = torch.matmul(a * s, eps.transpose(-1, -2))  # [B, T, N, M]
    t3 = torch.matmul(s.pow(2), eps.pow(2).transpose(-1, -2))  # [B, T, 1, M]
    d2 = (t1.unsqueeze(-1) - 2.0 * t2 + t3).clamp_min(DIST_EPS)  # [B, T, N, M]
    fid = 2.0 * d2.pow(alpha / 2.0).mean(dim=(-2, -1))  # [B, T]
    return fid, _diversity(x, alpha)


def posterior_energy_loss(samples: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, n_targets: int,
                          alpha: float = 1.0, weights: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> EnergyLoss:
    """``energy_score_loss`` with M posterior targets per position (``posterior_energy_terms``);
    samples [B, T, N, l], mu / log_sigma [B, T, l], weights [B, T] (optional)."""
    fid, div = posterior_energy_terms(samples, mu, log_sigma, n_targets, alpha, generator)
    return _reduce(fid, div, weights)


def energy_loss_flops_per_position(n_samples: int, n_targets: int, latent_dim: int) -> float:
    """Training FLOPs of the loss's matmuls per position (2 per multiply-add). Forward: the N x M cross
    term (a * s) eps^T, the 1 x M term s^2 (eps^2)^T and the N x N self-distances x x^T. Backward: the
    cross term's gradient for the samples (the targets need none), and the self-distances' for both
    of their operands (both are the samples)."""
    N, M, l = n_samples, n_targets, latent_dim
    forward = 2 * N * M * l + 2 * M * l + 2 * N * N * l
    backward = 2 * N * M * l + 2 * (2 * N * N * l)
    return float(forward + backward)
