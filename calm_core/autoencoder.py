"""The CALM chunk autoencoder: a VAE mapping K tokens to one latent vector z in R^l and back
(CALM.md section 1; Shao et al. 2025, section 2). Attention-free: every block is a pre-norm residual
SwiGLU MLP (calm_core.layers). d = d_model, l = latent_dim, V = vocabulary size.

Encoder:
    e_k   = Blocks_tok(E[x_k])                       k = 1..K, token_blocks blocks  [B, K, d]
    h     = Blocks_lat(W_c concat_k(e_k) + b_c)       W_c: Kd -> d, latent_blocks    [B, d]
    (mu, log sigma) = W_o RMSNorm(h) + b_o            W_o: d -> 2l                   [B, l] each
Decoder:
    g     = Blocks_lat(W_i z + b_i)                   W_i: l -> d                    [B, d]
    g_k   = Blocks_tok(reshape_{K,d}(W_e g + b_e))    W_e: d -> Kd                   [B, K, d]
    logits_k = RMSNorm(g_k) E^T                       E: the input embedding (tied)  [B, K, V]

Loss per chunk, averaged over the batch:
    L    = sum_{k=1..K} CE(logits_k, x_k) + beta * sum_{i=1..l} max(lambda_KL, KL_i)
    KL_i = 0.5 * (mu_i^2 + sigma_i^2 - 1 - 2 log sigma_i)        (KL(N(mu_i, sigma_i^2) || N(0, 1)))
with z = mu + sigma * eps, eps ~ N(0, I) (reparameterisation) in training and z = mu in evaluation.
The per-dimension floor lambda_KL (``kl_clip``) takes the gradient off dimensions whose KL is
already below it, so the prior cannot pull them into collapse.

Training-only robustness (gated by ``module.training``, applied in ``forward`` only):
  - token masking: each non-pad input token is replaced by <|mask|> with probability mask_prob.
    The targets stay the original tokens. Pad positions are never masked: padding is structure
    (it only follows the EOT of a document's last chunk), not content to be robust about, and
    keeping it visible leaves the encoder no doubt about where a document ends.
  - latent dropout: dropout with p = latent_dropout (inverted scaling, 1/(1-p)) on the sampled z.
``encode`` and ``decode`` themselves are deterministic in both modes; stage 2 and the metrics call
them directly.

Pad targets stay in the reconstruction loss (the decoder has to emit them to end a document), but
the accuracy metrics leave them out (see ``reconstruction_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm_core import rng
from calm_core.config import AEConfig
from calm_core.layers import ResidualMLPBlock, RMSNorm, init_weights, matmul_weights

# log sigma is clamped to this range (``ae.clamp_log_sigma``, on by default; the official AE has no clamp): exp(2 * 5) ~ 2e4 keeps sigma^2 (and the KL) finite in fp32 and
# bf16, exp(-10) ~ 4.5e-5 keeps 2 log sigma away from -inf. The clamp is straight-through (the
# forward value is clamped, the gradient is the identity's), so a dimension that overshoots still
# gets the KL gradient that pulls it back instead of sitting on a flat clamp.
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -10.0, 5.0


@dataclass
class AEOutput:
    loss: torch.Tensor  # scalar: rec_loss + beta * kl_loss
    rec_loss: torch.Tensor  # scalar: mean over chunks of sum_k CE(logits_k, x_k)
    kl_loss: torch.Tensor  # scalar: mean over chunks of sum_i max(kl_clip, KL_i) (before beta)
    kl_raw: torch.Tensor  # scalar: mean over chunks of sum_i KL_i (no floor)
    logits: torch.Tensor  # [B, K, V]
    mu: torch.Tensor  # [B, l]
    log_sigma: torch.Tensor  # [B, l] (clamped)


# ---------------------------------------------------------------------------- the KL term


def kl_per_dim(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL_i = 0.5 (mu_i^2 + sigma_i^2 - 1 - 2 log sigma_i), in fp32. [B, l], [B, l] -> [B, l]"""
    mu, log_sigma = mu.float(), log_sigma.float()
    return 0.5 * (mu.pow(2) + torch.exp(2.0 * log_sigma) - 1.0 - 2.0 * log_sigma)


def clipped_kl(kl_per_dim: torch.Tensor, floor: float) -> torch.Tensor:
    """sum_i max(floor, KL_i) per chunk: [B, l] -> [B]. No gradient reaches dimensions below floor."""
    return torch.clamp(kl_per_dim, min=floor).sum(-1)


