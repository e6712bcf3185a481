"""Next-vector heads on top of the backbone's hidden state h (CALM.md section 2).

EnergyHead (the default; likelihood-free, one step):
    c    = RMSNorm(W_h h)                          the condition                     [.., d]
    u    = RMSNorm(W_u eps),  eps ~ U(-0.5, 0.5)^noise_dim                            [.., N, d]
    u   <- u + SwiGLU(AdaNorm(u; c))   per block,  AdaNorm(u; c) = RMSNorm(u) * (1 + s(c)) + b(c)
    z    = W_z RMSNorm(u)                          W_z zero-initialised               [.., N, l]
Each call with fresh noise is an independent sample of the next latent; trained with the energy
score (calm_core.energy). Paper: one block per four backbone layers, noise width 64.

QuadraticHead (the seed's ablation): a point prediction zhat = W h with energy
E(z) = 0.5 ||zhat - z||^2, trained by regression (its expectation over the posterior of the true
chunk, in closed form), optionally with a margin term max(0, gamma + E(true) - E(negative)) against
negatives taken from other positions.
Its temperature-T sampling is z ~ N(zhat, T * s^2 I) with s^2 the data spread (``spread``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_core.layers import RMSNorm, SwiGLU


class AdaBlock(nn.Module):
    """u + SwiGLU(RMSNorm(u) * (1 + scale(c)) + shift(c)): a residual MLP conditioned on c."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.norm = RMSNorm(d)
        self.mod = nn.Linear(d, 2 * d)  # c -> (scale, shift), zero-initialised: starts as a plain block
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)
        self.mlp = SwiGLU(d, ffn)

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # u [.., N, d], c [.., 1, d]
        scale, shift = self.mod(c).chunk(2, dim=-1)
        return u + self.mlp(self.norm(u) * (1 + scale) + shift)


class EnergyHead(nn.Module):
    def __init__(self, d: int, latent_dim: int, ffn: int, blocks: int, noise_dim: int = 64):
        super().__init__()
        self.noise_dim = noise_dim
        self.cond = nn.Linear(d, d)
        self.cond_norm = RMSNorm(d)
        self.noise = nn.Linear(noise_dim, d)
        self.noise_norm = RMSNorm(d)
        self.blocks = nn.ModuleList([AdaBlock(d, ffn) for _ in range(max(1, blocks))])
        self.out_norm = RMSNorm(d)
        self.out = nn.Linear(d, latent_dim)
        nn.init.zeros_(self.out.weight)  # zero-initialised last layer (paper)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """h [.., d] -> n_samples independent samples [.., n_samples, l]."""
        eps = torch.rand(*h.shape[:-1], n_samples, self.noise_dim, device=h.device, dtype=h.dtype,
                         generator=generator) - 0.5  # U(-0.5, 0.5)  [.., N, noise_dim]
        c = self.cond_norm(self.cond(h)).unsqueeze(-2)  # [.., 1, d]
        u = self.noise_norm(self.noise(eps))  # [.., N, d]
        for block in self.blocks:
            u = block(u, c)
        return self.out(self.out_norm(u))  # [.., N, l]


class QuadraticHead(nn.Module):
    """zhat = W h; E(z) = 0.5 ||zhat - z||^2 (the seed's quadratic energy)."""

    def __init__(self, d: int, latent_dim: int):
        super().__init__()
        self.proj = nn.Linear(d, latent_dim)
        self.register_buffer("spread", torch.ones(()))  # data std of the latents, for sampling

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [.., d] -> [.., l]
        return self.proj(h)

    def sample(self, h: torch.Tensor, n_samples: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact temperature-T samples of N(zhat, T s^2 I): [.., d] -> [.., n_samples, l]."""
        zhat = self.proj(h).unsqueeze(-2)
        noise = torch.randn(*zhat.shape[:-2], n_samples, zhat.shape[-1], device=h.device, generator=generator)
        return zhat + (temperature ** 0.5) * self.spread * noise


def quadratic_loss(zhat: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, margin: float = 0.0,
                   weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quadratic energy E(y) = 0.5 ||zhat - y||^2 in expectation over the posterior of the true
    next chunk, y ~ N(mu, sigma^2) (closed form, no sampling):

        E_y E(y) = 0.5 (||zhat - mu||^2 + sum_i sigma_i^2)

    plus, if margin > 0, the hinge max(0, margin + E(mu) - E(mu_neg)) with the negative of position
    t taken from position t+1 of the same sequence. zhat, mu, log_sigma [B, T, l].
    Returns (loss, expected energy, hinge)."""
    sq = (zhat.float() - mu.float()).pow(2).sum(-1)  # [B, T]
    energy = 0.5 * (sq + (2 * log_sigma.float()).exp().sum(-1))
    hinge = torch.zeros_like(energy)
    if margin > 0 and zhat.shape[1] > 1:
        e_neg = 0.5 * (zhat.float() - mu.float().roll(-1, dims=1)).pow(2).sum(-1)
        hinge = F.relu(margin + 0.5 * sq - e_neg)
    w = torch.ones_like(energy) if weights is None else weights.float()
    total = w.sum().clamp_min(1e-12)
    e, g = (energy * w).sum() / total, (hinge * w).sum() / total
    return e + g, e, g
