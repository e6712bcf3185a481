"""The discrete baseline: the same causal Transformer backbone over tokens with a softmax head.

    h      = Backbone(E[x_1..x_{T}])                      [B, T, d]
    logits = h E^T                                         tied input embedding   [B, T, V]
    loss   = mean_t CE(logits_t, x_{t+1})

Trained on the same tokenizer, corpus and split as CALM (blocks of L*K tokens), so the two can be
compared at equal training FLOPs (``baseline_train_flops_per_token``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_core.config import ModelConfig
from calm_core.layers import init_weights
from calm_core.transformer import Backbone, backbone_flops_per_position


class TokenLM(nn.Module):
    def __init__(self, model: ModelConfig, vocab_size: int, K: int):
        super().__init__()
        self.mcfg, self.K = model, K
        self.embed = nn.Embedding(vocab_size, model.d_model)
        self.backbone = Backbone(model.d_model, model.n_layers, model.n_heads, model.ffn_dim, model.rope_theta)
        init_weights(self)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> next-token logits [B, T, V]."""
        h = self.backbone(self.embed(tokens.long()))
        return F.linear(h, self.embed.weight)

    def forward(self, tokens: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over tokens [B, T] (targets equal to pad_id are ignored)."""
        logits = self.logits(tokens[:, :-1])
        target = tokens[:, 1:].long()
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                               ignore_index=-100 if pad_id is None else pad_id)


def baseline_train_flops_per_token(model: TokenLM) -> float:
    """backbone_flops_per_position(d, layers, ffn, T = L*K - 1) + 6 * V * d for the softmax head."""
    m = model.mcfg
    T = m.block_chunks * model.K - 1
    return backbone_flops_per_position(m.d_model, m.n_layers, m.ffn_dim, T) + 6.0 * model.embed.weight.numel()
