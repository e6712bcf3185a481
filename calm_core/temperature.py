"""Temperature without likelihoods (CALM.md section 4): pick a decoded chunk with probability
P_T(x) proportional to P(x)^(1/T), using only samples x ~ P (head sample -> AE decode).

Both samplers see P only through ``draw(rows, n)``: n independent decoded chunks for each of the
given rows, [b] -> [b, n, K].

Exact sampler (``exact_pick``), for 1/T = n + a with integer n >= 1 and 0 <= a < 1:
  stage 1   draw n chunks; if all n are the same chunk x*, go on with x*, else retry stage 1.
            Accepting x* has probability P(x*)^n.
  stage 2   (only when a > 0) a Bernoulli factory that succeeds with probability P(x*)^a: for
            i = 1, 2, ... draw x; if x = x* accept x*; otherwise, with probability a / i, restart
            from stage 1, else continue. Its success probability is
            sum_i p prod_{j<i} (1 - p)(1 - a/j) = p (1 - (1 - p))^(a-1) = p^a.
  A round thus ends in x* with probability P(x*)^(n+a) and rounds repeat until one does, so the
  pick has law P^(1/T) exactly. The expected number of draws grows like 1 / sum_x P(x)^(1/T):
  fine for peaked P or small n, hopeless for a flat P at small T. So it is capped: a row that has
  used ``max_draws`` draws without accepting falls back to the batch approximation below over
  ``candidates`` fresh draws; every fallback is counted in ``ExactStats`` (and biases only those rows).
  Draws are made ``batch`` at a time per row (parallel stage-1 attempts, or the next ``batch`` draws of
  the factory) so that one model call serves many attempts.

Batch approximation (``pick_by_counts``; the paper's default, T = 0.5 with 200 candidates): draw N
candidates, count identical chunks (count_c) and with s = 1/T pick among the chunks seen at least s
times with weight C(count_c, s) (the generalised binomial Gamma(count + 1) / (Gamma(s + 1)
Gamma(count - s + 1)) when s is not an integer), falling back to m = floor(s), ..., 1 with weight
C(count_c, m) when no chunk was seen often enough. For integer s, E[C(count_c, s)] = C(N, s) P(c)^s,
so the weights are unbiased for P^s and the pick is consistent as N grows (still biased at finite
N through the normalisation). For fractional s the generalised binomial has no such expectation: the
pick is a heuristic that over-weights frequent chunks (measured: at T = 0.8 on a Zipf toy over 5,000
chunks with N = 200, the 10 most likely chunks got 75% of the picks against the target's 58%). Use
the exact sampler when the law matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from calm_core import rng
from calm_core.sampling import exact_attempt_draws

Draw = Callable[[torch.Tensor, int], torch.Tensor]  # (rows [b], n) -> decoded chunks [b, n, K]


def _binom(count: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """C(count, m) = Gamma(count + 1) / (Gamma(m + 1) Gamma(count - m + 1)), for count >= m."""
    c, m = count.double(), m.double()
    return torch.exp(torch.lgamma(c + 1) - torch.lgamma(m + 1) - torch.lgamma(c - m + 1))


def pick_by_counts(chunks: torch.Tensor, temperature: float, generator: rng.Gen = None) -> torch.Tensor:
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
    i = rng.categorical(w, generator)  # [B]
    return chunks.gather(1, i[:, None, None].expand(-1, 1, chunks.shape[-1]))[:, 0]  # [B, K]


@dataclass
class ExactStats:
    rows: int = 0  # rows picked
    draws: int = 0  # decoded chunks drawn, over all rows (fallback candidates included)
    fallbacks: int = 0  # rows that hit max_draws and were picked by the batch approximation

    def add(self, other: "ExactStats") -> None:
        self.rows += other.rows
        self.draws += other.draws
        self.fallbacks += other.fallbacks


def exact_pick(draw: Draw, B: int, temperature: float, device: torch.device | str, max_draws: int = 2000,
               batch: int = 16, candidates: int = 200, generator: rng.Gen = None
               ) -> tuple[torch.Tensor, ExactStats]:
    """One chunk per row with law P^(1/T) (the module docstring's two stages) -> (chunks [B, K], stats)."""
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")
    if max_draws < 1:
        raise ValueError(f"max_draws must be >= 1, got {max_draws}")
    s = 1.0 / temperature
    n = exact_attempt_draws(temperature)
    a = s - n if s - n > 1e-9 else 0.0
    per_call = 1 if (n, a) == (1, 0.0) else max(n, batch - batch % n)  # whole stage-1 attempts per call
    # one attempt needs n = floor(1/T) draws: never more than max_draws of them at once (T = 1e-6 would
    # ask for a million decoded chunks in one call); when n > max_draws no attempt fits and every row
    # goes straight to the counted batch-approximation fallback
    per_call = min(per_call, (max_draws // n) * n)
    rows = torch.arange(B, device=device)
    result = cand = None  # [B, K] each, made once the first draw says K; cand: x* of the rows in stage 2
    done = torch.zeros(B, dtype=torch.bool, device=device)
    factory = torch.zeros(B, dtype=torch.bool, device=device)  # in stage 2
    i = torch.ones(B, dtype=torch.float64, device=device)  # factory draw index
    used = torch.zeros(B, dtype=torch.long, device=device)
    stats = ExactStats(rows=B)
    while per_call > 0:
        active = rows[~done & (used < max_draws)]
        if len(active) == 0:
            break
        x = draw(active, per_call)  # [b, D, K]
        if result is None:
            result = torch.zeros(B, x.shape[-1], dtype=x.dtype, device=device)
            cand = torch.zeros_like(result)
        used[active] += per_call
        stats.draws += len(active) * per_call
        # stage 1, for the rows not in the factory: the first attempt whose n draws agree
        st1 = ~factory[active]
        att = x.view(len(active), per_call // n, n, -1)  # [b, R, n, K]
        agree = (att == att[:, :, :1]).all(-1).all(-1)  # [b, R]
        ok = agree.any(-1) & st1  # [b]
        first = att[torch.arange(len(active), device=device), agree.float().argmax(-1), 0]  # [b, K]
        hit = active[ok]
        if a == 0.0:
            result[hit], done[hit] = first[ok], True
        else:
            cand[hit], factory[hit], i[hit] = first[ok], True, 1.0
        # stage 2, for the rows that were in the factory before this call: the draws in order
        if a > 0.0:
            fac = ~st1  # [b]
            for j in range(per_call):
                live = fac & ~done[active] & factory[active]
                if not live.any():
                    break
                r = active[live]
                same = (x[live, j] == cand[r]).all(-1)  # [b']
                result[r[same]], done[r[same]] = cand[r[same]], True
                other = r[~same]
                restart = rng.uniform((len(other),), device, rng.select(generator, other), dtype=torch.float64) < a / i[other]
                factory[other[restart]] = False
                i[other[~restart]] += 1.0
    left = rows[~done]
    if len(left):  # the attempt cap: the batch approximation for these rows, counted
        picks = pick_by_counts(draw(left, candidates), temperature, rng.select(generator, left))
        if result is None:
            result = torch.zeros(B, picks.shape[-1], dtype=picks.dtype, device=device)
        result[left] = picks
        stats.fallbacks += len(left)
        stats.draws += len(left) * candidates
    return result, stats
