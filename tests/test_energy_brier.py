"""The energy score (CALM.md section 2) and BrierLM (section 3) against references: CPU, seeded."""

import itertools

import pytest
import torch

from calm_core.brierlm import (BrierAccumulator, brier1_exact, brier_lm, brier_n_estimates,
                               brier_two_sample)
from calm_core.energy import energy_score, energy_score_loss, pairwise_distances


def brute_force_loss(x, y, alpha):
    """Loops over positions and pairs with torch.linalg.norm: the definition, no tricks."""
    P, N, _ = x.shape
    M = y.shape[1]
    fids, divs = [], []
    for p in range(P):
        fid = sum(torch.linalg.norm(x[p, n] - y[p, m]) ** alpha for n in range(N) for m in range(M))
        div = sum(torch.linalg.norm(x[p, n] - x[p, k]) ** alpha
                  for n, k in itertools.product(range(N), range(N)) if n != k)
        fids.append(2 * fid / (N * M))
        divs.append(div / (N * (N - 1)))
    f, d = torch.stack(fids).mean(), torch.stack(divs).mean()
    return f - d, f, d


@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.5])
def test_energy_loss_matches_brute_force(alpha):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 7, generator=g, dtype=torch.float64)
    y = torch.randn(5, 6, 7, generator=g, dtype=torch.float64)
    out = energy_score_loss(x, y, alpha)
    ref, f, d = brute_force_loss(x, y, alpha)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.fidelity.double(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.diversity.double(), d, rtol=1e-5, atol=1e-5)


def test_pairwise_distances_shape_and_weights():
    x, y = torch.randn(2, 3, 8, 5), torch.randn(2, 3, 9, 5)
    d = pairwise_distances(x, y)
    assert d.shape == (2, 3, 8, 9)
    torch.testing.assert_close(d, torch.cdist(x, y), rtol=1e-4, atol=1e-4)
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    full = energy_score_loss(x, y, weights=w)
    kept = energy_score_loss(x[w.bool()], y[w.bool()])
    torch.testing.assert_close(full.loss, kept.loss)


def test_gradients_are_finite_when_samples_coincide():
    x = torch.zeros(3, 4, 6, requires_grad=True)  # every head sample identical
    y = torch.zeros(3, 5, 6)
    y[1] += 1.0  # some targets coincide with the samples, some do not
    out = energy_score_loss(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()


def test_energy_score_is_proper_on_a_toy_gaussian():
    """E_y S(P, y) is highest for the true distribution: beats a shifted and a narrowed one."""
    g = torch.Generator().manual_seed(1)
    P, N, dim = 4000, 16, 3
    y = torch.randn(P, dim, generator=g)  # observations from Q = N(0, I)

    def expected_score(mean, std):
        samples = mean + std * torch.randn(P, N, dim, generator=g)
        return energy_score(samples, y).mean().item()

    truth = expected_score(0.0, 1.0)
    assert truth > expected_score(0.5, 1.0)  # shifted
    assert truth > expected_score(0.0, 0.5)  # narrowed (over-confident)
    assert truth > expected_score(0.0, 2.0)  # widened


def test_two_sample_brier_is_unbiased_on_a_toy_categorical():
    g = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    data = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])  # where the observations come from
    T = 200_000
    y = torch.multinomial(data, T, replacement=True, generator=g)
    x1 = torch.multinomial(probs, T, replacement=True, generator=g)
    x2 = torch.multinomial(probs, T, replacement=True, generator=g)
    est = brier_two_sample(x1[:, None], x2[:, None], y[:, None]).mean().item()
    exact = brier1_exact(probs.expand(T, -1), y).mean().item()
    expected = (2 * (probs * data).sum() - probs.pow(2).sum()).item()
    assert abs(exact - expected) < 0.005
    assert abs(est - expected) < 0.01  # std of the mean ~ 0.003


def test_brierlm_perfect_predictor_is_100_and_terms_are_clamped():
    y = torch.randint(0, 50, (64, 4))
    acc = BrierAccumulator()
    acc.add(brier_n_estimates(y.clone(), y.clone(), y))
    assert acc.means() == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert acc.score() == pytest.approx(100.0)
    # two negative terms must not multiply into a positive score
    assert brier_lm({1: 0.5, 2: -0.2, 3: -0.3, 4: 0.1}) == 0.0
    assert brier_lm({1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        brier_lm({1: 0.5})


def test_brier_n_uses_the_first_n_tokens():
    y = torch.tensor([[1, 2, 3, 4]])
    x1 = torch.tensor([[1, 2, 9, 9]])  # right for n <= 2
    x2 = torch.tensor([[7, 7, 7, 7]])  # always wrong, differs from x1
    est = brier_n_estimates(x1, x2, y)
    assert [est[n].item() for n in (1, 2, 3, 4)] == [1.0, 1.0, 0.0, 0.0]
