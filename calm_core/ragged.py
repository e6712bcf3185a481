"""Rows of different lengths decoded together: a left-padded KV cache (continuous batching).

A server continues many sequences at once, each of its own length, one new position per row per
step. Row b's cached keys and values sit at the right end of a shared length S (left padding);
``valid`` [B, S] marks its real positions and ``pos`` [B] is the RoPE position of its next input:

    h_b, (k, v) = Backbone.extend(x_b at position pos_b, attending to [valid_b, True])

Padding does not change a row's result: a padded key gets attention weight exp(-inf) = 0, and RoPE
makes every score depend only on true positions, so a row continues exactly as it would alone (up
to floating-point rounding of the batched matmuls). New prompts start with ``prefill`` (several of
different lengths in one left-padded pass), join between steps (``join``: the shorter side is
left-padded) and leave (``keep``: columns no remaining row needs are dropped).
Shapes: B rows, H heads, S cached length, h head width, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm_core.transformer import KV, Backbone


@dataclass(frozen=True)
class RaggedCache:
    past: list[KV]  # per layer (k, v) [B, H, S, h], left-padded
    valid: torch.Tensor  # [B, S] bool: a real cached position
    pos: torch.Tensor  # [B] long: RoPE position of each row's next input

    @classmethod
    def prefill(cls, backbone: Backbone, prompts: list[torch.Tensor], rows: list[int] | None = None
                ) -> tuple[torch.Tensor, "RaggedCache"]:
        """Several prompts of different lengths in one causal pass, left-padded to the longest:
        prompts [T_i, d] -> (hidden state after each [R, d], their cache), prompt i given
        ``rows[i]`` identical rows (default 1 each; R = sum of rows).

        Row i's query t sits at RoPE position t - (T - T_i) and attends to its own real keys up to
        t; a padding query attends only to itself (a real row never sees it), so every prompt's
        keys, values and last hidden state are those of ``Backbone.prefix`` of it alone (up to
        rounding of the batched matmuls)."""
        lens = torch.tensor([p.shape[0] for p in prompts], device=prompts[0].device)  # [P]
        T = int(lens.max())
        x = torch.stack([F.pad(p, (0, 0, T - p.shape[0], 0)) for p in prompts])  # [P, T, d]
        t = torch.arange(T, device=x.device)
        start = T - lens  # [P] first real column
        real = t[None, :] >= start[:, None]  # [P, T]
        causal = t[None, :, None] >= t[None, None, :]  # [1, T(query), T(key)]
        mask = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)[None]  # [P, T, T]
        positions = (t[None, :] - start[:, None]).clamp(min=0)  # [P, T]
        kv_heads = backbone.blocks[0].attn.n_kv_heads
        empty = x.new_zeros(len(prompts), kv_heads, 0, backbone.head_dim)  # [P, Hkv, 0, h]
        h, past = backbone.extend(x, positions, [(empty, empty)] * len(backbone.blocks), mask)
        index = torch.repeat_interleave(torch.arange(len(prompts), device=x.device),
                                        torch.tensor(rows or [1] * len(prompts), device=x.device))  # [R]
        cache = cls([(k[index], v[index]) for k, v in past], real[index], lens[index])
        return h[index, -1], cache

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    def join(self, other: "RaggedCache") -> "RaggedCache":
        """This cache's rows, then ``other``'s, left-padded to one length."""
        S = max(self.valid.shape[1], other.valid.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:  # left-pad axis -dim_from_end to S
            n = S - t.shape[-dim_from_end]
            return F.pad(t, (0, 0) * (dim_from_end - 1) + (n, 0)) if n else t

        past = [(torch.cat([pad(a[0], 2), pad(b[0], 2)]), torch.cat([pad(a[1], 2), pad(b[1], 2)]))
                for a, b in zip(self.past, other.past)]
        return RaggedCache(past, torch.cat([pad(self.valid, 1), pad(other.valid, 1)]), torch.cat([self.pos, other.pos]))

    def keep(self, rows: torch.Tensor) -> "RaggedCache":
        """Only the given rows [b] (in that order); leading columns that none of them uses are dropped."""
        valid = self.valid[rows]  # [b, S]
        first = int(valid.any(0).float().argmax()) if valid.any() else valid.shape[1]
        return RaggedCache([(k[rows, :, first:], v[rows, :, first:]) for k, v in self.past], valid[:, first:],
                           self.pos[rows])

    def step(self, backbone: Backbone, x: torch.Tensor) -> tuple[torch.Tensor, "RaggedCache"]:
        """Feed one new input per row: x [B, 1, d] -> (hidden [B, d], the cache one longer)."""
        see = torch.cat([self.valid, torch.ones_like(self.valid[:, :1])], 1)  # [B, S + 1]
        h, past = backbone.extend(x, self.pos[:, None], self.past, see[:, None])
        return h[:, -1], RaggedCache(past, see, self.pos + 1)
