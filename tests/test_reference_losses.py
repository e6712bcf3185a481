"""The energy loss's two reference predictors (``calm_core.evaluate.reference_losses``) against
values computed without the code: the closed form of E||X - Y|| for Gaussians, and brute-force
sampling of the distances a predictor that guesses the other position would pay."""

import math

import torch

from calm_core import rng
from calm_core.evaluate import block_generators, reference_losses


def mean_chi(l: int) -> float:
    """E||Z|| for Z ~ N(0, I_l)."""
    return math.sqrt(2) * math.exp(math.lgamma((l + 1) / 2) - math.lgamma(l / 2))


def test_perfect_predictor_pays_the_mean_distance_of_two_posterior_draws():
    # X, X', Y iid N(mu, s^2 I): E[2||X - Y|| - ||X - X'||] = E||X - Y|| = s sqrt(2) E chi_l
    b, P, l, s = 64, 16, 8, 0.7
    mu = torch.randn(b, P, l) * 3
    ls = torch.full((b, P, l), math.log(s))
    out = reference_losses(mu, ls, n_samples=8, n_targets=32, alpha=1.0, gen=block_generators(0, torch.arange(b)))
    assert out["loss_perfect"].shape == (b,)
    assert out["loss_perfect"].mean().item() == __import__("pytest").approx(s * math.sqrt(2) * mean_chi(l), rel=0.02)


def test_unconditional_predictor_pays_the_distance_to_the_other_positions():
    """Blocks of two positions: the unconditional predictor's samples come from the other one."""
    import pytest

    b, l, s, D = 256, 4, 0.5, 3.0
    mu = torch.zeros(b, 2, l)
    mu[:, 1, 0] = D
    ls = torch.full((b, 2, l), math.log(s))
    out = reference_losses(mu, ls, n_samples=8, n_targets=32, alpha=1.0, gen=block_generators(1, torch.arange(b)))
    # brute force: X from the other position's posterior, Y from this one's, X' another draw of X
    g = torch.Generator().manual_seed(5)
    x, x2, y = (torch.randn(200_000, l, generator=g) * s for _ in range(3))
    x[:, 0] += D
    x2[:, 0] += D
    expected = (2 * (x - y).norm(dim=-1) - (x - x2).norm(dim=-1)).mean().item()  # the same for either position
    assert out["loss_uncond"].mean().item() == pytest.approx(expected, rel=0.02)
    assert out["loss_perfect"].mean().item() == pytest.approx(s * math.sqrt(2) * mean_chi(l), rel=0.03)


def test_positions_that_share_one_posterior_make_both_references_equal():
    import pytest

    b, P, l = 64, 8, 6
    mu = torch.randn(b, 1, l).expand(b, P, l)
    ls = torch.full((b, P, l), -0.5)
    out = reference_losses(mu, ls, 8, 32, 1.0, block_generators(2, torch.arange(b)))
    assert out["loss_uncond"].mean().item() == pytest.approx(out["loss_perfect"].mean().item(), rel=0.03)


def test_a_block_s_references_do_not_depend_on_the_batch_it_is_in():
    mu, ls = torch.randn(5, 6, 4), torch.randn(5, 6, 4) * 0.1 - 1
    keys = torch.tensor([11, 12, 13, 14, 15])
    whole = reference_losses(mu, ls, 4, 8, 1.0, block_generators(0, keys))
    alone = reference_losses(mu[2:3], ls[2:3], 4, 8, 1.0, block_generators(0, keys[2:3]))
    for k in whole:
        assert torch.equal(whole[k][2:3], alone[k]), k
    assert isinstance(block_generators(0, keys), rng.Rows)
