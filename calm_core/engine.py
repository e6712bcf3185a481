"""What a model computes to continue many requests at once, one model step at a time (CALM: a
chunk of K tokens per step; the baseline: one token), in plain PyTorch.

An engine gives three things to ``calm_core.batching.Batch``, which batches requests: ``prefill``
(the prompts of the requests that join -> their KV cache and last hidden states, in one pass),
``pick`` (hidden states of rows that share sampling settings -> their next token ids) and ``feed``
(the ids just picked -> next inputs). A request's ``n`` completions are n rows of the same prompt.
Sampling stays on the model's device with a generator seeded by the request's ``seed``; in a batch
each request's rows draw from its own generator (``calm_core.rng.Rows``), so a seeded request gives
the same text streamed or not, alone or batched with others (up to floating-point rounding of
batched matmuls). The settings are one ``calm_core.sampling.SamplingParams``, checked against
their limits where the request is accepted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from calm_core import rng
from calm_core.artifacts import load_ae, load_model
from calm_core.autoencoder import ChunkAutoencoder
from calm_core.baseline import TokenLM
from calm_core.calm_model import CALM
from calm_core.chunking import layout_of
from calm_core.generate import chunk_inputs, next_chunks, prompt_chunks
from calm_core.ragged import RaggedCache
from calm_core.sampling import SamplingParams, token_probs
from calm_core.temperature import ExactStats
from calm_core.tokenizer import CalmTokenizer
from calm_core.transformer import Backbone


@dataclass(frozen=True)
class GenRequest:
    """A prompt (token ids) and how to continue it."""

    prompt_ids: list[int]
    params: SamplingParams = SamplingParams()

    @classmethod
    def of(cls, prompt_ids: list[int], **settings) -> "GenRequest":
        """``GenRequest.of(ids, max_tokens=8, temperature=0.5, ...)``: the settings of SamplingParams."""
        if "stop" in settings:
            settings["stop"] = tuple(settings["stop"] or ())
        return cls(list(prompt_ids), SamplingParams(**settings))


@dataclass(frozen=True)
class Delta:
    """New text of completion ``index`` after a step; ``finish`` once it has ended."""

    index: int
    text: str
    finish: str | None
    tokens: int  # completion tokens so far


class Engine(ABC):
    """The model side of serving (see the module docstring)."""

    backbone: Backbone

    def __init__(self, tok: CalmTokenizer, device: torch.device, context_tokens: int, step_tokens: int,
                 layout: str = "document"):
        self.tok, self.device = tok, device
        self.layout = layout  # how the model's training text was laid out, and so its prompts (calm_core.chunking)
        self.context_tokens = context_tokens  # the trained context, in tokens
        self.step_tokens = step_tokens  # tokens per model step (K for CALM, 1 for the baseline)

    @abstractmethod
    def inputs(self, r: GenRequest) -> torch.Tensor:
        """The request's prompt as backbone inputs [T, d]."""

    @torch.no_grad()
    def prefill(self, rs: list[GenRequest]) -> tuple[torch.Tensor, RaggedCache]:
        """Prompts of several requests in one pass (``RaggedCache.prefill``) -> (hidden state after
        each prompt for each of its request's n rows [sum n, d], their cache)."""
        return RaggedCache.prefill(self.backbone, [self.inputs(r) for r in rs], [r.params.n for r in rs])

    @abstractmethod
    def pick(self, h: torch.Tensor, r: GenRequest, gen: rng.Gen) -> torch.Tensor:
        """Next token ids of rows sampled with ``r``'s settings: h [b, d] -> [b, step_tokens]."""

    @abstractmethod
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids just picked -> the next backbone inputs: [B, step_tokens] -> [B, 1, d]."""


class CalmEngine(Engine):
    """CALM: backbone, energy head and the AE decoder; K tokens per step."""

    def __init__(self, model: CALM, ae: ChunkAutoencoder, tok: CalmTokenizer, layout: str = "document"):
        self.model, self.ae = model.eval(), ae.eval()
        self.backbone = self.model.backbone
        self.stats: ExactStats | None = None  # set to count the exact sampler's draws and fallbacks
        K = self.model.K
        super().__init__(tok, next(model.parameters()).device, self.model.mcfg.block_chunks * K, K, layout)

    @classmethod
    def load(cls, ae_dir: str | Path, calm_dir: str | Path, device: str = "cpu") -> "CalmEngine":
        """RUN/calm and the AE it was trained on (checked by hash), onto ``device``."""
        ae = load_ae(ae_dir)
        calm = load_model(calm_dir, "calm", expected_ae_sha256=ae.sha256)
        return cls(calm.model.to(device), ae.model.to(device), calm.tok, layout_of(calm.cfg.data.layout))

    @torch.no_grad()
    def inputs(self, r: GenRequest) -> torch.Tensor:
        context, _ = prompt_chunks(r.prompt_ids, self.step_tokens, self.layout, self.tok.eot_id, self.tok.pad_id,
                                   self.tok.bos_id)
        return chunk_inputs(self.model, self.ae, context.to(self.device))[0]  # [T, d]

    @torch.no_grad()
    def pick(self, h: torch.Tensor, r: GenRequest, gen: rng.Gen) -> torch.Tensor:
        p = r.params
        return next_chunks(self.model, self.ae, h, p.temperature, p.candidates, gen, p.sampler, p.max_draws, self.stats)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return chunk_inputs(self.model, self.ae, ids[:, None])


class BaselineEngine(Engine):
    """The same-backbone Transformer over tokens; one token per step."""

    def __init__(self, model: TokenLM, tok: CalmTokenizer, layout: str = "document"):
        self.model = model.eval()
        self.backbone = self.model.backbone
        super().__init__(tok, next(model.parameters()).device, self.model.mcfg.block_chunks * self.model.K, 1, layout)

    @classmethod
    def load(cls, baseline_dir: str | Path, device: str = "cpu") -> "BaselineEngine":
        art = load_model(baseline_dir, "baseline")
        return cls(art.model.to(device), art.tok, layout_of(art.cfg.data.layout))

    @torch.no_grad()
    def inputs(self, r: GenRequest) -> torch.Tensor:
        start = self.tok.bos_id if self.layout == "packed" else self.tok.eot_id  # a document's start
        return self.model.embed(torch.tensor([start, *r.prompt_ids], device=self.device))  # [1 + T, d]

    @torch.no_grad()
    def pick(self, h: torch.Tensor, r: GenRequest, gen: rng.Gen) -> torch.Tensor:
        logits = F.linear(h, self.model.out_weight)  # [b, V]
        return rng.categorical(token_probs(logits, r.params.temperature, r.params.top_p), gen)[:, None]  # [b, 1]

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(ids)  # [B, 1, d]
