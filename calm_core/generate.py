"""Generation with CALM (CALM.md sections 2 and 4): one Transformer step per K tokens.

    h_j     = Backbone(e_1..e_j)               cached: one new position per step (Backbone.extend)
    z_{j+1} ~ Head(h_j)                       a sample of the next vector
    c_{j+1} = argmax_k Decoder(z_{j+1})        K tokens, fed back as the next input chunk

Temperature without likelihoods (section 4). The target is P_T(c) proportional to P(c)^(1/T) over
decoded chunks. T = 1 is one head sample and one decode. For T < 1 this module uses the paper's
batch approximation: draw N candidate vectors, decode them, count identical chunks (count_c), and
with s = 1/T pick among the chunks seen at least s times with weight C(count_c, s) (the generalised
binomial Gamma(count + 1) / (Gamma(s + 1) Gamma(count - s + 1)) when s is not an integer), falling
back to m = floor(s), ..., 1 with weight C(count_c, m) when no chunk was seen often enough. Since
E[C(count_c, m)] = C(N, m) P(c)^m, the choice approaches P^(1/T) as N grows (biased for finite N).

A prompt becomes whole chunks: a document boundary chunk [EOT, PAD, ..] first (what the model saw
between documents), then the prompt's tokens; the first len % K tokens are dropped so the rest
fills whole chunks (``prompt_chunks`` says which text was kept).
"""

from __future__ import annotations

import math

import torch

from calm_core.autoencoder import ChunkAutoencoder, decode_tokens
from calm_core.calm_model import CALM


def prompt_chunks(ids: list[int], K: int, eot_id: int, pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Prompt token ids -> (chunks [1, T, K] starting with a boundary chunk, the ids kept)."""
    kept = list(ids)[len(ids) % K:]
    seq = [eot_id] + [pad_id] * (K - 1) + kept
    return torch.tensor(seq, dtype=torch.long).view(1, -1, K), kept


def _binom(count: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """C(count, m) = Gamma(count + 1) / (Gamma(m + 1) Gamma(count - m + 1)), for count >= m."""
    c, m = count.double(), m.double()
    return torch.exp(torch.lgamma(c + 1) - torch.lgamma(m + 1) - torch.lgamma(c - m + 1))


def pick_by_counts(chunks: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch approximation, every row at once: candidate chunks [B, N, K] -> chosen [B, K].

    count_i = how many candidates equal candidate i; the order m is s = 1/T if some chunk was seen
    s times, else the largest integer below s that some chunk reached. Picking candidate i with
    weight C(count_i, m) / count_i picks each distinct chunk with weight C(count, m).
    """
    counts = (chunks[:, :, None, :] == chunks[:, None, :, :]).all(-1).sum(-1).double()  # [B, N]
    s = 1.0 / temperature
    top = counts.max(-1, keepdim=True).values  # [B, 1]
    m = torch.where(top >= s, torch.full_like(top, s), torch.clamp(top, max=float(math.floor(s))))  # [B, 1]
    w = torch.where(counts >= m, _binom(counts.clamp(min=1.0).maximum(m), m) / counts, torch.zeros_like(counts))
    i = torch.multinomial(w.float().cpu(), 1, generator=generator).to(chunks.device)  # [B, 1]
    return chunks.gather(1, i[..., None].expand(-1, 1, chunks.shape[-1]))[:, 0]  # [B, K]


@torch.no_grad()
def next_chunks(model: CALM, ae: ChunkAutoencoder, h: torch.Tensor, temperature: float = 1.0,
                candidates: int = 200, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next chunk per row from the hidden state: h [B, d] -> tokens [B, K]."""
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")
    n = 1 if temperature == 1.0 else candidates
    chunks = decode_tokens(ae, model.sample(h, n, generator=generator))  # [B, n, K]
    return chunks[:, 0] if n == 1 else pick_by_counts(chunks, temperature, generator)


@torch.no_grad()
def generate(model: CALM, ae: ChunkAutoencoder, context: torch.Tensor, n_chunks: int, temperature: float = 1.0,
             candidates: int = 200, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``context`` chunks [B, T, K] by n_chunks chunks -> tokens [B, n_chunks, K].

    With latent input (input_mode latents / both) every chunk fed back is re-encoded by the AE
    encoder (its posterior mean), as in training."""
    latent = model.latent_in is not None
    mu = ae.encode(context.flatten(0, 1))[0].view(*context.shape[:2], -1) if latent else None  # [B, T, l]
    h, past = model.backbone.prefix(model.inputs(context, mu))  # [B, T, d]
    h, T, out = h[:, -1], context.shape[1], []
    for j in range(n_chunks):
        c = next_chunks(model, ae, h, temperature, candidates, generator)  # [B, K]
        out.append(c)
        if j == n_chunks - 1:
            break
        x = model.inputs(c[:, None], ae.encode(c)[0][:, None] if latent else None)  # [B, 1, d]
        h, past = model.backbone.extend(x, torch.tensor([T + j], device=x.device), past)
        h = h[:, -1]
    return torch.stack(out, 1)
