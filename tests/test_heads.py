"""The two energy heads (CALM.md section 2), the quadratic ablation's fitted spread, and the head's
FLOP count against torch's own counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_core.calm_model import CALM, calm_train_flops_per_token
from calm_core.config import AEConfig, HeadConfig, ModelConfig
from calm_core.energy import posterior_energy_loss
from calm_core.heads import AdaNormEnergyHead, PaperEnergyHead, head_forward_weights

D, LAT, NOISE = 32, 8, 64


def paper_count(d, l, blocks, noise=NOISE):
    """Parameters of the official MLPGenerator, written out from its description (all Linears with
    bias, LayerNorms with weight and bias)."""
    ln = 2 * d
    lin = lambda i, o: i * o + o  # noqa: E731
    block = ln + lin(2 * d, d) + lin(d, d) + lin(d, 2 * d) + lin(d, d)  # norm, MLP(2d->d->d->2d), W_down
    return lin(noise, d) + ln + lin(d, d) + ln + blocks * block + ln + lin(d, d) + lin(d, l)


def adanorm_count(d, l, ffn, blocks, noise=NOISE):
    lin = lambda i, o: i * o + o  # noqa: E731
    block = d + lin(d, 2 * d) + 3 * d * ffn  # RMSNorm, modulation, SwiGLU (no biases)
    return lin(d, d) + d + lin(noise, d) + d + blocks * block + d + lin(d, l)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("d,l", [(32, 8), (64, 16)])
def test_parameter_counts_and_shapes(blocks, d, l):
    paper, ada = PaperEnergyHead(d, l, blocks), AdaNormEnergyHead(d, l, 3 * d, blocks)
    assert n_params(paper) == paper_count(d, l, blocks)
    assert n_params(ada) == adanorm_count(d, l, 3 * d, blocks)
    h = torch.randn(2, 5, d)
    for head in (paper, ada):
        assert head(h, 7).shape == (2, 5, 7, l)


@pytest.mark.parametrize("init", ["normal", "torch"])
@pytest.mark.parametrize("arch", ["paper", "adanorm"])
def test_output_is_the_final_bias_at_init_and_samples_spread_after_one_step(arch, init):
    torch.manual_seed(0)
    head = PaperEnergyHead(D, LAT, 2, init=init) if arch == "paper" else AdaNormEnergyHead(D, LAT, 64, 2, init=init)
    assert head.out.weight.abs().max() == 0 and head.out.bias.abs().max() == 0
    with torch.no_grad():
        head.out.bias.copy_(torch.arange(LAT, dtype=torch.float32))
    h = torch.randn(3, D)
    torch.testing.assert_close(head(h, 5), torch.arange(LAT, dtype=torch.float32).expand(3, 5, LAT))
    if init == "normal":  # N(0, 0.02^2) weights (the zeroed last layer aside)
        w = head.noise.weight
        assert abs(w.std().item() - 0.02) < 0.004 and head.noise.bias.abs().max() == 0
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    mu, ls = torch.randn(3, 1, LAT), torch.zeros(3, 1, LAT)
    posterior_energy_loss(head(h, 4)[:, None], mu, ls, 16).loss.backward()
    opt.step()
    with torch.no_grad():
        x = head(h, 6)  # [3, 6, l]
    assert (x[:, 1:] - x[:, :1]).abs().max() > 1e-6  # different noise, different samples


def test_once_per_position_condition_equals_the_concat_form():
    torch.manual_seed(0)
    head = PaperEnergyHead(D, LAT, 2)
    for p in head.parameters():  # non-trivial weights everywhere
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(4, D)
    g = torch.Generator().manual_seed(5)
    fast = head(h, 6, generator=g)
    # the naive form: every sample concatenates LayerNorm(x) with c and applies Linear(2d, d)
    eps = torch.rand(4, 6, NOISE, generator=torch.Generator().manual_seed(5)) - 0.5
    c = head.cond_norm(head.cond(h))[:, None].expand(4, 6, D)
    x = head.noise_norm(head.noise(eps))
    for b in head.blocks:
        lin = torch.nn.Linear(2 * D, D)
        lin.weight.data = torch.cat([b.in_x.weight, b.in_c.weight], 1)
        lin.bias.data = b.in_x.bias.clone()
        a = torch.nn.functional.silu(lin(torch.cat([b.norm(x), c], -1)))
        gate, up = b.out(torch.nn.functional.silu(b.mid(a))).chunk(2, -1)
        x = x + b.down(torch.nn.functional.silu(gate) * up)
    naive = head.out(torch.nn.functional.silu(head.out_hidden(head.out_norm(x))))
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("arch", ["paper", "adanorm"])
def test_head_flops_match_a_flop_counter(arch, n):
    head = PaperEnergyHead(D, LAT, 3) if arch == "paper" else AdaNormEnergyHead(D, LAT, 64, 3)
    P = 10
    with FlopCounterMode(display=False) as fc:
        head(torch.randn(P, D), n)
    assert fc.get_total_flops() == 2 * P * head_forward_weights(head, n)


def test_calm_head_flops_count_the_condition_once():
    m = ModelConfig(d_model=D, n_layers=4, n_heads=4, ffn_dim=64, block_chunks=6)
    a = AEConfig(K=2, latent_dim=LAT)
    for arch in ("paper", "adanorm"):
        f8 = calm_train_flops_per_token(CALM(m, HeadConfig(arch=arch, n_samples=8), a, 20))
        f16 = calm_train_flops_per_token(CALM(m, HeadConfig(arch=arch, n_samples=16), a, 20))
        # 16 samples cost less than twice 8: the per-position part does not grow with N
        assert f8["head"] < f16["head"] < 2 * f8["head"]
        assert f16["loss"] > 2 * f8["loss"]  # the N x N diversity term grows faster than N


def test_quadratic_head_samples_with_the_fitted_spread():
    torch.manual_seed(0)
    m = ModelConfig(d_model=D, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=6)
    model = CALM(m, HeadConfig(kind="quadratic"), AEConfig(K=2, latent_dim=LAT), 20)
    tokens = torch.randint(0, 20, (4, 6, 2))
    mu, ls = torch.randn(4, 6, LAT), torch.full((4, 6, LAT), float(torch.log(torch.tensor(0.5))))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(tokens, mu, ls).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        h = model.hidden(tokens[:, :-1])
        zhat = model.head(h)
        rms = ((zhat - mu[:, 1:]).pow(2).mean() + 0.25).sqrt()  # per dimension, posterior spread included
        s = model.sample(h, 512)  # [4, 5, 512, l]
    assert model.head.spread.item() == pytest.approx(rms.item(), rel=0.1)
    assert s.std(-2).mean().item() == pytest.approx(model.head.spread.item(), rel=0.1)
    assert 0.4 < model.head.spread.item() < 0.8  # about the posterior's 0.5, not the unfitted 1.0
