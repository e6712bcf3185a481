"""The causal Transformer backbone shared by CALM (over chunk positions) and the token baseline
(over token positions): pre-norm blocks with RMSNorm, rotary position embeddings and SwiGLU.

    a_t  = x_t + W_o Attn(RoPE(W_q n_t), RoPE(W_k n_1..t), W_v n_1..t)     n = RMSNorm(x)   causal
    x'_t = a_t + SwiGLU(RMSNorm(a_t))
    out  = RMSNorm(x_L)                                                    no LM head here

RoPE (Su et al. 2021) rotates pair i of a head by the angle t * theta^(-2i/h) (h = head width), so
q_s . k_t depends only on s - t. Which features form pair i is ``rope_pairing``: "adjacent" pairs
(q_{2i}, q_{2i+1}) (this project's models), "halves" pairs (q_i, q_{i+h/2}) (Llama's rotate-half,
the official CALM code). The two are the same function up to a fixed permutation of the q/k
features, so a model trained with one cannot be run with the other. Attention is
``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)``; with ``n_kv_heads`` <
``n_heads`` (grouped-query attention) each key/value head serves n_heads / n_kv_heads query heads.

Incremental use (``Backbone.extend``): the rotated keys and values of earlier positions are kept
(``past``, one (k, v) pair per layer); new positions carry explicit RoPE positions and attend to the
past and to each other under a boolean mask (default: everything before them). One cached prefix
can so be continued along many branches at once (each branch masks the past it may see), which is
how the baseline's continuations at every chunk start are sampled in one pass per token.
Shapes: B batch, T positions, d width, H heads, h = d / H, Tp cached positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_core.layers import RMSNorm, SwiGLU

KV = tuple[torch.Tensor, torch.Tensor]  # rotated keys and values of one layer, [B, H, T, h] each


def rope_tables(positions: int | torch.Tensor, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim / 2] for positions 0..T-1 (an int T) or for the given positions [T]
    (or [B, T]: each row its own positions -> [B, T, head_dim / 2])."""
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [.., T, h/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "adjacent") -> torch.Tensor:
    """Rotate pairs of features: x [B, H, T, h] -> [B, H, T, h] (pairs by ``pairing``, see above)."""
    xf = x.float()
    if pairing == "halves":
        x1, x2 = xf.chunk(2, dim=-1)  # [B, H, T, h/2] each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # [B, H, T, h/2] each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [B, H, T, h/2, 2]
    return out.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv_heads: int = 0, rope_pairing: str = "adjacent"):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"d_model {d} / n_heads {n_heads} / n_kv_heads {n_kv_heads} do not divide")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.rope_pairing = rope_pairing
        self.qkv = nn.Linear(d, d + 2 * n_kv_heads * self.head_dim, bias=False)  # [q | k | v] rows
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KV | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """x [B, T, d] -> (y [B, T, d], the layer's cache: rotated (k, v) [B, H, Tp + T, h], past first).
        Without ``past`` attention is causal; with it, ``mask`` [T, Tp + T] or [B, 1, T, Tp + T]
        (True = may attend)."""
        B, T, d = x.shape
        H, Hkv, h = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * h, Hkv * h, Hkv * h], dim=-1)
        q = q.view(B, T, H, h).transpose(1, 2)  # [B, H, T, h]
        k, v = k.view(B, T, Hkv, h).transpose(1, 2), v.view(B, T, Hkv, h).transpose(1, 2)  # [B, Hkv, T, h]
        q, k = apply_rope(q, cos, sin, self.rope_pairing), apply_rope(k, cos, sin, self.rope_pairing)
        gqa = Hkv != H
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # [B, H, T, h]
        else:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, Hkv, Tp + T, h]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(B, T, d)), (k, v)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, ffn: int, n_kv_heads: int = 0, eps: float = 1e-6,
                 rope_pairing: str = "adjacent"):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(d, eps), CausalSelfAttention(d, n_heads, n_kv_heads, rope_pairing)
        self.mlp_norm, self.mlp = RMSNorm(d, eps), SwiGLU(d, ffn)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KV | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn(self.attn_norm(x), cos, sin, past, mask)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class Backbone(nn.Module):
    """x [B, T, d] (already embedded inputs) -> hidden states [B, T, d], causal."""

    def __init__(self, d: int, n_layers: int, n_heads: int, ffn: int, rope_theta: float = 10000.0,
                 n_kv_heads: int = 0, eps: float = 1e-6, rope_pairing: str = "adjacent"):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, n_heads, ffn, n_kv_heads, eps, rope_pairing) for _ in range(n_layers)])
        self.norm = RMSNorm(d, eps)
        self.head_dim, self.rope_theta = d // n_heads, rope_theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x)[0]

    def prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, list[KV]]:
        """Causal pass over positions 0..T-1: x [B, T, d] -> (hidden [B, T, d], per-layer (k, v))."""
        cos, sin = rope_tables(x.shape[1], self.head_dim, self.rope_theta, x.device)
        cache = []
        for block in self.blocks:
            x, kv = block(x, cos, sin)
            cache.append(kv)
        return self.norm(x), cache

    def extend(self, x: torch.Tensor, positions: torch.Tensor, past: list[KV],
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
        """New positions after a cached ``past`` (per layer (k, v) [B, H, Tp, h]).

        x [B, T, d] at RoPE ``positions`` [T]; ``mask`` [T, Tp + T] (True = may attend; default:
        all of the past and causal among the new) -> (hidden [B, T, d], the past extended by them).
        Rows of different lengths (``calm_core.ragged``) give per-row ``positions`` [B, T] and
        ``mask`` [B, T, Tp + T].
        """
        T, Tp = x.shape[1], past[0][0].shape[2]
        if mask is None:
            mask = torch.ones(T, Tp + T, dtype=torch.bool, device=x.device).tril(Tp)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
        if positions.dim() == 2:  # per row: broadcast over the heads
            cos, sin, mask = cos[:, None], sin[:, None], mask.expand(x.shape[0], T, Tp + T)[:, None]
        cache = []
        for block, kv_past in zip(self.blocks, past):
            x, kv = block(x, cos, sin, kv_past, mask)
            cache.append(kv)
        return self.norm(x), cache


def backbone_of(m) -> Backbone:
    """The backbone a ``ModelConfig`` describes."""
    return Backbone(m.d_model, m.n_layers, m.n_heads, m.ffn_dim, m.rope_theta, m.n_kv_heads, m.norm_eps,
                    m.rope_pairing)


def backbone_flops_per_position(d: int, n_layers: int, ffn: int, T: int, kv_ratio: float = 1.0) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per position of a T-long sequence:
    6 * (matmul weights) + 6 * n_layers * T * d for attention scores and values (causal: half of
    2 * 2 * T * d per position forward, i.e. 2 * T * d, times 3). ``kv_ratio`` = n_kv_heads / n_heads
    (grouped-query attention shrinks the key and value projections)."""
    weights = n_layers * ((2 + 2 * kv_ratio) * d * d + 3 * d * ffn)
    return 6.0 * weights + 6.0 * n_layers * T * d
