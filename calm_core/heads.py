"""Next-vector heads on top of the backbone's hidden state h (CALM.md section 2).

Two energy heads (config ``head.arch``), both likelihood-free one-step samplers g(h, eps) with
eps ~ U(-0.5, 0.5)^noise_dim (``head.noise``: or N(0, I), an ablation), trained with the energy score (calm_core.energy); each call with fresh
noise is an independent sample of the next latent. Their last Linear is zero-initialised, so at
init every sample equals the final bias (0).

PaperEnergyHead (``arch: paper``), the official code's ``MLPGenerator``, width d = the backbone's
(``head.width_ratio`` scales it: W_h then maps the backbone's h to the head's width, and d below is
that width):
    x_0 = LayerNorm(W_e eps)                     c = LayerNorm(W_h h)                      [.., N, d], [.., 1, d]
    x_i = x_{i-1} + W_down(SiLU(g) * u),   [g, u] = MLP(concat(LayerNorm(x_{i-1}), c)),  i = 1..blocks
          MLP = Linear(2d, d), SiLU, Linear(d, d), SiLU, Linear(d, 2d)        (every Linear with bias)
    z   = Linear(d, l)(SiLU(Linear(d, d)(LayerNorm(x_blocks))))              [.., N, l]
The first Linear of each block is split: Linear(2d, d)([a, c]) = W_a a + (W_c c + b), and the c half
W_c c + b is the same for all N samples of a position, so it is computed once per position (the
same function, N-fold cheaper for that half; ``per_position_weights`` counts it once).

AdaNormEnergyHead (``arch: adanorm``), this project's first head:
    c = RMSNorm(W_h h),  u_0 = RMSNorm(W_u eps)
    u_i = u_{i-1} + SwiGLU(RMSNorm(u_{i-1}) * (1 + s_i(c)) + b_i(c))   s_i, b_i zero-initialised
    z   = W_z RMSNorm(u_blocks)
With s_i, b_i = 0 at init it starts as an unconditioned MLP on noise: it ignores h until the
modulation learns, and the modulation runs once per position.

Initialisation (``head.init``): "normal" draws every Linear weight from N(0, 0.02^2) with zero
biases, like the backbone and the official code; "torch" keeps PyTorch's default (Kaiming-uniform)
initialisation. Either way the last Linear is then zeroed.

QuadraticHead (the seed's ablation): a point prediction zhat = W h with energy
E(z) = 0.5 ||zhat - z||^2, trained by regression (its expectation over the posterior of the true
chunk, in closed form), optionally with a margin term max(0, gamma + E(true) - E(negative)) against
negatives taken from other positions. It samples z ~ N(zhat, T s^2 I), where s^2, the buffer
``spread``, is fitted during training to the mean squared error per dimension against the
posterior draws (a running average of 2 E(y) / l): a Gaussian with the data's spread around the
point prediction, not a learned distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_core import rng
from calm_core.layers import RMSNorm, SwiGLU, init_weights, matmul_weights


def noise_from_uniform(u: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """The head's noise from uniform draws u ~ U[0, 1): ``uniform`` eps = u - 0.5 (the official
    code's draw, exactly), ``gaussian`` eps = Phi^-1(u) ~ N(0, 1) (``head.noise``: an ablation).
    Every head draw goes through here, so a recorded official draw replays as u = noise + 0.5."""
    if kind == "uniform":
        return u - 0.5
    if kind == "gaussian":
        return torch.special.ndtri(u.float().clamp(1e-7, 1 - 1e-7)).to(u.dtype)
    raise ValueError(f"unknown head noise {kind!r} (uniform | gaussian)")


def _noise(h: torch.Tensor, n_samples: int, noise_dim: int, generator: rng.Gen, kind: str = "uniform",
           u: torch.Tensor | None = None) -> torch.Tensor:
    """eps per sample: h [.., d] -> [.., N, noise_dim] in h's dtype. ``u`` [.., N, noise_dim]: the
    uniform draws to use (a replay) instead of fresh ones."""
    if u is None:
        u = rng.uniform((*h.shape[:-1], n_samples, noise_dim), h.device, generator)
    return noise_from_uniform(u.float(), kind).to(h.dtype)


def init_head(head: nn.Module, last: nn.Linear, scheme: str) -> None:
    """``scheme`` "normal": N(0, 0.02^2) weights, zero biases; "torch": PyTorch's default. Then the
    last Linear is zeroed (every sample starts at 0)."""
    if scheme == "normal":
        init_weights(head)
    elif scheme != "torch":
        raise ValueError(f"unknown head init {scheme!r} (normal | torch)")
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


# ----------------------------------------------------------------------------- the paper's head


class PaperBlock(nn.Module):
    """x + W_down(SiLU(g) * u), [g, u] = MLP(concat(LayerNorm(x), c)), the c half precomputed."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.in_x = nn.Linear(d, d)  # the x half of Linear(2d, d), with the bias
        self.in_c = nn.Linear(d, d, bias=False)  # the c half: once per position
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, 2 * d)
        self.down = nn.Linear(d, d)

    def cond(self, c: torch.Tensor) -> torch.Tensor:  # [.., 1, d] -> [.., 1, d]
        return self.in_c(c)

    def forward(self, x: torch.Tensor, c_proj: torch.Tensor) -> torch.Tensor:  # x [.., N, d], c_proj [.., 1, d]
        a = F.silu(self.in_x(self.norm(x)) + c_proj)  # = SiLU(Linear(2d, d)(concat(LN(x), c)))   [.., N, d]
        g, u = self.out(F.silu(self.mid(a))).chunk(2, dim=-1)  # [.., N, d] x 2
        return x + self.down(F.silu(g) * u)


