"""Held-out evaluation of CALM and of the token baseline at the same points (CALM.md section 3).

Both models are scored at every chunk start of a held-out block of L chunks (L*K tokens): given
chunks 1..j, predict the first n tokens of chunk j+1, for j = 1..L-1. The context is the same for
both; only what each model predicts differs (a vector decoded into K tokens, or tokens one by one).

- CALM: R head samples of z_{j+1} per position, each decoded by the frozen AE (argmax), and the
  U-statistic of ``brier_u_statistic`` over their first n tokens. Also the energy loss with its
  fidelity and diversity terms.
- Baseline: cross-entropy and exact Brier-1 over every token; at the chunk starts, R sampled
  n-token continuations (``TokenLM.branches``) give both the probability estimate
  (``brier_n_from_probs``: exact P(y), the collision term from the samples' exact probabilities,
  Brier-1 fully exact) and the sample-only U-statistic, which must agree in expectation.

Every block draws its noise from its own generator, seeded by (seed, the block's ``key``)
(``block_generators``; keys default to the block's index): a block's figures do not depend on the
batch it is scored in, the order of the blocks or the worker that scores it, so the evaluation job
reproduces the in-training estimator on the same blocks and seed.

The energy loss has no scale of its own (on text whose chunks are nearly all unique, a small
change of chunk-level Brier moves it by a lot, or by little), so CALM's held-out loss comes with two
references on the same blocks (``reference_losses``): a perfect predictor, whose N samples are
draws from the true next chunk's posterior,

    loss_perfect = E[ 2 ||X - Y||^a - ||X - X'||^a ],   X, X', Y ~ q(z | true chunk)

and an unconditional one, whose samples are draws from the posteriors of other positions of the
same block (a sample of the block's marginal, blind to the context), ``loss_uncond``. The fraction
of that gap the model has closed, (loss_uncond - loss) / (loss_uncond - loss_perfect), is 0 for a
model no better than guessing some chunk of the text and 1 for the true posterior.

Two more references say how the loss rewards being partly right, and whether the model uses its
context at all:

- ``prefix_reference_losses``: a predictor that knows the first k tokens of the next chunk (k = 1,
  2, 3) and guesses the rest: each of its N samples is drawn from q(z | c'), where c' is the true
  chunk's first k tokens followed by the last K - k tokens of another position's chunk of the same
  block (the unconditional predictor's partner), encoded by the frozen AE. k = 0 is the
  unconditional predictor and k = K the perfect one; the gap each k closes is the partial credit
  the AE's geometry gives (a loss that stays near ``loss_uncond`` with 3 of 4 tokens known cannot
  see a model learning first tokens).
- ``shuffled_context_loss``: the model's own energy loss when the chunks it reads are shuffled
  across the block's positions (same chunks, same positions, wrong order): its excess over the
  loss is what the model takes from the order of its context.

``calm_block_scores`` / ``baseline_block_scores`` give per-block sums ([b] tensors, which the
evaluation job uses for confidence intervals); ``calm_heldout`` / ``baseline_heldout`` add them up
into float64 [1] sums that ranks all-reduce before ``heldout_record`` turns them into means and
BrierLM.
"""

from __future__ import annotations

import torch

from calm_core import rng
from calm_core.autoencoder import ChunkAutoencoder, decode_tokens
from calm_core.baseline import TokenLM
from calm_core.brierlm import ORDERS, brier1_exact, brier_lm, brier_n_estimates, brier_n_from_probs
from calm_core.calm_model import CALM
from calm_core.energy import posterior_energy_terms

Sums = dict[str, torch.Tensor]
BRANCHES_PER_PASS = 4096  # sampled baseline continuations decoded together (memory: this x vocabulary floats)


def block_generators(seed: int, keys: torch.Tensor) -> rng.Rows:
    """One CPU generator per block, seeded by (seed, block key) [b] (``calm_core.rng`` moves draws to
    the model's device)."""
    return rng.Rows([torch.Generator().manual_seed((seed * 1_000_003 + k) % (2 ** 63)) for k in keys.tolist()])


def _keys(val: dict[str, torch.Tensor]) -> torch.Tensor:
    return val["key"] if "key" in val else torch.arange(len(val["tokens"]))


def _add(total: dict[str, float], scores: dict[str, torch.Tensor]) -> None:
    for k, v in scores.items():
        total[k] = total.get(k, 0.0) + float(v.double().sum())