def _clamp_log_sigma(log_sigma: torch.Tensor) -> torch.Tensor:
    """Clamp to [LOG_SIGMA_MIN, LOG_SIGMA_MAX] in value, identity in gradient (straight-through)."""
    clamped = log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
    return log_sigma + (clamped - log_sigma).detach()


# ---------------------------------------------------------------------------- the model


class ChunkAutoencoder(nn.Module):
    """The chunk VAE: ``encode`` tokens [B, K] -> (mu, log_sigma) [B, l]; ``decode`` z [B, l] -> logits
    [B, K, V]; ``forward`` tokens -> AEOutput with the training loss."""

    def __init__(self, cfg: AEConfig, vocab_size: int, mask_id: int, pad_id: int):
        super().__init__()
        self.cfg, self.vocab_size, self.mask_id, self.pad_id = cfg, vocab_size, mask_id, pad_id
        K, d, f, l, eps = cfg.K, cfg.d_model, cfg.ffn_dim, cfg.latent_dim, cfg.norm_eps
        self.embed = nn.Embedding(vocab_size, d)  # E [V, d], also the output matrix (tied)
        # encoder
        self.enc_tok = nn.Sequential(*[ResidualMLPBlock(d, f, eps) for _ in range(cfg.token_blocks)])
        self.enc_compress = nn.Linear(K * d, d)
        self.enc_lat = nn.Sequential(*[ResidualMLPBlock(d, f, eps) for _ in range(cfg.latent_blocks)])
        self.enc_norm = RMSNorm(d, eps)
        self.enc_out = nn.Linear(d, 2 * l)  # -> (mu, log sigma)
        # decoder
        self.dec_in = nn.Linear(l, d)
        self.dec_lat = nn.Sequential(*[ResidualMLPBlock(d, f, eps) for _ in range(cfg.latent_blocks)])
        self.dec_expand = nn.Linear(d, K * d)
        self.dec_tok = nn.Sequential(*[ResidualMLPBlock(d, f, eps) for _ in range(cfg.token_blocks)])
        self.dec_norm = RMSNorm(d, eps)
        init_weights(self)

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, K] (any integer dtype) -> mu [B, l], log_sigma [B, l] (clamped unless
        ``ae.clamp_log_sigma`` is off). Deterministic."""
        B, K = tokens.shape
        e = self.enc_tok(self.embed(tokens.long()))  # [B, K, d]
        h = self.enc_compress(e.reshape(B, K * self.cfg.d_model))  # [B, d]
        h = self.enc_lat(h)  # [B, d]
        mu, log_sigma = self.enc_out(self.enc_norm(h)).chunk(2, dim=-1)  # [B, l] x 2
        return mu, (_clamp_log_sigma(log_sigma) if self.cfg.clamp_log_sigma else log_sigma)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, l] -> logits [B, K, V]. Deterministic."""
        B = z.shape[0]
        g = self.dec_lat(self.dec_in(z.to(self.dec_in.weight.dtype)))  # [B, d]
        g = self.dec_expand(g).reshape(B, self.cfg.K, self.cfg.d_model)  # [B, K, d]
        g = self.dec_tok(g)  # [B, K, d]
        return F.linear(self.dec_norm(g), self.embed.weight)  # [B, K, V] (tied embedding)

    # ------------------------------------------------------------------ training-only noise
    def mask_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Training: each non-pad token -> mask_id with probability mask_prob; eval: unchanged. [B, K]"""
        if not self.training or self.cfg.mask_prob <= 0:
            return tokens
        hit = rng.bernoulli_mask(tuple(tokens.shape), self.cfg.mask_prob, tokens.device) & (tokens != self.pad_id)
        return torch.where(hit, torch.full_like(tokens, self.mask_id), tokens)

    def sample_latent(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Training: z = dropout_p(mu + sigma * eps), eps ~ N(0, I); eval: z = mu. [B, l] -> [B, l]"""
        if not self.training:
            return mu
        z = mu + torch.exp(log_sigma) * rng.normal_like(mu)
        return F.dropout(z, p=self.cfg.latent_dropout, training=True)

    # ------------------------------------------------------------------ loss
    def forward(self, tokens: torch.Tensor) -> AEOutput:
        """tokens [B, K] -> AEOutput. The targets are always the unmasked tokens."""
        tokens = tokens.long()
        mu, log_sigma = self.encode(self.mask_tokens(tokens))  # [B, l] x 2
        logits = self.decode(self.sample_latent(mu, log_sigma))  # [B, K, V]
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")  # [B*K]
        rec = ce.view(tokens.shape).sum(-1).mean()  # sum over K, mean over chunks
        kl = kl_per_dim(mu, log_sigma)  # [B, l]
        kl_loss = clipped_kl(kl, self.cfg.kl_clip).mean()
        loss = rec + self.cfg.beta * kl_loss
        return AEOutput(loss, rec, kl_loss, kl.sum(-1).mean(), logits, mu, log_sigma)


