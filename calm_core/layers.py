"""Building blocks shared by the autoencoder and (later) the stage-2 Transformer.

    RMSNorm(x)            = x / sqrt(mean_j(x_j^2) + eps) * g              g in R^dim, init 1
    SwiGLU(x)             = W2 (SiLU(W1 x) * (W3 x))                        no biases
    ResidualMLPBlock(x)   = x + SwiGLU(RMSNorm(x))                          pre-norm residual

All three act on the last dimension and keep every leading dimension: [..., dim] -> [..., dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g.

    Computed in fp32 and cast back, so that a bf16 model (DeepSpeed bf16) normalises without
    losing precision in the mean of squares. The parameter is called ``weight`` like
    ``torch.nn.RMSNorm``'s.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # [dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


class SwiGLU(nn.Module):
    """y = W2 (SiLU(W1 x) * (W3 x)), W1, W3: dim -> hidden (gate, up), W2: hidden -> dim (down)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # hidden activations: [..., hidden]


class ResidualMLPBlock(nn.Module):
    """y = x + SwiGLU(RMSNorm(x)): a pre-norm residual MLP block (a Transformer block's MLP half)."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        return x + self.mlp(self.norm(x))


def matmul_weights(module: nn.Module) -> int:
    """Entries of the module's 2-D weight matrices: the multiply-adds one input row costs (FLOP counts)."""
    return sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std^2) for every linear and embedding weight, zeros for biases; RMSNorm gains stay 1."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
