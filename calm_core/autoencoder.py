"""The CALM chunk autoencoder: a VAE mapping K tokens to one latent vector z in R^l and back
(CALM.md section 1; Shao et al. 2025, section 2).

Encoder (attention-free):
    e_k   = Blocks_tok(Embed(x_k))                    k = 1..K           [B, K, d]
    h     = Blocks_lat(Linear_{Kd->d}(concat_k e_k))                      [B, d]
    (mu, log sigma) = Linear_{d->2l}(RMSNorm(h))                          [B, l] each
Decoder:
    g     = Blocks_lat(Linear_{l->d}(z))                                  [B, d]
    g_k   = Blocks_tok(reshape(Linear_{d->Kd}(g)))                        [B, K, d]
    logits_k = RMSNorm(g_k) E^T            (E: the input embedding, tied) [B, K, V]

Loss per chunk, z = mu + sigma * eps (reparameterisation):
    L = sum_k CE(logits_k, x_k) + beta * sum_i max(lambda_KL, KL_i)
    KL_i = 0.5 * (mu_i^2 + sigma_i^2 - 1 - 2 log sigma_i)
The per-dimension floor lambda_KL stops dimensions from collapsing to the prior. Robustness
(training only): each input token is replaced by <|mask|> with probability mask_prob (targets stay
the true tokens), and dropout with p = latent_dropout is applied to the sampled z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm_core.config import AEConfig
from calm_core.layers import ResidualMLPBlock, RMSNorm, init_weights

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -10.0, 5.0  # keeps exp(2 log sigma) finite in fp32 and bf16


@dataclass
class AEOutput:
    loss: torch.Tensor  # scalar: mean over chunks of rec_loss + beta * kl_loss
    rec_loss: torch.Tensor  # scalar: mean over chunks of sum_k CE
    kl_loss: torch.Tensor  # scalar: mean over chunks of sum_i max(floor, KL_i)
    kl_raw: torch.Tensor  # scalar: mean over chunks of sum_i KL_i (no floor)
    logits: torch.Tensor  # [B, K, V]
    mu: torch.Tensor  # [B, l]
    log_sigma: torch.Tensor  # [B, l]


def kl_per_dim(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension: 0.5 (mu^2 + sigma^2 - 1 - 2 log sigma). [B, l]"""
    mu, log_sigma = mu.float(), log_sigma.float()
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1.0 - 2.0 * log_sigma)


def clipped_kl(kl: torch.Tensor, floor: float) -> torch.Tensor:
    """sum_i max(floor, KL_i) per chunk. [B, l] -> [B]"""
    return torch.clamp(kl, min=floor).sum(-1)