# ---------------------------------------------------------------------------- evaluation helpers


def encoder_flops_per_token(model: ChunkAutoencoder) -> float:
    """Forward FLOPs of the frozen encoder per token (what precomputing the latents costs once):
    2 * (per-token weights (enc_tok) + per-chunk weights (enc_compress, enc_lat, enc_out) / K)."""
    per_chunk = sum(matmul_weights(m) for m in (model.enc_compress, model.enc_lat, model.enc_out))
    return 2.0 * (matmul_weights(model.enc_tok) + per_chunk / model.cfg.K)


def autoencoder_train_flops_per_token(model: ChunkAutoencoder) -> float:
    """Stage-1 training FLOPs per token (forward + backward = 6 x weights touched): the encoder's and
    the decoder's per-token weights, their per-chunk weights / K, and the tied vocabulary projection
    (V x d per token; the embedding lookup is free)."""
    per_token = sum(matmul_weights(m) for m in (model.enc_tok, model.dec_tok)) + model.embed.weight.numel()
    per_chunk = sum(matmul_weights(m) for m in (model.enc_compress, model.enc_lat, model.enc_out,
                                                 model.dec_in, model.dec_lat, model.dec_expand))
    return 6.0 * (per_token + per_chunk / model.cfg.K)


# float32 logits ``decode_tokens`` holds at once. At the released vocabulary (128,257) one latent's K = 4
# positions are 2 MB of logits, so a whole block in one call was not bounded: in-training validation of
# CALM-M at its 2,048-chunk context decoded 2 samples x 2,047 positions = 8.4 GB per worker
DECODE_BYTES = 256 * 2**20