class PaperEnergyHead(nn.Module):
    def __init__(self, d: int, latent_dim: int, blocks: int, noise_dim: int = 64, init: str = "normal",
                 noise: str = "uniform", ln_eps: float = 1e-5, width: int = 0):
        super().__init__()
        d_in, d = d, width or d  # the backbone's width in, the head's width inside
        self.noise_dim, self.noise_kind = noise_dim, noise
        self.noise = nn.Linear(noise_dim, d)
        self.noise_norm = nn.LayerNorm(d, eps=ln_eps)
        self.cond = nn.Linear(d_in, d)
        self.cond_norm = nn.LayerNorm(d, eps=ln_eps)
        self.blocks = nn.ModuleList([PaperBlock(d, ln_eps) for _ in range(max(1, blocks))])
        self.out_norm = nn.LayerNorm(d, eps=ln_eps)
        self.out_hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, latent_dim)
        init_head(self, self.out, init)

    def forward(self, h: torch.Tensor, n_samples: int, generator: rng.Gen = None,
                u: torch.Tensor | None = None) -> torch.Tensor:
        """h [.., d] -> n_samples independent samples [.., n_samples, l] (``u``: replayed uniform draws
        [.., n_samples, noise_dim])."""
        eps = _noise(h, n_samples, self.noise_dim, generator, self.noise_kind, u)  # [.., N, noise_dim]
        c = self.cond_norm(self.cond(h)).unsqueeze(-2)  # [.., 1, d]
        x = self.noise_norm(self.noise(eps))  # [.., N, d]
        for block in self.blocks:
            x = block(x, block.cond(c))
        return self.out(F.silu(self.out_hidden(self.out_norm(x))))  # [.., N, l]

    def per_position_weights(self) -> int:
        """Weights applied once per position, whatever N: W_h and each block's c half."""
        return self.cond.weight.numel() + sum(b.in_c.weight.numel() for b in self.blocks)


# ----------------------------------------------------------------------------- the AdaNorm head


