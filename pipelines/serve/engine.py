"""What a served model does with one request, in plain PyTorch: CALM and the baseline as engines that
stream a completion step by step (CALM: one chunk of K tokens per step; the baseline: one token).

A request's ``n`` completions of one prompt are one batch (rows of the same context). Sampling stays
on the model's device with a generator seeded by the request's ``seed``, so a request gives the same
text streamed or not. ``Engine.stream`` yields, after every model step, the new text of each
completion (``pipelines.serve.text.StopCutter`` applies end-of-text, ``stop`` and ``max_tokens``).
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from calm_core import rng
from calm_core.artifacts import load_ae, load_model
from calm_core.generate import iter_chunks, prompt_chunks
from calm_core.tokenizer import CalmTokenizer
from pipelines.serve.text import StopCutter


@dataclass(frozen=True)
class GenRequest:
    """A validated completion request for one model (``pipelines.serve.api`` builds it)."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0  # the baseline's nucleus sampling
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    candidates: int = 200  # CALM, temperature < 1: head samples per step (batch approximation)
    sampler: str = "batch"  # CALM, temperature < 1: "batch" or "exact"
    max_draws: int = 2000  # CALM's exact sampler: draws per step before its fallback


@dataclass(frozen=True)
class Delta:
    """New text of completion ``index`` after a step; ``finish`` once it has ended."""

    index: int
    text: str
    finish: str | None
    tokens: int  # completion tokens so far


class Engine(ABC):
    """The model side of serving; subclasses implement ``_steps`` (token ids per row, per step)."""

    def __init__(self, tok: CalmTokenizer, device: torch.device, context_tokens: int, step_tokens: int):
        self.tok, self.device = tok, device
        self.context_tokens = context_tokens  # the trained context, in tokens
        self.step_tokens = step_tokens  # tokens per model step (K for CALM, 1 for the baseline)

    def stream(self, r: GenRequest) -> Iterator[list[Delta]]:
        """After every model step, the deltas of the completions that are still running (the last
        yield ends every completion)."""
        cutters = [StopCutter(self.tok, r.stop, r.max_tokens) for _ in range(r.n)]
        seed = r.seed if r.seed is not None else secrets.randbits(63)
        gen = rng.generator_for(self.device, seed)
        for ids in self._steps(r, gen):  # [n, tokens of this step]
            live = [(i, c) for i, c in enumerate(cutters) if not c.done]
            yield [Delta(i, c.push(ids[i]), c.finish, c.tokens) for i, c in live]
            if all(c.done for c in cutters):
                return
        yield [Delta(i, c.close(), c.finish, c.tokens) for i, c in enumerate(cutters) if not c.done]

    @abstractmethod
    def _steps(self, r: GenRequest, gen: torch.Generator) -> Iterator[list[list[int]]]:
        """The token ids each of the request's n rows gets at every model step."""


class CalmEngine(Engine):
    """CALM: backbone, energy head and the AE decoder; K tokens per step."""

    def __init__(self, ae_dir: str | Path, calm_dir: str | Path, device: str = "cpu"):
        ae = load_ae(ae_dir)
        calm = load_model(calm_dir, "calm", expected_ae_sha256=ae.sha256)
        dev = torch.device(device)
        self.model, self.ae = calm.model.to(dev).eval(), ae.model.to(dev).eval()
        K = self.model.K
        super().__init__(calm.tok, dev, self.model.mcfg.block_chunks * K, K)

    def _steps(self, r: GenRequest, gen: torch.Generator) -> Iterator[list[list[int]]]:
        K = self.step_tokens
        context, _ = prompt_chunks(r.prompt_ids, K, self.tok.eot_id, self.tok.pad_id)  # [1, T, K]
        context = context.expand(r.n, -1, -1).to(self.device)
        steps = math.ceil(r.max_tokens / K)
        for c in iter_chunks(self.model, self.ae, context, steps, r.temperature, r.candidates, gen, r.sampler,
                             r.max_draws):  # [n, K]
            yield c.tolist()


class BaselineEngine(Engine):
    """The same-backbone Transformer over tokens; one token per step."""

    def __init__(self, baseline_dir: str | Path, device: str = "cpu"):
        art = load_model(baseline_dir, "baseline")
        dev = torch.device(device)
        self.model = art.model.to(dev).eval()
        super().__init__(art.tok, dev, self.model.mcfg.block_chunks * self.model.K, 1)

    def _steps(self, r: GenRequest, gen: torch.Generator) -> Iterator[list[list[int]]]:
        prompt = torch.tensor([[self.tok.eot_id, *r.prompt_ids]] * r.n, device=self.device)  # [n, 1 + T]
        # temperature 0 is greedy: nucleus sampling with a vanishing top_p keeps only the most likely token
        t, top_p = (1.0, 1e-9) if r.temperature == 0.0 else (r.temperature, r.top_p)
        for x in self.model.iter_tokens(prompt, r.max_tokens, t, top_p, gen):  # [n]
            yield [[tok] for tok in x.tolist()]


