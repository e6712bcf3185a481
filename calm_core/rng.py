"""Random draws that are correct on any device: the one rule every draw in ``calm_core`` follows.

THE RULE. A draw is made on the device of the generator that seeds it, then moved to where it is
used. Without a generator it is made directly on the target device from that device's global RNG.

    draw device = generator.device if a generator is given, else the target device

Why: a CUDA kernel cannot take a CPU ``torch.Generator`` ("Expected a 'cuda' device type for
generator but found 'cpu'", seen on an H200 when stage 2 validated with a CPU generator), and CPU
tests cannot catch it (the CPU and meta devices accept any generator). With the rule:
- a seeded CPU generator gives the same numbers whatever device the model is on (evaluation uses
  one: the same held-out figures on a laptop and on a GPU node), at the price of a host-to-device
  copy of the noise;
- a generator on the model's device keeps every draw there (generation creates its generator on
  the model's device: no host round trip per step, which cost the baseline 1.4-1.8x on an H200);
- training draws from the global RNG of the device (``torch.manual_seed`` seeds CPU and CUDA).

Every function here takes the target ``device`` (or a tensor that lives there) and an optional
``generator``; no other module in ``calm_core`` calls ``torch.rand``/``randn``/``multinomial``/
``bernoulli`` or their ``_like`` forms (tests/test_rng.py checks it by recording every draw).
Weight initialisation (``nn.init``) and ``F.dropout`` use the global RNG of the parameters'
device and need no generator.

Batched requests (serving): ``Rows`` stands in for a generator when the rows of a batch belong to
different requests, each with its own seeded generator. A draw of shape [B, ..] then takes each run
of rows [b, ..] from that run's generator, so a request gets the same numbers alone or batched with
others (``select`` keeps the generators of a subset of rows, for samplers that redraw some rows).
"""

from __future__ import annotations

import torch


class Rows:
    """Per-row generators: row i of a batched draw comes from ``gens[i]`` (a request's rows are
    consecutive and share its generator)."""

    def __init__(self, gens: list[torch.Generator]):
        self.gens = list(gens)

    def runs(self) -> list[tuple[torch.Generator, int]]:
        """(generator, rows) for each run of consecutive rows with the same generator."""
        out: list[tuple[torch.Generator, int]] = []
        for g in self.gens:
            if out and out[-1][0] is g:
                out[-1] = (g, out[-1][1] + 1)
            else:
                out.append((g, 1))
        return out

    def repeat(self, n: int) -> "Rows":
        """Each row's generator for n consecutive rows (a row stretched over n sub-rows)."""
        return Rows([g for g in self.gens for _ in range(n)])

    def check(self, rows: int) -> None:
        if rows != len(self.gens):
            raise ValueError(f"a draw of {rows} rows with generators for {len(self.gens)} rows")


Gen = torch.Generator | Rows | None


def select(generator: Gen, rows: torch.Tensor) -> Gen:
    """The generator(s) of a subset of rows (``rows`` [b] indices); a plain generator is kept."""
    if isinstance(generator, Rows):
        return Rows([generator.gens[i] for i in rows.tolist()])
    return generator


def _draw_device(device: torch.device | str, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def uniform(shape: tuple[int, ...], device: torch.device | str, generator: Gen = None,
            low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U(low, high) of ``shape`` on ``device`` (drawn on the generator's device, then moved)."""
    if isinstance(generator, Rows):
        generator.check(shape[0])
        return torch.cat([uniform((n, *shape[1:]), device, g, low, high, dtype) for g, n in generator.runs()])
    u = torch.rand(shape, generator=generator, device=_draw_device(device, generator), dtype=torch.float32)
    return (low + (high - low) * u).to(device=device, dtype=dtype)


def normal(shape: tuple[int, ...], device: torch.device | str, generator: Gen = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) of ``shape`` on ``device`` (drawn on the generator's device, then moved)."""
    if isinstance(generator, Rows):
        generator.check(shape[0])
        return torch.cat([normal((n, *shape[1:]), device, g, dtype) for g, n in generator.runs()])
    z = torch.randn(shape, generator=generator, device=_draw_device(device, generator), dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


def normal_like(x: torch.Tensor, generator: Gen = None) -> torch.Tensor:
    return normal(tuple(x.shape), x.device, generator, x.dtype)


def bernoulli_mask(shape: tuple[int, ...], p: float, device: torch.device | str,
                   generator: Gen = None) -> torch.Tensor:
    """Boolean mask, each entry True with probability p."""
    return uniform(shape, device, generator) < p


def categorical(weights: torch.Tensor, generator: Gen = None) -> torch.Tensor:
    """One index per row, P(i) proportional to weights[.., i] (>= 0, not all 0): [.., V] -> [..] (long).

    Sampled where the generator lives: on the weights' own device when the generator is there (or
    absent), so a GPU model with a GPU generator never copies probabilities to the host."""
    if isinstance(generator, Rows):
        generator.check(weights.shape[0])
        parts = weights.split([n for _, n in generator.runs()])
        return torch.cat([categorical(w, g) for w, (g, _) in zip(parts, generator.runs())])
    dev = _draw_device(weights.device, generator)
    w = weights.detach().float().to(dev).reshape(-1, weights.shape[-1])  # [rows, V]
    i = torch.multinomial(w, 1, generator=generator)  # [rows, 1]
    return i.view(weights.shape[:-1]).to(weights.device)


def generator_for(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded generator on ``device`` (for draws that should stay on that device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
