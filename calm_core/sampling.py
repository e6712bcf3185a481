"""Sampling settings, their limits, and the token models' temperature: one definition for every
caller (offline generation, serving, evaluation, benchmarks).

Token models (the baseline) have likelihoods: at temperature T the next token is drawn from

    p_T(x) = softmax(logits / T)(x)          T = 0: the argmax (greedy)

restricted to the smallest set of most likely tokens whose mass reaches ``top_p`` (nucleus
sampling) and renormalised (``token_probs``). CALM has none: T = 1 is one head sample, T < 1 the
batch approximation over ``candidates`` head samples or the exact sampler, whose one attempt is
floor(1/T) agreeing draws (``exact_attempt_draws``; CALM.md section 4, ``calm_core.temperature``).

``SamplingParams.check`` enforces the limits where a request is accepted, so that no request can
ask a model for unbounded work: per request the completions (max_tokens x n x prompts), per step
the decoded head samples (n x candidates, or n x max_draws for the exact sampler), the exact
sampler's temperature floor, the stop strings; it raises ``SamplingError`` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SAMPLERS = ("batch", "exact")
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what a torch generator's manual_seed takes


class SamplingError(ValueError):
    """A sampling setting out of its range: ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingLimits:
    """What one request may ask for (``serve.*`` on a server; offline generation uses the defaults)."""

    max_tokens: int = 1024
    max_n: int = 16
    max_candidates: int = 2000
    max_draws: int = 2000
    max_step_draws: int = 8192  # decoded head samples per step of one request: n x candidates | n x max_draws
    max_request_tokens: int = 16384  # max_tokens x n x prompts
    max_stops: int = 4
    max_stop_chars: int = 128


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. ``candidates``, ``sampler`` and ``max_draws`` are CALM's (T < 1);
    ``top_p`` is the baseline's."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    candidates: int = 200
    sampler: str = "batch"
    max_draws: int = 2000
    ignore_eos: bool = False  # go on past end-of-text (offline generation's --no-stop; ids are kept)

    def group(self) -> tuple:
        """The settings that must be equal for rows to be sampled in one call."""
        return self.temperature, self.top_p, self.candidates, self.sampler, self.max_draws

    def step_draws(self, kind: str) -> int:
        """Decoded head samples one step of this request costs (CALM; 0 for the baseline)."""
        if kind != "calm":
            return 0
        if self.temperature == 1.0:
            return self.n
        return self.n * (self.max_draws if self.sampler == "exact" else self.candidates)

    def check(self, kind: str, limits: SamplingLimits = SamplingLimits(), prompts: int = 1) -> "SamplingParams":
        """Raise ``SamplingError`` for the first setting out of range for a ``kind`` ("calm" |
        "baseline") model under ``limits``; returns self."""
        def bad(param: str, message: str):
            raise SamplingError(param, message)

        if not 1 <= self.max_tokens <= limits.max_tokens:
            bad("max_tokens", f"max_tokens must be in 1..{limits.max_tokens}, got {self.max_tokens}")
        if not 1 <= self.n <= limits.max_n:
            bad("n", f"n must be in 1..{limits.max_n}, got {self.n}")
        calm = kind == "calm"
        t = self.temperature
        if not ((0.0 < t <= 1.0) if calm else (0.0 <= t <= 2.0)):
            why = " (CALM samples without likelihoods: T = 1 is one head sample, T < 1 sharpens)" if calm else ""
            bad("temperature", f"temperature must be in {'(0, 1]' if calm else '[0, 2]'} for {kind}, got {t}{why}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if calm and self.top_p != 1.0:
            bad("top_p", "top_p needs token probabilities, which CALM does not have; use temperature")
        if self.sampler not in SAMPLERS:
            bad("sampler", f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not 1 <= self.candidates <= limits.max_candidates:
            bad("candidates", f"candidates must be in 1..{limits.max_candidates}, got {self.candidates}")
        if not 1 <= self.max_draws <= limits.max_draws:
            bad("max_draws", f"max_draws must be in 1..{limits.max_draws}, got {self.max_draws}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            bad("seed", f"seed must be in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
        if self.step_draws(kind) > limits.max_step_draws:
            what = "max_draws" if self.sampler == "exact" else "candidates"
            bad(what, f"n x {what} = {self.n} x {getattr(self, what):,} decoded samples per step is over the budget "
                      f"of {limits.max_step_draws:,} (serve.max_step_draws); lower n or {what}")
        if calm and t < 1.0 and self.sampler == "exact" and exact_attempt_draws(t) > self.max_draws:
            bad("temperature", f"the exact sampler at temperature {t} needs {exact_attempt_draws(t):,} draws per "
                               f"attempt, more than max_draws ({self.max_draws}); use temperature >= "
                               f"{1.0 / self.max_draws:.2g} or sampler 'batch'")
        if self.max_tokens * self.n * prompts > limits.max_request_tokens:
            bad("max_tokens", f"max_tokens x n x prompts = {self.max_tokens} x {self.n} x {prompts} completion tokens "
                              f"is over the {limits.max_request_tokens:,} of one request; split the request")
        if len(self.stop) > limits.max_stops or any(not 1 <= len(s) <= limits.max_stop_chars for s in self.stop):
            bad("stop", f"stop must be up to {limits.max_stops} non-empty strings of at most "
                        f"{limits.max_stop_chars} characters")
        return self


def exact_attempt_draws(temperature: float) -> int:
    """Draws of one attempt of the exact sampler at ``temperature``: n = floor(1/T) (at least 1)."""
    return max(1, math.floor(1.0 / temperature + 1e-9))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering of probs [B, V]: keep the most likely tokens until their mass reaches top_p
    (at least one), renormalised; top_p >= 1 returns probs unchanged."""
    if top_p >= 1.0:
        return probs
    p, idx = probs.sort(-1, descending=True)
    keep = (p.cumsum(-1) - p) < top_p  # the mass before a token is still short of top_p
    p = p * keep
    return torch.zeros_like(probs).scatter(-1, idx, p / p.sum(-1, keepdim=True))


def token_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """p_T restricted to the nucleus: logits [.., V] (or log-probabilities) -> probabilities [.., V].
    T = 0 is greedy (the argmax alone)."""
    if temperature == 0.0:
        return nucleus(logits.float().softmax(-1), 1e-9)
    return nucleus((logits.float() / temperature).softmax(-1), top_p)