def _as_sums(sums: dict[str, float]) -> Sums:
    return {k: torch.tensor([v], dtype=torch.float64) for k, v in sums.items()}


@torch.no_grad()
def calm_block_scores(model: CALM, ae: ChunkAutoencoder, tokens: torch.Tensor, mu: torch.Tensor,
                      log_sigma: torch.Tensor, samples: int, gen: rng.Gen,
                      h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-block sums for blocks tokens [b, L, K], mu / log_sigma [b, L, l]: ``loss``, ``fidelity``,
    ``diversity`` (means over the block's L-1 positions, as the training loss), ``positions`` and
    ``brier1..4`` (sums over positions, from ``samples`` decoded head samples). -> {name: [b]}
    The loss is the energy loss of the head's samples for every head kind (the quadratic ablation's
    too), so heads compare on one scale. ``h``: the hidden states, when the caller has them."""
    m = model.hcfg
    h = model.hidden(tokens[:, :-1], mu[:, :-1]) if h is None else h  # [b, L-1, d]
    x = model.sample(h, m.n_samples, generator=gen)  # [b, L-1, N, l]
    fid, div = posterior_energy_terms(x, mu[:, 1:], log_sigma[:, 1:], m.n_targets, m.alpha, gen)  # [b, L-1]
    z = model.sample(h, samples, generator=gen)  # [b, L-1, R, l]
    b, P = tokens.shape[0], tokens.shape[1] - 1
    chunks = decode_tokens(ae, z).flatten(0, 1)  # [b*P, R, K]
    brier = brier_n_estimates(chunks, tokens[:, 1:].flatten(0, 1))  # {n: [b*P]}
    refs = reference_losses(mu[:, 1:], log_sigma[:, 1:], m.n_samples, m.n_targets, m.alpha, gen)  # draws after the above
    refs.update(prefix_reference_losses(ae, tokens[:, 1:], mu[:, 1:], log_sigma[:, 1:], m.n_samples, m.n_targets,
                                        m.alpha, gen))
    refs["loss_shuffled"] = shuffled_context_loss(model, tokens, mu, log_sigma, gen)
    return {"loss": (fid - div).mean(1), "fidelity": fid.mean(1), "diversity": div.mean(1),
            "positions": torch.full((b,), float(P)), **{f"brier{n}": brier[n].view(b, P).sum(1) for n in ORDERS},
            **refs}


def reference_losses(mu: torch.Tensor, log_sigma: torch.Tensor, n_samples: int, n_targets: int, alpha: float,
                     gen: rng.Gen) -> dict[str, torch.Tensor]:
    """The energy loss of two reference predictors at every position of blocks of posteriors
    mu / log_sigma [b, P, l] (the targets' chunks), as per-block means [b] like ``loss``:
    ``loss_perfect`` (N samples from the position's own posterior) and ``loss_uncond`` (each of the
    N samples from the posterior of another position of the same block, uniformly; P >= 2)."""
    b, P, l = mu.shape
    sigma = log_sigma.float().exp()
    x = mu.float().unsqueeze(-2) + sigma.unsqueeze(-2) * rng.normal((b, P, n_samples, l), mu.device, gen)
    fid, div = posterior_energy_terms(x, mu, log_sigma, n_targets, alpha, gen)  # [b, P]
    out = {"loss_perfect": (fid - div).mean(1)}
    if P < 2:
        return {**out, "loss_uncond": out["loss_perfect"]}
    j = _other_positions(b, P, n_samples, mu.device, gen)  # [b, P, N]
    y = _take(mu.float(), j) + _take(sigma, j) * rng.normal((b, P, n_samples, l), mu.device, gen)  # [b, P, N, l]
    fid, div = posterior_energy_terms(y, mu, log_sigma, n_targets, alpha, gen)
    return {**out, "loss_uncond": (fid - div).mean(1)}


def _other_positions(b: int, P: int, n: int, device: torch.device, gen: rng.Gen) -> torch.Tensor:
    """For every position of [b, P], n positions drawn uniformly among the other P - 1 (P >= 2) ->
    [b, P, n]."""
    j = (rng.uniform((b, P, n), device, gen) * (P - 1)).long().clamp_max(P - 2)  # [b, P, n] of P-1
    return j + (j >= torch.arange(P, device=device)[None, :, None]).long()  # skip the position itself


def _take(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Rows of t [b, P, d] at the positions j [b, P, n] of the same block -> [b, P, n, d]."""
    b, P, n = j.shape
    return torch.gather(t.unsqueeze(1).expand(b, P, P, t.shape[-1]), 2, j.unsqueeze(-1).expand(b, P, n, t.shape[-1]))


PREFIXES = (1, 2, 3)  # tokens of the next chunk the partial-credit references know


@torch.no_grad()
def prefix_reference_losses(ae: ChunkAutoencoder, tokens: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                            n_samples: int, n_targets: int, alpha: float, gen: rng.Gen,
                            known: tuple[int, ...] = PREFIXES) -> dict[str, torch.Tensor]:
    """The energy loss of predictors that know the first k tokens of the target chunk, for k in
    ``known`` (k < K): for target chunks tokens [b, P, K] with posteriors mu / log_sigma [b, P, l],
    sample n of position p is z ~ q(z | c'), c' = tokens[p, :k] + tokens[j, k:] for j another
    position of the block drawn uniformly (P >= 2), encoded by ``ae``; scored against the true
    posterior as ``loss``. -> {"loss_prefix{k}": [b]} (means over positions)."""
    b, P, K = tokens.shape
    if P < 2:
        return {}
    out = {}
    for k in (k for k in known if 0 < k < K):
        j = _other_positions(b, P, n_samples, mu.device, gen)  # [b, P, N]
        other = _take(tokens, j)  # [b, P, N, K]
        spliced = torch.cat([tokens[:, :, None, :k].expand(b, P, n_samples, k), other[..., k:]], -1)  # [b, P, N, K]
        m, ls = ae.encode(spliced.flatten(0, 2))  # [b*P*N, l] x 2
        m, s = m.float().view(b, P, n_samples, -1), ls.float().exp().view(b, P, n_samples, -1)
        x = m + s * rng.normal(tuple(m.shape), mu.device, gen)  # [b, P, N, l]
        fid, div = posterior_energy_terms(x, mu, log_sigma, n_targets, alpha, gen)  # [b, P]
        out[f"loss_prefix{k}"] = (fid - div).mean(1)
    return out


@torch.no_grad()
def shuffled_context_loss(model: CALM, tokens: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                          gen: rng.Gen) -> torch.Tensor:
    """The model's energy loss on blocks tokens [b, L, K] (mu / log_sigma [b, L, l]) when the L-1
    chunks it reads are put in a random order per block (each position still predicts its own next
    chunk) -> [b] (the mean over positions, as ``loss``)."""
    b, L, _ = tokens.shape
    m = model.hcfg
    perm = rng.uniform((b, L - 1), mu.device, gen).argsort(1)  # [b, L-1]
    take = lambda t: torch.gather(t[:, :-1], 1, perm[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    x = model.sample(model.hidden(take(tokens), take(mu)), m.n_samples, generator=gen)  # [b, L-1, N, l]
    fid, div = posterior_energy_terms(x, mu[:, 1:], log_sigma[:, 1:], m.n_targets, m.alpha, gen)
    return (fid - div).mean(1)


def gap_closed(loss: float, perfect: float, uncond: float) -> float:
    """The fraction of the gap from the unconditional to the perfect reference that ``loss`` has
    closed: (uncond - loss) / (uncond - perfect); 0 when the references coincide."""
    return (uncond - loss) / (uncond - perfect) if uncond != perfect else 0.0


def calm_heldout(model: CALM, ae: ChunkAutoencoder, val: dict[str, torch.Tensor], batch: int,
                 samples: int = 2, seed: int = 0) -> Sums:
    """Sums over held-out blocks (tokens [N, L, K], mu / log_sigma [N, L, l], optional ``key`` [N]) of
    ``calm_block_scores``, plus ``blocks``."""
    sums: dict[str, float] = {"blocks": 0.0}
    device = next(model.parameters()).device
    keys = _keys(val)
    was = model.training
    model.eval()
    for i in range(0, len(val["tokens"]), batch):
        tok, mu, ls = (val[k][i : i + batch].to(device) for k in ("tokens", "mu", "log_sigma"))
        _add(sums, calm_block_scores(model, ae, tok.long(), mu, ls, samples, block_generators(seed, keys[i : i + batch])))
        sums["blocks"] += tok.shape[0]
    model.train(was)
    return _as_sums(sums)


def _teacher_forced(logp_next: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Per-block sums of the teacher-forced pass (log-probabilities [b, T, V] of blocks tokens
    [b, T]): cross-entropy ``loss`` over non-pad targets, their count ``loss_tokens``, exact
    ``brier1_exact`` over every target and their count ``tokens``."""
    b, T = tokens.shape
    logp, target = logp_next[:, :-1], tokens[:, 1:]  # [b, T-1, V], [b, T-1]
    keep = target != pad_id
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)  # [b, T-1]
    return {"loss": (nll * keep).sum(1), "loss_tokens": keep.sum(1).double(),
            "brier1_exact": brier1_exact(logp.exp().flatten(0, 1), target.flatten()).view(b, -1).sum(1),
            "tokens": torch.full((b,), float(T - 1))}


@torch.no_grad()
def baseline_block_scores(lm: TokenLM, tokens: torch.Tensor, K: int, samples: int, gen: rng.Gen,
                          pad_id: int = -100) -> dict[str, torch.Tensor]:
    """Per-block sums for blocks tokens [b, L*K]: cross-entropy ``loss`` over non-pad targets and their
    count ``loss_tokens``, exact ``brier1_exact`` over every token (``tokens``), and at the L-1 chunk
    starts ``brier1..4`` from probabilities and ``sampled_brier1..4`` from ``samples`` sampled
    continuations (``positions``). One teacher-forced pass (inside ``TokenLM.branches``) serves all."""
    n = max(ORDERS)
    b, T = tokens.shape
    starts = torch.arange(K, T - n + 1, K, device=tokens.device)  # chunk starts with n true tokens after them
    br = lm.branches(tokens, starts, n, samples, generator=gen)
    P = len(starts)
    probs = brier_n_from_probs(br.logp_true.flatten(0, 1), br.logp.flatten(0, 1), br.collision1.flatten())
    truth = tokens[:, starts[:, None] + torch.arange(n, device=tokens.device)].flatten(0, 1)  # [b*P, n]
    sampled = brier_n_estimates(br.samples.flatten(0, 1), truth)
    return {**_teacher_forced(br.logp_next, tokens, pad_id), "positions": torch.full((b,), float(P)),
            **{f"brier{k}": probs[k].view(b, P).sum(1) for k in ORDERS},
            **{f"sampled_brier{k}": sampled[k].view(b, P).sum(1) for k in ORDERS}}


@torch.no_grad()
def baseline_every_token_scores(lm: TokenLM, tokens: torch.Tensor, gen: rng.Gen, pad_id: int = -100,
                                starts_per_pass: int = 512) -> dict[str, torch.Tensor]:
    """The official baseline estimator (train/train_ar.py, ``compute_loss``) at every position of
    blocks tokens [b, T]: for each t = 1..T-4 (context tokens[:t], true continuation y_1..4), one
    path x1 sampled token by token with a second draw x2 beside it at every step (never followed):

        Brier-n(t) = 2 P(y_1..n)  -  1[x1_<n = x2_<n] * sum_x P(x | context, x1_<n)^2

    The true continuation's probability is exact; the collision sum_{x_1..n} P(x_1..n)^2 is estimated
    without bias (E over x1_<n, x2_<n of the indicator times the exact last-step sum is the sum over
    prefixes of P(prefix)^2 times the last step's); Brier-1 is exact. ``starts_per_pass`` bounds the
    branch step's logits (positions x V floats). -> per-block sums ``brier1..4`` over the T-4
    positions (``positions``) and the teacher-forced ``loss`` / ``brier1_exact`` sums."""
    n = max(ORDERS)
    b, T = tokens.shape
    starts = torch.arange(1, T - n + 1, device=tokens.device)  # every position with n true tokens after it
    br = lm.branches(tokens, starts, n, 1, generator=gen, twins=True, starts_per_pass=starts_per_pass)
    p_true = br.logp_true.double().cumsum(-1).exp()  # [b, S, n]
    x1, x2 = br.samples[:, :, 0], br.twins[:, :, 0]  # [b, S, n]
    agree = (x1 == x2).double().cumprod(-1)  # [b, S, n]: the first j + 1 tokens of the two draws agree
    same = torch.cat([torch.ones_like(agree[..., :1]), agree[..., :-1]], -1)  # [b, S, n]: the first j agree
    brier = 2.0 * p_true - same * br.collision[:, :, 0].double()  # [b, S, n]
    return {**_teacher_forced(br.logp_next, tokens, pad_id), "positions": torch.full((b,), float(len(starts))),
            **{f"brier{k}": brier[..., k - 1].sum(1) for k in ORDERS}}


def baseline_heldout(lm: TokenLM, val: dict[str, torch.Tensor], batch: int, K: int, samples: int = 2,
                     seed: int = 0, pad_id: int = -100) -> Sums:
    """Sums over held-out blocks (tokens [N, L, K], optional ``key`` [N]) of ``baseline_block_scores``,
    plus ``blocks``; the cross-entropy ignores ``pad_id`` targets, as training does."""
    sums: dict[str, float] = {"blocks": 0.0, "loss": 0.0, "loss_tokens": 0.0, "brier1_exact": 0.0, "tokens": 0.0,
                              "positions": 0.0, **{f"brier{n}": 0.0 for n in ORDERS},
                              **{f"sampled_brier{n}": 0.0 for n in ORDERS}}
    if len(val["tokens"]) == 0:
        return _as_sums(sums)
    device = next(lm.parameters()).device
    keys = _keys(val)
    T = val["tokens"][0].numel()
    rows = max(1, min(batch, BRANCHES_PER_PASS // (max(1, T // K) * samples)))  # bounds the [rows, S*R, V] logits
    was = lm.training
    lm.eval()
    for i in range(0, len(val["tokens"]), rows):
        tok = val["tokens"][i : i + rows].to(device).flatten(1).long()  # [b, L*K]
        _add(sums, baseline_block_scores(lm, tok, K, samples, block_generators(seed, keys[i : i + rows]), pad_id))
        sums["blocks"] += tok.shape[0]
    lm.train(was)
    return _as_sums(sums)


def heldout_record(kind: str, tot: Sums) -> dict[str, float]:
    """Means and BrierLM from (all-reduced) sums: val_loss (CALM: per block; baseline: per non-pad
    token), val_brier1..4, val_brierlm, and
    CALM: val_fidelity, val_diversity; baseline: val_brier1_exact (every token) and
    val_sampled_brier1..4 / val_sampled_brierlm (the sample-only estimate beside the main one)."""
    blocks = max(1.0, float(tot["blocks"]))
    pos = max(1.0, float(tot["positions"]))
    brier = {n: float(tot[f"brier{n}"]) / pos for n in ORDERS}
    loss = float(tot["loss"]) / (blocks if kind == "calm" else max(1.0, float(tot["loss_tokens"])))
    rec = {"val_loss": loss, **{f"val_brier{n}": brier[n] for n in ORDERS},
           "val_brierlm": brier_lm(brier), "val_positions": pos}
    if kind == "calm":
        rec["val_fidelity"] = float(tot["fidelity"]) / blocks
        rec["val_diversity"] = float(tot["diversity"]) / blocks
        if "loss_perfect" in tot:  # the loss's scale: the two reference predictors and the gap closed
            perfect, uncond = float(tot["loss_perfect"]) / blocks, float(tot["loss_uncond"]) / blocks
            rec.update({"val_loss_perfect": perfect, "val_loss_uncond": uncond,
                        "val_gap_closed": gap_closed(loss, perfect, uncond)})
            for k in PREFIXES:  # partial credit: the gap closed by knowing the first k tokens
                if f"loss_prefix{k}" in tot:
                    rec[f"val_loss_prefix{k}"] = float(tot[f"loss_prefix{k}"]) / blocks
                    rec[f"val_gap_prefix{k}"] = gap_closed(rec[f"val_loss_prefix{k}"], perfect, uncond)
        if "loss_shuffled" in tot:  # the context ablation
            rec["val_loss_shuffled"] = float(tot["loss_shuffled"]) / blocks
    else:
        rec["val_brier1_exact"] = float(tot["brier1_exact"]) / max(1.0, float(tot["tokens"]))
        sampled = {n: float(tot[f"sampled_brier{n}"]) / pos for n in ORDERS}
        rec.update({f"val_sampled_brier{n}": sampled[n] for n in ORDERS})
        rec["val_sampled_brierlm"] = brier_lm(sampled)
    return rec
