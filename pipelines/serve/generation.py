"""Text generation from a trained run: RUN/calm + the AE it was trained on -> text.

Plain PyTorch: one request through the step engine the server runs (``calm_core.engine``,
``calm_core.batching``), its settings checked by the same ``SamplingParams``; offline, only the
exact sampler's floor limits what a user asks for. Imports no training code (tests/test_layering.py).
The CALM artifact names its AE by hash; another AE is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calm_core.artifacts import load_ae, load_model
from calm_core.autoencoder import ChunkAutoencoder
from calm_core.calm_model import CALM
from calm_core.chunking import layout_of
from calm_core.batching import Batch, Member
from calm_core.engine import CalmEngine, GenRequest
from calm_core.generate import prompt_chunks
from calm_core.sampling import SamplingLimits, SamplingParams
from calm_core.temperature import ExactStats
from calm_core.tokenizer import CalmTokenizer
from pipelines.storage import RunDir


# offline, the user pays for what they ask: no budget but the exact sampler's floor (one attempt must fit)
OFFLINE = SamplingLimits(max_tokens=1 << 40, max_n=1 << 20, max_candidates=1 << 40, max_draws=1 << 40,
                         max_step_draws=1 << 62, max_request_tokens=1 << 62)


@dataclass
class Generator:
    model: CALM
    ae: ChunkAutoencoder
    tok: CalmTokenizer
    layout: str = "document"  # how the model's training text was laid out (calm_core.chunking): its prompts too

    @classmethod
    def from_run(cls, run: RunDir, ae_path: str | None = None, device: str = "cpu") -> "Generator":
        """Load RUN/calm and its AE (RUN/ae or ``ae_path``), checking the AE's hash, onto ``device``
        ("auto": a GPU when there is one)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ae = load_ae(Path(ae_path) if ae_path else run.local_artifact("ae"))
        calm = load_model(run.local_artifact("calm"), "calm", expected_ae_sha256=ae.sha256)
        return cls(calm.model.to(device).eval(), ae.model.to(device).eval(), calm.tok, layout_of(calm.cfg.data.layout))

    def complete(self, prompt: str, chunks: int = 16, temperature: float = 1.0, candidates: int = 200,
                 seed: int = 0, stop_at_end: bool = True, sampler: str = "batch", max_draws: int = 2000) -> dict:
        """Continue ``prompt`` by ``chunks`` chunks (K tokens each). The text stops at the first
        end-of-text, or (``stop_at_end=False``) shows every document break as a new line. Sampling
        stays on the model's device (a generator seeded with ``seed`` there); ``sampler`` "exact"
        reports its draws and attempt-cap fallbacks under "exact". Settings out of range raise
        ``calm_core.sampling.SamplingError`` naming them."""
        tok, K, L = self.tok, self.model.K, self.model.mcfg.block_chunks
        params = SamplingParams(max(chunks, 0) * K, temperature, seed=seed, candidates=candidates, sampler=sampler,
                                max_draws=max_draws, ignore_eos=not stop_at_end).check("calm", OFFLINE)
        ids = tok.encode(prompt)
        room = max(0, L - chunks - 1) * K  # prompt tokens that fit in the trained context with the output
        cut = ids[len(ids) - room:] if len(ids) > room else ids
        _, kept = prompt_chunks(cut, K, self.layout, tok.eot_id, tok.pad_id, tok.bos_id)
        warning = None
        if chunks > L - 1:
            warning = (f"{chunks} chunks exceed the {L}-chunk context the model was trained on "
                       f"(model.block_chunks); positions beyond it are extrapolated")
        elif len(ids) > room:
            warning = f"the prompt was cut to its last {room} tokens to fit the {L}-chunk trained context"
        engine = CalmEngine(self.model, self.ae, tok, self.layout)  # the step engine the server runs, one request here
        engine.stats = stats = ExactStats()
        batch = Batch(engine)
        member = Member.start(engine, GenRequest(cut, params), keep_ids=True)
        t0 = time.perf_counter()
        batch.join([member])
        steps = 0
        while batch.members:
            batch.step()
            steps += 1
            if batch.failed:
                raise batch.failed[0][1]
        seconds = time.perf_counter() - t0
        out = member.ids[0]  # [steps * K]: every picked id (at end-of-text the rest of that chunk too)
        ended = tok.eot_id in out
        docs = [[]]  # the generated ids split at end-of-text
        for i in out:
            if i == tok.eot_id:
                docs.append([])
            else:
                docs[-1].append(i)
        if stop_at_end:
            docs = docs[:1]
        elif not docs[-1]:
            docs.pop()  # ended exactly at an end-of-text
        text = "\n".join(tok.decode(d) for d in docs)
        generated = len(docs[0]) if stop_at_end else len(out)
        return {"prompt_used": tok.decode(kept), "completion": text, "tokens": generated,
                "chunks": chunks, "steps": steps, "ended": ended, "seconds": seconds, "warning": warning,
                "exact": vars(stats) if sampler == "exact" and temperature < 1.0 else None}