class ChunkAutoencoder(nn.Module):
    def __init__(self, cfg: AEConfig, vocab_size: int, mask_id: int, pad_id: int):
        super().__init__()
        self.cfg, self.vocab_size, self.mask_id, self.pad_id = cfg, vocab_size, mask_id, pad_id
        K, d, f, l = cfg.K, cfg.d_model, cfg.ffn_dim, cfg.latent_dim
        self.embed = nn.Embedding(vocab_size, d)
        # encoder
        self.enc_tok = nn.Sequential(*[ResidualMLPBlock(d, f) for _ in range(cfg.token_blocks)])
        self.enc_compress = nn.Linear(K * d, d)
        self.enc_lat = nn.Sequential(*[ResidualMLPBlock(d, f) for _ in range(cfg.latent_blocks)])
        self.enc_norm = RMSNorm(d)
        self.enc_out = nn.Linear(d, 2 * l)
        # decoder
        self.dec_in = nn.Linear(l, d)
        self.dec_lat = nn.Sequential(*[ResidualMLPBlock(d, f) for _ in range(cfg.latent_blocks)])
        self.dec_expand = nn.Linear(d, K * d)
        self.dec_tok = nn.Sequential(*[ResidualMLPBlock(d, f) for _ in range(cfg.token_blocks)])
        self.dec_norm = RMSNorm(d)
        init_weights(self)

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, K] -> mu [B, l], log_sigma [B, l]"""
        B, K = tokens.shape
        e = self.enc_tok(self.embed(tokens))  # [B, K, d]
        h = self.enc_lat(self.enc_compress(e.reshape(B, K * self.cfg.d_model)))  # [B, d]
        mu, log_sigma = self.enc_out(self.enc_norm(h)).chunk(2, dim=-1)  # [B, l] x 2
        return mu, log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, l] -> logits [B, K, V]"""
        B = z.shape[0]
        g = self.dec_lat(self.dec_in(z.to(self.dec_in.weight.dtype)))  # [B, d]
        g = self.dec_tok(self.dec_expand(g).reshape(B, self.cfg.K, self.cfg.d_model))  # [B, K, d]
        return F.linear(self.dec_norm(g), self.embed.weight)  # [B, K, V] (tied embedding)

    # ------------------------------------------------------------------ training forward
    def mask_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Training only: each token -> <|mask|> with probability mask_prob. [B, K] -> [B, K]"""
        if not self.training or self.cfg.mask_prob <= 0:
            return tokens
        hit = torch.rand(tokens.shape, device=tokens.device) < self.cfg.mask_prob
        return torch.where(hit, torch.full_like(tokens, self.mask_id), tokens)

    def sample_latent(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Training: z = dropout(mu + sigma * eps); evaluation: z = mu. [B, l]"""
        if not self.training:
            return mu
        z = mu + torch.exp(log_sigma) * torch.randn_like(mu)
        return F.dropout(z, p=self.cfg.latent_dropout, training=True)

    def forward(self, tokens: torch.Tensor) -> AEOutput:
        """tokens [B, K] (targets are always the unmasked tokens)."""
        mu, log_sigma = self.encode(self.mask_tokens(tokens))
        logits = self.decode(self.sample_latent(mu, log_sigma))  # [B, K, V]
        rec = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")
        rec = rec.view(tokens.shape).sum(-1).mean()  # sum over K, mean over chunks
        kl = kl_per_dim(mu, log_sigma)  # [B, l]
        kl_loss = clipped_kl(kl, self.cfg.kl_clip).mean()
        loss = rec + self.cfg.beta * kl_loss
        return AEOutput(loss, rec, kl_loss, kl.sum(-1).mean(), logits, mu, log_sigma)


# ---------------------------------------------------------------------- evaluation helpers


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def reconstruct(model: ChunkAutoencoder, tokens: torch.Tensor) -> torch.Tensor:
    """argmax of decode(mu): tokens [B, K] -> tokens [B, K]"""
    mu, _ = model.encode(tokens)
    return model.decode(mu).argmax(-1)


@torch.no_grad()
def reconstruction_metrics(model: ChunkAutoencoder, tokens: torch.Tensor, pad_id: int, noise_std: float,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Sums over a batch of chunks (so that they can be added across batches and workers).

    Token accuracy counts only non-pad targets: padding is trivially reconstructed and would
    inflate the figure. Three decodings: mu; a posterior sample mu + sigma * eps; mu + N(0, noise^2).
    ``mu_sum`` / ``mu_sq_sum`` give the variance of mu over the data per dimension: a dimension is
    active when that variance exceeds 0.01 (Burda et al. 2016).
    """
    was_training = model.training
    model.eval()
    mu, log_sigma = model.encode(tokens)
    mu32, sigma32 = mu.float(), torch.exp(log_sigma.float())
    keep = tokens != pad_id  # [B, K]

    def correct(z: torch.Tensor) -> torch.Tensor:
        return ((model.decode(z).argmax(-1) == tokens) & keep).sum()

    def noise_like(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)

    logits = model.decode(mu)
    rec = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
    out = {
        "tokens": keep.sum(),
        "chunks": torch.tensor(tokens.shape[0]),
        "correct_mu": ((logits.argmax(-1) == tokens) & keep).sum(),
        "correct_sample": correct(mu32 + sigma32 * noise_like(mu32)),
        "correct_noise": correct(mu32 + noise_std * noise_like(mu32)),
        "rec_loss_sum": rec.sum(),
        "kl_sum": clipped_kl(kl_per_dim(mu, log_sigma), model.cfg.kl_clip).sum(),
        "mu_sum": mu32.sum(0),  # [l]
        "mu_sq_sum": mu32.pow(2).sum(0),  # [l]
    }
    model.train(was_training)
    return out


def active_dims(mu_sum: torch.Tensor, mu_sq_sum: torch.Tensor, n: float, threshold: float = 0.01) -> int:
    """Number of dimensions whose variance of mu across chunks exceeds ``threshold``."""
    if n <= 1:
        return 0
    mean = mu_sum.double() / n
    var = mu_sq_sum.double() / n - mean.pow(2)
    return int((var > threshold).sum().item())