class AdaBlock(nn.Module):
    """u + SwiGLU(RMSNorm(u) * (1 + scale(c)) + shift(c)): a residual MLP conditioned on c."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.norm = RMSNorm(d)
        self.mod = nn.Linear(d, 2 * d)  # c -> (scale, shift), zero-initialised: starts as a plain block
        self.mlp = SwiGLU(d, ffn)

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # u [.., N, d], c [.., 1, d]
        scale, shift = self.mod(c).chunk(2, dim=-1)  # once per position  [.., 1, d] x 2
        return u + self.mlp(self.norm(u) * (1 + scale) + shift)


class AdaNormEnergyHead(nn.Module):
    def __init__(self, d: int, latent_dim: int, ffn: int, blocks: int, noise_dim: int = 64, init: str = "torch",
                 noise: str = "uniform", width: int = 0):
        super().__init__()
        d_in, d = d, width or d  # the backbone's width in, the head's width inside (the SwiGLU's ffn scaled with it)
        ffn = ffn * d // d_in
        self.noise_dim, self.noise_kind = noise_dim, noise
        self.cond = nn.Linear(d_in, d)
        self.cond_norm = RMSNorm(d)
        self.noise = nn.Linear(noise_dim, d)
        self.noise_norm = RMSNorm(d)
        self.blocks = nn.ModuleList([AdaBlock(d, ffn) for _ in range(max(1, blocks))])
        self.out_norm = RMSNorm(d)
        self.out = nn.Linear(d, latent_dim)
        init_head(self, self.out, init)
        for b in self.blocks:  # the modulation starts at zero under either scheme
            nn.init.zeros_(b.mod.weight)
            nn.init.zeros_(b.mod.bias)

    def forward(self, h: torch.Tensor, n_samples: int, generator: rng.Gen = None,
                u: torch.Tensor | None = None) -> torch.Tensor:
        """h [.., d] -> n_samples independent samples [.., n_samples, l] (``u``: replayed uniform draws)."""
        eps = _noise(h, n_samples, self.noise_dim, generator, self.noise_kind, u)  # [.., N, noise_dim]
        c = self.cond_norm(self.cond(h)).unsqueeze(-2)  # [.., 1, d]
        u = self.noise_norm(self.noise(eps))  # [.., N, d]
        for block in self.blocks:
            u = block(u, c)
        return self.out(self.out_norm(u))  # [.., N, l]

    def per_position_weights(self) -> int:
        """Weights applied once per position, whatever N: W_h and each block's modulation."""
        return self.cond.weight.numel() + sum(b.mod.weight.numel() for b in self.blocks)


EnergyHead = (PaperEnergyHead, AdaNormEnergyHead)  # for isinstance checks


def build_energy_head(arch: str, d: int, latent_dim: int, ffn: int, blocks: int, noise_dim: int,
                      init: str, noise: str = "uniform", ln_eps: float = 1e-5, width: int = 0) -> nn.Module:
    """The energy head on a backbone of width ``d``; ``width`` (0: d) is the head's own width."""
    if arch == "paper":
        return PaperEnergyHead(d, latent_dim, blocks, noise_dim, init, noise, ln_eps, width)
    if arch == "adanorm":
        return AdaNormEnergyHead(d, latent_dim, ffn, blocks, noise_dim, init, noise, width)
    raise ValueError(f"unknown head arch {arch!r} (paper | adanorm)")


def head_forward_weights(head: nn.Module, n_samples: int) -> float:
    """Weights a forward pass multiplies per position with N samples (2x this = forward FLOPs):
    the per-position ones (``per_position_weights``) once, the rest N times."""
    once = head.per_position_weights()
    return float(once + n_samples * (matmul_weights(head) - once))


# ----------------------------------------------------------------------------- the quadratic ablation


class QuadraticHead(nn.Module):
    """zhat = W h; E(z) = 0.5 ||zhat - z||^2 (the seed's quadratic energy)."""

    SPREAD_MOMENTUM = 0.99  # running average of the fitted spread over training steps

    def __init__(self, d: int, latent_dim: int):
        super().__init__()
        self.proj = nn.Linear(d, latent_dim)
        self.register_buffer("spread", torch.ones(()))  # s: RMS error per latent dimension

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [.., d] -> [.., l]
        return self.proj(h)

    def per_position_weights(self) -> int:
        """All of them: the point prediction is made once per position (its samples are noise)."""
        return self.proj.weight.numel()

    @torch.no_grad()
    def fit_spread(self, expected_energy: torch.Tensor, latent_dim: int) -> None:
        """s^2 <- running average of 2 E_y[E(y)] / l = E ||y - zhat||^2 / l (training only)."""
        s = (2.0 * expected_energy.detach().float() / latent_dim).clamp_min(0).sqrt()
        self.spread.mul_(self.SPREAD_MOMENTUM).add_((1 - self.SPREAD_MOMENTUM) * s.to(self.spread))

    def sample(self, h: torch.Tensor, n_samples: int, temperature: float = 1.0,
               generator: rng.Gen = None) -> torch.Tensor:
        """Samples of N(zhat, T s^2 I): [.., d] -> [.., n_samples, l]."""
        zhat = self.proj(h).unsqueeze(-2)  # [.., 1, l]
        noise = rng.normal((*zhat.shape[:-2], n_samples, zhat.shape[-1]), h.device, generator, zhat.dtype)
        return zhat + (temperature ** 0.5) * self.spread.to(zhat.dtype) * noise


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
