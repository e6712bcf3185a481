"""The discrete baseline: the same causal Transformer backbone over tokens with a softmax head.

    h      = Backbone(E[x_1..x_{T}])                      [B, T, d]
    logits = h E^T                                         tied input embedding   [B, T, V]
             (or h W^T with its own ``lm_head`` W when ``model.tie_embeddings`` is off, as the official
             baselines are)
    loss   = mean_t CE(logits_t, x_{t+1})

Trained on the same tokenizer, corpus and split as CALM (blocks of L*K tokens), so the two can be
compared at equal training FLOPs (``baseline_train_flops_per_token``).

For BrierLM, ``branches`` samples R continuations of n tokens after every given start of a block
from one cached pass over the block (``Backbone.extend``): branch (s, r) sees the block before
start s and its own sampled tokens, nothing else. With ``twins`` each step also gives the exact
collision sum_x P(x)^2 and a second draw, which the official estimator needs at every position.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from calm_core import rng
from calm_core.config import ModelConfig
from calm_core.layers import init_weights
from calm_core.sampling import token_probs
from calm_core.transformer import backbone_flops_per_position, backbone_of


class Branches(NamedTuple):
    samples: torch.Tensor  # [B, S, R, n] sampled continuation tokens
    logp: torch.Tensor  # [B, S, R, n] log P(x_i | context, x_<i) along each sample
    logp_true: torch.Tensor  # [B, S, n] log P(y_i | context, y_<i) of the true continuation
    collision1: torch.Tensor  # [B, S] sum_x P(x)^2 of the first token
    logp_next: torch.Tensor  # [B, T, V] log P(next token | tokens up to t): the teacher-forced pass
    collision: torch.Tensor | None = None  # [B, S, R, n] sum_x P(x | context, x_<i)^2 at every step (``twins``)
    twins: torch.Tensor | None = None  # [B, S, R, n] a second token drawn at every step from the same
    #                                    distribution as the sample, never followed (``twins``)


class TokenLM(nn.Module):
    def __init__(self, model: ModelConfig, vocab_size: int, K: int):
        super().__init__()
        self.mcfg, self.K = model, K
        self.embed = nn.Embedding(vocab_size, model.d_model)
        self.backbone = backbone_of(model)
        self.lm_head = None if model.tie_embeddings else nn.Linear(model.d_model, vocab_size, bias=False)
        init_weights(self)

    @property
    def out_weight(self) -> torch.Tensor:
        """The output projection [V, d]: the input embedding (tied) or the own ``lm_head``."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> next-token logits [B, T, V]."""
        h = self.backbone(self.embed(tokens.long()))
        return F.linear(h, self.out_weight)

    def branches(self, tokens: torch.Tensor, starts: torch.Tensor, n: int, R: int,
                 generator: rng.Gen = None, temperature: float = 1.0, twins: bool = False,
                 starts_per_pass: int = 0) -> Branches:
        """Sample R continuations of n tokens after each start (a continuation of tokens[:, :e]),
        at softmax ``temperature`` (``calm_core.sampling.token_probs``; the log-probabilities returned
        stay the model's).

        tokens [B, T]; starts [S] with 1 <= e and e + n <= T. -> Branches with samples [B, S, R, n],
        their log-probabilities [B, S, R, n], the true continuation's [B, S, n], the exact
        first-token collision sum_x P(x)^2 [B, S], and the block's own next-token log-probabilities.
        ``twins``: also the exact collision sum_x P(x)^2 at every step of every branch and a second
        token drawn there (the official baseline estimator, ``calm_core.evaluate``).
        ``starts_per_pass``: grow the branches of at most this many starts at a time (0: all), which
        bounds the step's logits [B, starts x R, V] and attention; the teacher-forced pass is shared.
        """
        B, T = tokens.shape
        S = len(starts)
        if int(starts.min()) < 1 or int(starts.max()) + n > T:
            raise ValueError(f"starts must lie in [1, {T - n}] for {n}-token continuations of {T} tokens")
        h, past = self.backbone.prefix(self.embed(tokens.long()))
        logp = F.linear(h, self.out_weight).float().log_softmax(-1)  # [B, T, V]
        idx = starts[:, None] - 1 + torch.arange(n, device=starts.device)  # [S, n] positions predicting y_i
        true = tokens[:, idx + 1].long()  # [B, S, n]
        logp_true = logp[:, idx].gather(-1, true[..., None]).squeeze(-1)  # [B, S, n]
        collision1 = logp[:, starts - 1].exp().pow(2).sum(-1)  # [B, S]
        step = starts_per_pass or S
        grown = [self._grow(tokens, logp, past, starts[a:a + step], n, R, generator, temperature, twins)
                 for a in range(0, S, step)]
        shape = (B, S, R, n)
        parts = [torch.cat([g[i] for g in grown], 1).view(shape) if grown[0][i] is not None else None
                 for i in range(4)]
        return Branches(parts[0], parts[1], logp_true, collision1, logp, parts[2], parts[3])

    def _grow(self, tokens: torch.Tensor, logp: torch.Tensor, past, starts: torch.Tensor, n: int, R: int,
              generator: rng.Gen, temperature: float, twins: bool):
        """The branches of ``starts`` [S] over the teacher-forced pass (log-probabilities ``logp``
        [B, T, V], cache ``past``) -> samples, their log-probabilities, and with ``twins`` the
        step collisions and second draws, each [B, S*R, n] (None without ``twins``)."""
        T, S = tokens.shape[1], len(starts)
        # branch b = (s, r) flattened to S*R; the block's keys before e_s are visible to it
        see_block = (torch.arange(T, device=tokens.device)[None, :] < starts[:, None]).repeat_interleave(R, 0)
        step_logp = logp[:, starts - 1].repeat_interleave(R, 1)  # [B, S*R, V]
        samples, logps, collision, second = [], [], [], []
        for i in range(n):
            probs = token_probs(step_logp, temperature)
            x = rng.categorical(probs, generator)  # [B, S*R]
            samples.append(x)
            logps.append(step_logp.gather(-1, x[..., None]).squeeze(-1))
            if twins:
                collision.append(step_logp.exp().pow(2).sum(-1))  # [B, S*R]
                second.append(rng.categorical(probs, generator))
            if i == n - 1:
                break
            own = torch.eye(S * R, dtype=torch.bool, device=tokens.device).repeat(1, i + 1)  # own earlier tokens
            mask = torch.cat([see_block, own], dim=1)  # [S*R, T + (i+1)*S*R]
            pos = (starts + i).repeat_interleave(R)  # RoPE position of token i of each branch
            h, past = self.backbone.extend(self.embed(x), pos, past, mask)
            step_logp = F.linear(h, self.out_weight).float().log_softmax(-1)  # [B, S*R, V]
        stack = lambda xs: torch.stack(xs, -1) if xs else None  # noqa: E731
        return stack(samples), stack(logps), stack(collision), stack(second)

    @torch.no_grad()
    def iter_tokens(self, prompt: torch.Tensor, n: int, temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Sample up to n tokens after prompt [B, T] with a KV cache, yielding each [B] as it is drawn.
        At temperature T the token is drawn from softmax(logits / T) (T = 0: greedy) within the nucleus
        ``top_p`` (``calm_core.sampling.token_probs``). This model has likelihoods."""
        h, past = self.backbone.prefix(self.embed(prompt.long()))
        logits, T = F.linear(h[:, -1], self.out_weight), prompt.shape[1]
        for i in range(n):
            probs = token_probs(logits, temperature, top_p)  # [B, V]
            x = rng.categorical(probs, generator)  # [B], on the generator's device
            yield x
            if i == n - 1:
                break
            h, past = self.backbone.extend(self.embed(x[:, None]), torch.tensor([T + i], device=x.device), past)
            logits = F.linear(h[:, -1], self.out_weight)

    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n tokens after prompt [B, T] -> [B, n] (``iter_tokens``)."""
        return torch.stack(list(self.iter_tokens(prompt, n, temperature, 1.0, generator)), 1)

    def forward(self, tokens: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over tokens [B, T] (targets equal to pad_id are ignored)."""
        logits = self.logits(tokens[:, :-1])
        target = tokens[:, 1:].long()
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                               ignore_index=-100 if pad_id is None else pad_id)


def baseline_train_flops_per_token(model: TokenLM) -> dict[str, float]:
    """Training FLOPs per token, documented:

        backbone     : backbone_flops_per_position(d, layers, ffn, T = L*K - 1)
        softmax head : 6 * V * d              (tied embedding; the lookup is free)
    """
    m = model.mcfg
    backbone = backbone_flops_per_position(m.d_model, m.n_layers, m.ffn_dim, m.block_chunks * model.K - 1,
                                           (m.n_kv_heads or m.n_heads) / m.n_heads)
    head = 6.0 * model.out_weight.numel()
    return {"backbone": backbone, "head": head, "total": backbone + head}
