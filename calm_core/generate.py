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

from calm_core.autoencoder import ChunkAutoencoder
from calm_core.calm_model import CALM


def prompt_chunks(ids: list[int], K: int, eot_id: int, pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Prompt token ids -> (chunks [1, T, K] starting with a boundary chunk, the ids kept)."""
    kept = list(ids)[len(ids) % K:]
    seq = [eot_id] + [pad_id] * (K - 1) + kept
    return torch.tensor(seq, dtype=torch.long).view(1, -1, K), kept


def _levels(s: float) -> list[float]:
    """Exponents tried in turn: s itself, then the integers below it down to 1."""
    out = [s] + [float(m) for m in range(math.floor(s), 0, -1)]
    return list(dict.fromkeys(out))


def _binom(count: torch.Tensor, m: float) -> torch.Tensor:
    """C(count, m) = Gamma(count + 1) / (Gamma(m + 1) Gamma(count - m + 1)), for count >= m."""
    c = count.double()
    return torch.exp(torch.lgamma(c + 1) - math.lgamma(m + 1) - torch.lgamma(c - m + 1))


def pick_by_counts(chunks: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch approximation for one position: candidate chunks [N, K] -> the chosen chunk [K]."""
    uniq, inverse, counts = torch.unique(chunks, dim=0, return_inverse=True, return_counts=True)  # [U, K], [N], [U]
    for m in _levels(1.0 / temperature):
        ok = counts >= m
        if ok.any():
            w = torch.where(ok, _binom(counts.clamp(min=m), m), torch.zeros((), dtype=torch.float64))
            i = torch.multinomial(w.float().cpu(), 1, generator=generator).item()
            return uniq[i]
    raise AssertionError("unreachable: every candidate was seen at least once")


@torch.no_grad()
def next_chunks(model: CALM, ae: ChunkAutoencoder, h: torch.Tensor, temperature: float = 1.0,
                candidates: int = 200, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next chunk per row from the hidden state: h [B, d] -> tokens [B, K]."""
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")
    n = 1 if temperature == 1.0 else candidates
    z = model.sample(h, n, generator=generator)  # [B, n, l]
    dtype = next(ae.parameters()).dtype
    chunks = ae.decode(z.flatten(0, 1).to(dtype)).argmax(-1).view(h.shape[0], n, -1)  # [B, n, K]
    if n == 1:
        return chunks[:, 0]
    return torch.stack([pick_by_counts(c, temperature, generator) for c in chunks])


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
