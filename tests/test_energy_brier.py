"""The energy score (CALM.md section 2) and BrierLM (section 3) against references: CPU, seeded."""

import itertools

import pytest
import torch

from calm_core.brierlm import (brier1_exact, brier_lm, brier_n_estimates,
                               brier_n_from_probs, brier_u_statistic)
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


def two_sample_rule(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The textbook estimate from two samples, written out: 1[x1 = y] + 1[x2 = y] - 1[x1 = x2] per
    position (x1, x2, y [P, n] n-grams)."""
    return (x1 == y).all(-1).float() + (x2 == y).all(-1).float() - (x1 == x2).all(-1).float()


def test_two_sample_brier_is_unbiased_on_a_toy_categorical():
    g = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    data = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])  # where the observations come from
    T = 200_000
    y = torch.multinomial(data, T, replacement=True, generator=g)
    x1 = torch.multinomial(probs, T, replacement=True, generator=g)
    x2 = torch.multinomial(probs, T, replacement=True, generator=g)
    est = two_sample_rule(x1[:, None], x2[:, None], y[:, None]).mean().item()
    exact = brier1_exact(probs.expand(T, -1), y).mean().item()
    expected = (2 * (probs * data).sum() - probs.pow(2).sum()).item()
    assert abs(exact - expected) < 0.005
    assert abs(est - expected) < 0.01  # std of the mean ~ 0.003


def test_brierlm_perfect_predictor_is_100_and_terms_are_clamped():
    y = torch.randint(0, 50, (64, 4))
    means = {n: float(v.mean()) for n, v in brier_n_estimates(torch.stack([y, y, y], 1), y).items()}
    assert means == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert brier_lm(means) == pytest.approx(100.0)
    # two negative terms must not multiply into a positive score
    assert brier_lm({1: 0.5, 2: -0.2, 3: -0.3, 4: 0.1}) == 0.0
    assert brier_lm({1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        brier_lm({1: 0.5})


def test_brier_n_uses_the_first_n_tokens():
    y = torch.tensor([[1, 2, 3, 4]])
    x1 = torch.tensor([[1, 2, 9, 9]])  # right for n <= 2
    x2 = torch.tensor([[7, 7, 7, 7]])  # always wrong, differs from x1
    est = brier_n_estimates(torch.stack([x1, x2], 1), y)
    assert [est[n].item() for n in (1, 2, 3, 4)] == [1.0, 1.0, 0.0, 0.0]


def test_u_statistic_is_the_two_sample_rule_for_two_and_unbiased_with_less_variance_for_more():
    g = torch.Generator().manual_seed(4)
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    data = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    T = 100_000
    y = torch.multinomial(data, T, replacement=True, generator=g)[:, None]  # [T, 1]
    x = torch.multinomial(probs.expand(T, -1), 8, replacement=True, generator=g)[..., None]  # [T, 8, 1]
    torch.testing.assert_close(brier_u_statistic(x[:, :2], y), two_sample_rule(x[:, 0], x[:, 1], y))
    expected = (2 * (probs * data).sum() - probs.pow(2).sum()).item()
    two, eight = brier_u_statistic(x[:, :2], y), brier_u_statistic(x, y)
    assert abs(eight.mean().item() - expected) < 0.01  # std of the mean ~ 0.002
    assert eight.var() < 0.7 * two.var()
    with pytest.raises(ValueError, match="at least 2"):
        brier_u_statistic(x[:, :1], y)


def test_probability_estimate_of_brier_n_matches_the_exact_value_on_a_toy_chain():
    """A two-step autoregressive model small enough to enumerate: Brier-2 = 2 P(y1 y2) -
    sum_ab P(a)^2 P(b|a)^2 exactly; the estimate from probabilities (exact P(y), the collision
    term from the samples' own probabilities) and the sample-only U-statistic both match it."""
    g = torch.Generator().manual_seed(5)
    V, T, R = 4, 60_000, 2
    p1 = torch.tensor([0.4, 0.3, 0.2, 0.1])
    p2 = torch.softmax(torch.randn(V, V, generator=g) * 2, -1)  # P(b | a)
    joint = p1[:, None] * p2  # [V, V]
    y1 = torch.multinomial(torch.full((V,), 0.25), T, replacement=True, generator=g)  # observations
    y2 = torch.multinomial(torch.full((V,), 0.25), T, replacement=True, generator=g)
    exact = {1: (2 * p1[y1] - p1.pow(2).sum()).mean().item(),
             2: (2 * joint[y1, y2] - joint.pow(2).sum()).mean().item()}
    x1 = torch.multinomial(p1, T * R, replacement=True, generator=g).view(T, R)
    x2 = torch.multinomial(p2[x1.flatten()], 1, generator=g).view(T, R)
    logp_true = torch.stack([p1[y1].log(), p2[y1, y2].log()], -1)  # [T, 2]
    logp_samp = torch.stack([p1[x1].log(), p2[x1, x2].log()], -1)  # [T, R, 2]
    from_probs = brier_n_from_probs(logp_true, logp_samp, p1.pow(2).sum().expand(T), orders=(1, 2))
    sampled = brier_n_estimates(torch.stack([x1, x2], -1), torch.stack([y1, y2], -1), orders=(1, 2))
    assert from_probs[1].mean().item() == pytest.approx(exact[1], abs=1e-6)  # Brier-1 is exact
    for n in (1, 2):
        assert abs(sampled[n].mean().item() - exact[n]) < 0.01
    assert abs(from_probs[2].mean().item() - exact[2]) < 0.003
    assert from_probs[2].var() < 0.2 * sampled[2].var()


def test_energy_loss_flops_match_a_flop_counter():
    """energy_loss_flops_per_position = the matmul FLOPs torch counts in the loss's forward and
    backward (samples need gradients, the posterior's mu and sigma do not)."""
    from torch.utils.flop_counter import FlopCounterMode

    from calm_core.energy import energy_loss_flops_per_position, posterior_energy_loss

    B, T, N, M, l = 2, 3, 8, 16, 8
    samples = torch.randn(B, T, N, l, requires_grad=True)
    mu, log_sigma = torch.randn(B, T, l), torch.randn(B, T, l) * 0.1
    with FlopCounterMode(display=False) as fc:
        posterior_energy_loss(samples, mu, log_sigma, M, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert energy_loss_flops_per_position(N, M, l) * B * T == fc.get_total_flops()


def test_the_official_every_token_estimator_is_exact_for_brier1_and_unbiased_for_brier2_to_4():
    """``baseline_every_token_scores`` (the official baseline estimator) on a tiny token model small
    enough to enumerate every continuation: at each of the T-4 positions the exact Brier-n is
    2 P(y_1..n) - sum over all n-grams x of P(x | context)^2. Brier-1 must equal it on every block;
    Brier-2..4, averaged over many independently seeded copies of one block, must match it within
    the Monte Carlo error; the teacher-forced cross-entropy is the model's own."""
    from calm_core.baseline import TokenLM
    from calm_core.config import ModelConfig
    from calm_core.evaluate import baseline_every_token_scores, block_generators

    V, T, copies = 7, 9, 1000
    torch.manual_seed(0)
    lm = TokenLM(ModelConfig(d_model=16, n_layers=1, n_heads=2, ffn_dim=32, block_chunks=4), V, 4).eval()
    with torch.no_grad():
        lm.embed.weight.mul_(10.0)  # peaked next-token laws (sum P^2 ~ 0.6): collisions frequent, not certain
    block = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))

    exact = torch.zeros(4, dtype=torch.float64)  # sums over the T-4 positions
    with torch.no_grad():
        for t in range(1, T - 3):
            ctx, y = block[0, :t], block[0, t:t + 4]
            grams = torch.cartesian_prod(*[torch.arange(V)] * 4)  # [V^4, 4]: every 4-token continuation
            seqs = torch.cat([ctx.expand(len(grams), t), grams], 1)  # [V^4, t + 4]
            logp = lm.logits(seqs[:, :-1]).double().log_softmax(-1)[:, t - 1:]  # [V^4, 4, V]
            step = logp.gather(-1, grams[..., None]).squeeze(-1).cumsum(-1).exp()  # [V^4, 4]: P(x_1..n)
            for n in range(1, 5):
                p_n = step[:: V ** (4 - n), n - 1]  # one row per distinct n-gram prefix
                true = step[(grams == y).all(-1), n - 1] if n == 4 else \
                    step[(grams[:, :n] == y[:n]).all(-1), n - 1][:1]
                exact[n - 1] += 2 * true.sum() - p_n.pow(2).sum()
    got = baseline_every_token_scores(lm, block.expand(copies, T), block_generators(0, torch.arange(copies)),
                                      starts_per_pass=2)
    assert (got["positions"] == T - 4).all()
    assert torch.allclose(got["brier1"], exact[0].expand(copies), atol=1e-9)  # no sampling in Brier-1
    for n in (2, 3, 4):
        est = got[f"brier{n}"]
        se = est.std() / copies ** 0.5
        assert abs(est.mean() - exact[n - 1]) < 4 * se + 1e-9, (n, est.mean(), exact[n - 1], se)
        assert est.std() > 0  # the collision term really is sampled (the test can tell a biased estimator)
    ce = torch.nn.functional.cross_entropy(lm.logits(block[:, :-1])[0].double(), block[0, 1:], reduction="sum")
    assert float(got["loss"][0]) == pytest.approx(float(ce), rel=1e-5)
