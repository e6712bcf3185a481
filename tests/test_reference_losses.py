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


# ---------------------------------------------------------------- partial credit and context references

def _tiny_ae(K: int = 4, l: int = 6):
    from calm_core.autoencoder import ChunkAutoencoder
    from calm_core.config import AEConfig

    torch.manual_seed(0)
    ae = ChunkAutoencoder(AEConfig(K=K, latent_dim=l, d_model=16, ffn_dim=32), 20, mask_id=1, pad_id=0).eval()
    with torch.no_grad():  # distinct chunks far apart relative to sigma (sharp, like a trained AE)
        ae.enc_out.weight[:l] *= 30.0
        ae.enc_out.weight[l:] = 0.0
        if ae.enc_out.bias is not None:
            ae.enc_out.bias[l:] = -1.5
    return ae


def _energy_brute_force(mu_x, ls_x, mu_y, ls_y, n=200_000, seed=5) -> float:
    """E[2||X - Y|| - ||X - X'||], X, X' ~ N(mu_x, sigma_x^2), Y ~ N(mu_y, sigma_y^2), by sampling."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda m, ls: m + ls.exp() * torch.randn(n, m.numel(), generator=g)  # noqa: E731
    x, x2, y = draw(mu_x, ls_x), draw(mu_x, ls_x), draw(mu_y, ls_y)
    return (2 * (x - y).norm(dim=-1) - (x - x2).norm(dim=-1)).mean().item()


@torch.no_grad()
def test_a_predictor_knowing_the_first_k_tokens_pays_the_distance_from_the_spliced_chunk():
    """Blocks of two target chunks: the predictor knowing k tokens of chunk 0 samples q(z | chunk 0's
    first k tokens + chunk 1's last K - k), the only other position; its loss against brute force."""
    import pytest

    from calm_core.evaluate import prefix_reference_losses

    ae = _tiny_ae()
    a, c = torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8, 9, 10])
    tokens = torch.stack([a, c])[None].expand(400, 2, 4)  # [b, 2, K]
    mu, ls = ae.encode(tokens.flatten(0, 1))
    mu, ls = mu.view(400, 2, -1), ls.view(400, 2, -1)
    out = prefix_reference_losses(ae, tokens, mu, ls, 8, 32, 1.0, block_generators(3, torch.arange(400)))
    assert set(out) == {"loss_prefix1", "loss_prefix2", "loss_prefix3"}
    for k in (1, 2, 3):
        want = []
        for p, (mine, other) in enumerate(((a, c), (c, a))):
            m2, ls2 = ae.encode(torch.cat([mine[:k], other[k:]])[None])
            want.append(_energy_brute_force(m2[0], ls2[0], mu[0, p], ls[0, p]))
        # out[...] is [b]: each block's mean over its two positions
        assert out[f"loss_prefix{k}"].mean().item() == pytest.approx(sum(want) / 2, rel=0.02), k


@torch.no_grad()
def test_knowing_the_tokens_the_other_chunks_share_costs_nothing():
    """Chunks that differ only in their first token: knowing it is knowing the chunk (the perfect
    reference); knowing nothing (the unconditional reference) costs more."""
    import pytest

    from calm_core.evaluate import prefix_reference_losses

    ae = _tiny_ae()
    tokens = torch.tensor([[t, 11, 12, 13] for t in (3, 4, 5, 6, 7, 8)])[None].expand(300, 6, 4)  # [b, P, K]
    mu, ls = (t.view(300, 6, -1) for t in ae.encode(tokens.flatten(0, 1)))
    gen = block_generators(4, torch.arange(300))
    refs = reference_losses(mu, ls, 8, 32, 1.0, gen)
    out = prefix_reference_losses(ae, tokens, mu, ls, 8, 32, 1.0, gen)
    for k in (1, 2, 3):
        assert out[f"loss_prefix{k}"].mean().item() == pytest.approx(refs["loss_perfect"].mean().item(), rel=0.02)
    assert refs["loss_uncond"].mean().item() > 1.05 * refs["loss_perfect"].mean().item()


@torch.no_grad()
def test_the_shuffled_context_loss_averages_the_model_over_every_order_of_its_context():
    """A block of 4 chunks (3 inputs): the shuffled loss over many copies of the block is the mean,
    over the 6 orders of the inputs, of the model's loss reading them in that order (each position
    still scored against its own next chunk); it is not the loss in the true order."""
    import itertools

    import pytest

    from calm_core.calm_model import CALM
    from calm_core.config import AEConfig, HeadConfig, ModelConfig
    from calm_core.energy import posterior_energy_terms
    from calm_core.evaluate import shuffled_context_loss
    from conftest import wake

    torch.manual_seed(1)
    model = CALM(ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=64, block_chunks=4),
                 HeadConfig(n_samples=8, n_targets=32), AEConfig(K=4, latent_dim=6), 20).eval()
    wake(model, 1.0)
    n = 3000
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]])[None].expand(n, 4, 4)
    mu = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(2)).expand(n, 4, 6) * 2
    ls = torch.full((n, 4, 6), -1.0)
    got = shuffled_context_loss(model, tokens, mu, ls, block_generators(5, torch.arange(n))).mean().item()

    def loss_in_order(order) -> float:
        idx = torch.tensor(order)
        h = model.hidden(tokens[:, idx], mu[:, idx])  # [n, 3, d]
        x = model.sample(h, 8, generator=torch.Generator().manual_seed(7))
        fid, div = posterior_energy_terms(x, mu[:, 1:], ls[:, 1:], 32, 1.0, torch.Generator().manual_seed(8))
        return (fid - div).mean().item()

    orders = {o: loss_in_order(o) for o in itertools.permutations(range(3))}
    want = sum(orders.values()) / len(orders)
    assert got == pytest.approx(want, rel=0.01)
    assert abs(orders[(0, 1, 2)] - want) > 0.03 * want  # the check can tell a shuffle from none
