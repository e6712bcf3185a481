"""Generation with CALM (CALM.md sections 2 and 4): one Transformer step per K tokens.

    h_j     = Backbone(e_1..e_j)               cached: one new position per step (Backbone.extend)
    z_{j+1} ~ Head(h_j)                       a sample of the next vector
    c_{j+1} = argmax_k Decoder(z_{j+1})        K tokens, fed back as the next input chunk

Temperature without likelihoods (section 4, ``calm_core.temperature``): T = 1 is one head sample
and one decode; below 1 either the exact sampler (``sampler="exact"``: law P^(1/T), capped at
``max_draws`` draws per row with a counted fallback) or the paper's batch approximation over
``candidates`` head samples (``sampler="batch"``, the fast default; biased for fractional 1/T).

A prompt becomes whole chunks laid out as the model's training text was (``calm_core.chunking``):
in the ``document`` layout a document boundary chunk [EOT, PAD, ..] first (what the model saw
between documents), then the prompt's tokens, the first len % K dropped so the rest fills whole
chunks (``prompt_chunks`` says which text was kept); in the ``packed`` layout (the official one)
BOS, the whole prompt, then PAD up to a multiple of K (the official ``generate`` right-pads the
prompt the same way).
"""

from __future__ import annotations

from typing import Iterator

import torch

from calm_core import rng
from calm_core.autoencoder import ChunkAutoencoder, decode_tokens
from calm_core.calm_model import CALM
from calm_core.sampling import SAMPLERS
from calm_core.temperature import ExactStats, exact_pick, pick_by_counts


def prompt_chunks(ids: list[int], K: int, layout: str, eot_id: int, pad_id: int,
                  bos_id: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Prompt token ids -> (chunks [1, T, K], the ids kept): in the ``document`` layout a boundary
    chunk then the last whole chunks of the prompt; in the ``packed`` layout BOS + prompt + PAD to a
    multiple of K."""
    if layout == "packed":
        if bos_id is None:
            raise ValueError("the packed layout needs a tokenizer with a begin-of-text token")
        kept = list(ids)
        seq = [bos_id] + kept + [pad_id] * (-(len(kept) + 1) % K)
        return torch.tensor(seq, dtype=torch.long).view(1, -1, K), kept
    kept = list(ids)[len(ids) % K:]
    seq = [eot_id] + [pad_id] * (K - 1) + kept
    return torch.tensor(seq, dtype=torch.long).view(1, -1, K), kept


@torch.no_grad()
def next_chunks(model: CALM, ae: ChunkAutoencoder, h: torch.Tensor, temperature: float = 1.0,
                candidates: int = 200, generator: rng.Gen = None, sampler: str = "batch",
                max_draws: int = 2000, stats: ExactStats | None = None) -> torch.Tensor:
    """Next chunk per row from the hidden state: h [B, d] -> tokens [B, K]. ``stats`` (exact sampler)
    accumulates the draws and fallbacks."""
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")

    def draw(rows: torch.Tensor, n: int) -> torch.Tensor:  # [b] -> [b, n, K]
        return decode_tokens(ae, model.sample(h[rows], n, generator=rng.select(generator, rows)))

    every = torch.arange(h.shape[0], device=h.device)
    if temperature == 1.0:
        return draw(every, 1)[:, 0]
    if sampler == "batch":
        return pick_by_counts(draw(every, candidates), temperature, generator)
    chunks, st = exact_pick(draw, h.shape[0], temperature, h.device, max_draws, candidates=candidates,
                            generator=generator)
    if stats is not None:
        stats.add(st)
    return chunks


def chunk_inputs(model: CALM, ae: ChunkAutoencoder, chunks: torch.Tensor) -> torch.Tensor:
    """Backbone inputs of chunks [B, T, K] -> [B, T, d]. With latent input (input_mode latents /
    both) every chunk is re-encoded by the AE encoder (its posterior mean), as in training."""
    latent = model.latent_in is not None
    mu = ae.encode(chunks.flatten(0, 1))[0].view(*chunks.shape[:2], -1) if latent else None  # [B, T, l]
    return model.inputs(chunks, mu)


@torch.no_grad()
def iter_chunks(model: CALM, ae: ChunkAutoencoder, context: torch.Tensor, n_chunks: int, temperature: float = 1.0,
                candidates: int = 200, generator: rng.Gen = None, sampler: str = "batch",
                max_draws: int = 2000, stats: ExactStats | None = None) -> Iterator[torch.Tensor]:
    """Continue ``context`` chunks [B, T, K]: yields the next chunk [B, K] after every step (n_chunks
    steps; a consumer may stop early, as a server does at a stop string). Fed-back chunks go in
    through ``chunk_inputs``."""
    h, past = model.backbone.prefix(chunk_inputs(model, ae, context))  # [B, T, d]
    h, T = h[:, -1], context.shape[1]
    for j in range(n_chunks):
        c = next_chunks(model, ae, h, temperature, candidates, generator, sampler, max_draws, stats)  # [B, K]
        yield c
        if j == n_chunks - 1:
            break
        x = chunk_inputs(model, ae, c[:, None])  # [B, 1, d]
        h, past = model.backbone.extend(x, torch.tensor([T + j], device=x.device), past)
        h = h[:, -1]


def generate(model: CALM, ae: ChunkAutoencoder, context: torch.Tensor, n_chunks: int, temperature: float = 1.0,
             candidates: int = 200, generator: rng.Gen = None, sampler: str = "batch",
             max_draws: int = 2000, stats: ExactStats | None = None) -> torch.Tensor:
    """Continue ``context`` chunks [B, T, K] by n_chunks chunks -> tokens [B, n_chunks, K] (``iter_chunks``)."""
    return torch.stack(list(iter_chunks(model, ae, context, n_chunks, temperature, candidates, generator, sampler,
                                        max_draws, stats)), 1)