def decode_tokens(model: ChunkAutoencoder, z: torch.Tensor, max_bytes: int = DECODE_BYTES) -> torch.Tensor:
    """argmax_v decode(z): latents z [..., l] -> tokens [..., K] (long), decoded a slice of latents at a
    time so that at most ``max_bytes`` of float32 logits exist at once (each latent's argmax is its own:
    the tokens of one call, up to the matmul's rounding on near-ties)."""
    flat = z.flatten(0, -2)  # [N, l]
    rows = max(1, max_bytes // (model.cfg.K * model.embed.num_embeddings * 4))
    parts = [model.decode(flat[i:i + rows]).argmax(-1) for i in range(0, len(flat), rows)]  # [n, K] each
    out = torch.cat(parts) if parts else model.decode(flat).argmax(-1)
    return out.view(*z.shape[:-1], model.cfg.K)


@torch.no_grad()
def reconstruct(model: ChunkAutoencoder, tokens: torch.Tensor) -> torch.Tensor:
    """argmax_v decode(mu(tokens)): tokens [B, K] -> tokens [B, K] (long)."""
    return decode_tokens(model, model.encode(tokens)[0])


@torch.no_grad()
def reconstruction_metrics(model: ChunkAutoencoder, tokens: torch.Tensor, pad_id: int, noise_std: float,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Sums and counts over a batch of chunks tokens [B, K], to be added across batches and workers.

        tokens          number of non-pad target tokens
        chunks          B
        correct_mu      correct non-pad tokens decoding z = mu
        correct_sample  ... decoding a posterior sample z = mu + sigma * eps
        correct_noise   ... decoding z = mu + noise_std * eps (the robustness stage 2 relies on)
        rec_loss_sum    sum over chunks of sum_k CE(decode(mu)_k, x_k) (pad targets included, as in
                        the training loss; divide by chunks)
        kl_sum          sum over chunks of sum_i max(kl_clip, KL_i) (divide by chunks)
        mu_sum          [l] sum over chunks of mu
        mu_sq_sum       [l] sum over chunks of mu^2 (with mu_sum and chunks: see ``active_dims``)
        sigma_sum       [l] sum over chunks of sigma (the posterior's spread, per dimension)

    Accuracy leaves pad positions out: padding is trivially reconstructed and fills up to K-1 of
    every document's last chunk, so counting it would inflate the figure on short documents.
    The noise eps is drawn by the rule of ``calm_core.rng`` (on the generator's device, then moved),
    so a seeded CPU generator gives the same figures on any device. The model is evaluated in eval mode and left
    in the mode it was in.
    """
    was_training = model.training
    model.eval()
    tokens = tokens.long()
    mu, log_sigma = model.encode(tokens)  # [B, l] x 2
    mu32, sigma32 = mu.float(), torch.exp(log_sigma.float())
    keep = tokens != pad_id  # [B, K]

    def eps() -> torch.Tensor:  # [B, l]
        return rng.normal(tuple(mu32.shape), mu32.device, generator)

    def correct(logits: torch.Tensor) -> torch.Tensor:
        return ((logits.argmax(-1) == tokens) & keep).sum()

    logits = model.decode(mu)  # [B, K, V]
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")  # [B*K]
    out = {
        "tokens": keep.sum(),
        "chunks": torch.tensor(tokens.shape[0], device=tokens.device),
        "correct_mu": correct(logits),
        "correct_sample": correct(model.decode(mu32 + sigma32 * eps())),
        "correct_noise": correct(model.decode(mu32 + noise_std * eps())),
        "rec_loss_sum": ce.sum(),
        "kl_sum": clipped_kl(kl_per_dim(mu, log_sigma), model.cfg.kl_clip).sum(),
        "mu_sum": mu32.sum(0),  # [l]
        "mu_sq_sum": mu32.pow(2).sum(0),  # [l]
        "sigma_sum": sigma32.sum(0),  # [l]
    }
    model.train(was_training)
    return out


def mu_variance(mu_sum: torch.Tensor, mu_sq_sum: torch.Tensor, n: float) -> torch.Tensor:
    """Var_x[mu_i(x)] per dimension [l] from sums (float64):  mu_sq_sum_i / n - (mu_sum_i / n)^2."""
    mean = torch.as_tensor(mu_sum).double() / float(n)
    return (torch.as_tensor(mu_sq_sum).double() / float(n) - mean.pow(2)).clamp_min(0.0)


def active_dims(mu_sum: torch.Tensor, mu_sq_sum: torch.Tensor, n: float, threshold: float = 0.01) -> int:
    """Active units (Burda et al. 2016): dimensions i with Var_x[mu_i(x)] > threshold, from sums.

        Var_i = mu_sq_sum_i / n - (mu_sum_i / n)^2          (computed in float64)
    """
    if float(n) <= 1:
        return 0
    return int((mu_variance(mu_sum, mu_sq_sum, n) > threshold).sum().item())


# ----------------------------------------------------------------------------- the RUN/ae artifact


def load_autoencoder_dir(directory, verify: bool = True):
    """An ``ae`` artifact folder -> (model in eval mode, Config, CalmTokenizer, manifest).

    Plain PyTorch: the consolidated ``model.safetensors``, ``config.yaml`` and ``tokenizer.json``
    (no Ray, no DeepSpeed). With ``verify`` the manifest's file hashes and the tokenizer hash are
    checked first, so a truncated, edited or mixed-up artifact is an ``ArtifactError``.
    """
    from pathlib import Path

    from calm_core.checkpoint import load_weights, read_manifest
    from calm_core.config import config_from_yaml
    from calm_core.errors import ArtifactError
    from calm_core.tokenizer import CalmTokenizer

    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"autoencoder artifact '{d}' does not exist; run jobs/stage1.py for this run first")
    manifest = read_manifest(d, kind="ae") if verify else {}
    for name in ("config.yaml", "tokenizer.json", "model.safetensors"):
        if not (d / name).is_file():
            raise ArtifactError(f"autoencoder artifact '{d}' lacks {name}; rerun jobs/stage1.py with --overwrite")
    cfg = config_from_yaml((d / "config.yaml").read_text(), str(d / "config.yaml"))
    tok = CalmTokenizer.from_file(d / "tokenizer.json")
    if verify and manifest["inputs"]["tokenizer_sha256"] != tok.sha256:
        raise ArtifactError(f"'{d}/tokenizer.json' is not the tokenizer this autoencoder was trained with")
    model = ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
    state = load_weights(d / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"'{d}/model.safetensors' does not fit its config.yaml (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    model.eval()
    return model, cfg, tok, manifest
