"""The exact likelihood-free temperature sampler (CALM.md section 4) on a toy with a known P."""

import pytest
import torch

from calm_core.temperature import exact_pick

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])  # the toy's law over 6 "chunks"
CHUNKS = torch.stack([torch.tensor([i, 10 + i]) for i in range(len(P))])  # chunk i = tokens (i, 10 + i)
CHI2_DF5_P001 = 20.52  # the chi-square critical value, 5 degrees of freedom, p = 0.001


def toy_draw(generator):
    def draw(rows, n):  # n chunks ~ P for each row: [b] -> [b, n, 2]
        idx = torch.multinomial(P.expand(len(rows), -1), n, replacement=True, generator=generator)
        return CHUNKS[idx]
    return draw


@pytest.mark.parametrize("T", [1 / 2, 1 / 3, 0.8])
def test_exact_sampler_frequencies_match_p_to_the_one_over_t(T):
    g = torch.Generator().manual_seed(0)
    B = 20000
    out, stats = exact_pick(toy_draw(g), B, T, "cpu", max_draws=100_000, generator=g)
    assert stats.fallbacks == 0 and stats.rows == B
    picked = out[:, 0]  # chunk id
    counts = torch.bincount(picked, minlength=len(P)).double()
    target = P.double() ** (1 / T)
    expected = B * target / target.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_DF5_P001, (counts.tolist(), expected.tolist())
    assert torch.equal(out[:, 1], out[:, 0] + 10)  # whole chunks, never mixed


def test_exact_sampler_at_t1_is_one_draw_per_row():
    g = torch.Generator().manual_seed(0)
    _, stats = exact_pick(toy_draw(g), 100, 1.0, "cpu", generator=g)
    assert stats.draws == 100 and stats.fallbacks == 0


def test_attempt_cap_falls_back_and_is_counted():
    """A flat law over many chunks at T = 1/3 almost never agrees three times: with a cap of 9 draws
    per row nearly every row falls back to the batch approximation, and says so."""
    g = torch.Generator().manual_seed(0)
    n_chunks = 1000
    drawn = []  # chunks handed out, counted where they are drawn

    def draw(rows, n):
        drawn.append(len(rows) * n)
        return torch.randint(0, n_chunks, (len(rows), n, 1), generator=g)

    out, stats = exact_pick(draw, 50, 1 / 3, "cpu", max_draws=9, batch=9, candidates=30, generator=g)
    assert out.shape == (50, 1)
    assert stats.fallbacks >= 45
    assert stats.draws == sum(drawn) == 50 * 9 + stats.fallbacks * 30


def test_bad_arguments_are_refused():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="temperature"):
        exact_pick(toy_draw(g), 2, 1.5, "cpu")
    with pytest.raises(ValueError, match="max_draws"):
        exact_pick(toy_draw(g), 2, 0.5, "cpu", max_draws=0)


def test_a_temperature_beyond_the_draw_cap_falls_back_at_once_without_a_huge_draw():
    """T = 1e-6 needs a million agreeing draws per attempt: with max_draws 50 no attempt fits, so no
    call may ask for more than max_draws (or the fallback's candidates) and every row falls back."""
    g = torch.Generator().manual_seed(0)
    base = toy_draw(g)
    asked, drawn = [], []

    def draw(rows, n):
        asked.append(n)
        drawn.append(len(rows) * n)
        return base(rows, n)

    out, stats = exact_pick(draw, 4, 1e-6, "cpu", max_draws=50, candidates=30, generator=g)
    assert out.shape[0] == 4 and stats.fallbacks == 4
    assert max(asked) <= 50 and stats.draws == sum(drawn) == 4 * 30
    _, stats = exact_pick(draw, 4, 1 / 40, "cpu", max_draws=50, batch=16, candidates=30, generator=g)
    assert max(asked) <= 50  # attempts of 40 draws, one per call
