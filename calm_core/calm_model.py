"""The continuous autoregressive language model (CALM.md section 2): next-vector prediction.

A training block is L chunks c_1..c_L (K tokens each) with the frozen encoder's posteriors
q(z | c_j) = N(mu_j, sigma_j^2). Position j sees c_1..c_j and predicts z_{j+1}:

    e_j  = LayerNorm(W_2 SiLU(W_1 concat_k E[c_j,k]))        token input   (K*d -> 2d -> d)   [B, L-1, d]
       or  W_z mu_j (+ noise)                                 latent input  (input_mode)
    h    = Backbone(e_1..e_{L-1})                             causal Transformer            [B, L-1, d]
    x_n  = Head(h, eps_n),  n = 1..N                          N samples of z_{j+1}          [B, L-1, N, l]
    loss = energy score of the x_n against M posterior draws of z_{j+1}   (calm_core.energy)

At generation time the tokens fed back are the AE decoder's argmax of the sampled vector; the
paper's ablation found token input (4.70 BrierLM) better than latent input (3.25) or both (4.40).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calm_core import rng
from calm_core.config import AEConfig, HeadConfig, ModelConfig
from calm_core.energy import energy_loss_flops_per_position, posterior_energy_loss
from calm_core.heads import EnergyHead, QuadraticHead, build_energy_head, head_forward_weights, quadratic_loss
from calm_core.layers import init_weights, matmul_weights
from calm_core.transformer import backbone_flops_per_position, backbone_of


@dataclass
class CALMOutput:
    loss: torch.Tensor  # scalar
    fidelity: torch.Tensor  # energy head: (2/NM) sum ||x - y||; quadratic: expected energy
    diversity: torch.Tensor  # energy head: (1/N(N-1)) sum ||x - x'||; quadratic: margin term
    hidden: torch.Tensor  # [B, L-1, d]


class ChunkInput(nn.Module):
    """The token input path: K token embeddings of a chunk -> one d-vector. [.., K] -> [.., d]"""

    def __init__(self, vocab_size: int, K: int, d: int, ln_eps: float = 1e-5):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.mlp = nn.Sequential(nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d, eps=ln_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens.long())  # [.., K, d]
        return self.norm(self.mlp(e.flatten(-2)))  # [.., d]


class CALM(nn.Module):
    def __init__(self, model: ModelConfig, head: HeadConfig, ae: AEConfig, vocab_size: int):
        super().__init__()
        self.mcfg, self.hcfg, self.K, self.latent_dim = model, head, ae.K, ae.latent_dim
        d = model.d_model
        self.token_in = (ChunkInput(vocab_size, ae.K, d, model.layernorm_eps)
                         if model.input_mode in ("tokens", "both") else None)
        self.latent_in = nn.Linear(ae.latent_dim, d) if model.input_mode in ("latents", "both") else None
        self.backbone = backbone_of(model)
        init_weights(self)
        blocks = head.blocks or max(1, model.n_layers // 4)
        if head.kind == "energy":  # built after init_weights: its own init scheme (head.init)
            self.head = build_energy_head(head.arch, d, ae.latent_dim, model.ffn_dim, blocks, head.noise_dim, head.init,
                                          head.noise, head.layernorm_eps, width=round(d * head.width_ratio))
        else:
            self.head = QuadraticHead(d, ae.latent_dim)

    def inputs(self, tokens: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
        """tokens [B, T, K], mu [B, T, l] -> backbone inputs [B, T, d]."""
        x = 0
        if self.token_in is not None:
            x = x + self.token_in(tokens)
        if self.latent_in is not None:
            z = mu.to(self.latent_in.weight.dtype)
            if self.training and self.hcfg.input_noise_std > 0:
                z = z + self.hcfg.input_noise_std * rng.normal_like(z)
            x = x + self.latent_in(z)
        return x

    def hidden(self, tokens: torch.Tensor, mu: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state after each of the given chunks: [B, T, K] -> [B, T, d]."""
        return self.backbone(self.inputs(tokens, mu))

    def sample(self, h: torch.Tensor, n: int, generator: rng.Gen = None) -> torch.Tensor:
        """n samples of the next latent per position: h [.., d] -> [.., n, l]."""
        if isinstance(self.head, EnergyHead):
            return self.head(h, n, generator)
        return self.head.sample(h, n, generator=generator)

    def forward(self, tokens: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                generator: torch.Generator | None = None) -> CALMOutput:
        """tokens [B, L, K], mu / log_sigma [B, L, l] -> the loss of predicting z_2..z_L."""
        h = self.hidden(tokens[:, :-1], mu[:, :-1])  # [B, L-1, d]
        mu_next, ls_next = mu[:, 1:], log_sigma[:, 1:]  # [B, L-1, l]
        if isinstance(self.head, EnergyHead):
            x = self.head(h, self.hcfg.n_samples, generator)  # [B, L-1, N, l]
            out = posterior_energy_loss(x, mu_next, ls_next, self.hcfg.n_targets, self.hcfg.alpha,
                                        generator=generator)
            loss, a, b = out.loss, out.fidelity, out.diversity
            if self.hcfg.prior_weight > 0:
                loss = loss + self.hcfg.prior_weight * 0.5 * x.float().mean(-2).pow(2).sum(-1).mean()
        else:
            loss, a, b = quadratic_loss(self.head(h), mu_next, ls_next, self.hcfg.margin)
            if self.training:
                self.head.fit_spread(a, self.latent_dim)
        return CALMOutput(loss, a, b, h)


def calm_train_flops_per_token(model: CALM) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 6 x weights touched per position), documented:

        backbone  : backbone_flops_per_position(d, layers, ffn, T = L - 1) / K
        input MLP : 6 * (K*d*2d + 2d*d) / K          (embedding lookups are free)
        head      : 6 * (per-position weights + N * per-sample weights) / K    (``head_forward_weights``:
                    W_h and the paper head's c halves / the AdaNorm modulation run once per position)
        loss      : ``energy_loss_flops_per_position`` / K   (the N x M and N x N distance matmuls)
        encoder   : counted separately (precomputed once: 2 * encoder weights / K per token, forward)
    """
    m, K = model.mcfg, model.K
    backbone = backbone_flops_per_position(m.d_model, m.n_layers, m.ffn_dim, m.block_chunks - 1,
                                           (m.n_kv_heads or m.n_heads) / m.n_heads) / K
    inp = 0.0
    if model.token_in is not None:
        inp += 6.0 * matmul_weights(model.token_in.mlp) / K
    if model.latent_in is not None:
        inp += 6.0 * model.latent_in.weight.numel() / K
    n = model.hcfg.n_samples
    head = 6.0 * head_forward_weights(model.head, n) / K
    loss = energy_loss_flops_per_position(n, model.hcfg.n_targets, model.latent_dim) / K if isinstance(
        model.head, EnergyHead) else 0.0
    return {"backbone": backbone, "input": inp, "head": head, "loss": loss, "total": backbone + inp + head + loss}
