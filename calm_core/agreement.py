"""Latent- and decoder-level evaluation (CALM.md sections 3 and 4), per held-out block.

At every chunk start j of a block (given chunks 1..j), with the true next chunk y [K] and its
posterior mean mu:

    latent MSE / cosine   of one head sample z_1 and of the mean of N samples zbar against mu
                          MSE = ||z - mu||^2 / l,   cos = z . mu / (|z| |mu|)
    energy score          S = (1/N(N-1)) sum_{n != n'} |z_n - z_n'|  -  (2/N) sum_n |z_n - mu|
                          (higher is better; against the observed posterior mean)
    agreement             of a predicted next chunk x with y: token accuracy (over y's non-pad
                          tokens) and exact-chunk match 1[x = y]
    temperature trade-off at temperature T, two independent picks x, x' per position:
                          accuracy = (1[x = y] + 1[x' = y]) / 2,   collision = 1[x = x']
                          a sharper sampler agrees more with y and with itself (the paper's figure)

CALM predicts x by decoding a head sample (T < 1: ``calm_core.generate.next_chunks``); the
baseline by sampling K tokens (softmax temperature). The AE reconstruction is measured per token
of y and split by frequency band of the token in the training corpus (``frequency_bands``).
Every function returns per-block sums ([b] tensors) so blocks add up across batches and actors.
Shapes: b blocks, P = L - 1 positions per block, K tokens per chunk, l latent width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calm_core import rng
from calm_core.autoencoder import ChunkAutoencoder, decode_tokens
from calm_core.baseline import TokenLM
from calm_core.calm_model import CALM
from calm_core.energy import energy_score
from calm_core.generate import next_chunks


def per_block(x: torch.Tensor, b: int) -> torch.Tensor:
    """Per-position values [b * P] -> per-block sums [b] (float64)."""
    return x.double().view(b, -1).sum(1)


def agreement(pred: torch.Tensor, true: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """pred, true [P, K] -> per position: ``token_correct`` (matches at y's non-pad tokens), ``true_tokens``
    (y's non-pad tokens) and ``exact`` (1[x = y])."""
    keep = true != pad_id
    return {"token_correct": ((pred == true) & keep).sum(-1), "true_tokens": keep.sum(-1), "exact": (pred == true).all(-1)}


def tradeoff(x1: torch.Tensor, x2: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two independent picks x1, x2 [P, K] against y [P, K] -> per position accuracy and collision."""
    acc = ((x1 == true).all(-1).double() + (x2 == true).all(-1).double()) / 2
    return {"accuracy": acc, "collision": (x1 == x2).all(-1).double()}


def frequency_bands(counts: torch.Tensor, edges: tuple[int, ...]) -> torch.Tensor:
    """Token counts [V] in the training corpus -> band [V]: band i holds the tokens of frequency
    rank in [edges[i-1], edges[i]) (rank 0 = most frequent); the last band, the tokens never seen."""
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(counts))
    band = torch.bucketize(rank, torch.tensor(edges), right=True)  # 0 .. len(edges)
    return torch.where(counts > 0, band, torch.full_like(band, len(edges) + 1))


@torch.no_grad()
def latent_scores(model: CALM, h: torch.Tensor, mu_next: torch.Tensor, n: int, gen: rng.Gen) -> dict[str, torch.Tensor]:
    """h [b, P, d], mu_next [b, P, l] -> per-block sums of the latent MSE and cosine of one head sample
    and of the mean of n samples, and of the energy score against mu."""
    b, P, _ = h.shape
    z = model.sample(h, n, generator=gen).float()  # [b, P, n, l]
    mu = mu_next.float()
    one, mean = z[:, :, 0], z.mean(2)  # [b, P, l]

    def mse(a: torch.Tensor) -> torch.Tensor:
        return per_block((a - mu).pow(2).mean(-1).flatten(), b)

    def cos(a: torch.Tensor) -> torch.Tensor:
        return per_block(F.cosine_similarity(a, mu, dim=-1).flatten(), b)

    return {"latent_mse_one": mse(one), "latent_mse_mean": mse(mean), "latent_cos_one": cos(one),
            "latent_cos_mean": cos(mean), "energy_score": per_block(energy_score(z, mu).flatten(), b)}


@torch.no_grad()
def calm_picks(model: CALM, ae: ChunkAutoencoder, h: torch.Tensor, temperature: float, candidates: int,
               gen: rng.Gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent next-chunk picks per position at ``temperature`` (the batch sampler below 1):
    h [b, P, d] -> ([b*P, K], [b*P, K])."""
    flat = h.flatten(0, 1)  # [b*P, d]
    if temperature == 1.0:
        z = model.sample(h, 2, generator=gen)  # [b, P, 2, l]
        x = decode_tokens(ae, z).flatten(0, 1)  # [b*P, 2, K]
        return x[:, 0], x[:, 1]
    rows = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(2)  # each position twice, its rows adjacent
    gen = gen.repeat(2 * h.shape[1]) if isinstance(gen, rng.Rows) else gen  # a block's rows share its generator
    picks = next_chunks(model, ae, flat[rows], temperature, candidates, gen, "batch")
    return picks[0::2], picks[1::2]


@torch.no_grad()
def baseline_picks(lm: TokenLM, tokens: torch.Tensor, starts: torch.Tensor, K: int, temperature: float,
                   gen: rng.Gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sampled K-token continuations per chunk start at softmax ``temperature`` (0: greedy):
    tokens [b, T], starts [S] -> ([b*S, K], [b*S, K])."""
    br = lm.branches(tokens, starts, K, 2, generator=gen, temperature=temperature)
    x = br.samples.flatten(0, 1)  # [b*S, 2, K]
    return x[:, 0], x[:, 1]
