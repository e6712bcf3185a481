"""The chunk VAE (calm_core.autoencoder, CALM.md section 1) and its layers: CPU only, seeded, fast."""

import math

import pytest
import torch
import torch.nn.functional as F

from calm_core.autoencoder import (
    LOG_SIGMA_MAX,
    LOG_SIGMA_MIN,
    ChunkAutoencoder,
    active_dims,
    clipped_kl,
    kl_per_dim,
    reconstruct,
    reconstruction_metrics,
)
from calm_core.config import AEConfig
from calm_core.layers import ResidualMLPBlock, RMSNorm, SwiGLU

V, PAD, MASK = 50, 48, 49  # tiny vocabulary; the last two ids play <|pad|> and <|mask|>


def tiny_cfg(**kw) -> AEConfig:
    base = dict(K=4, latent_dim=16, d_model=64, ffn_dim=128, token_blocks=1, latent_blocks=1)
    base.update(kw)
    return AEConfig(**base)


def make_model(seed: int = 0, **kw) -> ChunkAutoencoder:
    torch.manual_seed(seed)
    return ChunkAutoencoder(tiny_cfg(**kw), V, mask_id=MASK, pad_id=PAD)


def random_chunks(n: int, seed: int = 1, K: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PAD, (n, K), generator=g)  # ordinary tokens only (no pad, no mask)


def with_padding(x: torch.Tensor) -> torch.Tensor:
    """Pad the tails of some chunks, like a document's last chunk: row i keeps i % K + 1 tokens."""
    x = x.clone()
    for i in range(len(x)):
        x[i, i % x.shape[1] + 1 :] = PAD
    return x


# ----------------------------------------------------------------------------- layers


def test_layers_match_their_equations():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)

    mlp = SwiGLU(8, 12)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
    torch.testing.assert_close(mlp(x), mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x)))

    block = ResidualMLPBlock(8, 12)
    torch.testing.assert_close(block(x), x + block.mlp(block.norm(x)))
    assert block(x).shape == x.shape


# ----------------------------------------------------------------------------- shapes, parameters


def test_shapes_and_dtypes():
    model = make_model()
    x = random_chunks(6)
    mu, log_sigma = model.encode(x)
    assert mu.shape == log_sigma.shape == (6, 16)
    assert model.decode(mu).shape == (6, 4, V)
    out = model(x)
    assert out.logits.shape == (6, 4, V) and out.mu.shape == out.log_sigma.shape == (6, 16)
    for t in (out.loss, out.rec_loss, out.kl_loss, out.kl_raw):
        assert t.shape == () and torch.isfinite(t)
    rec = reconstruct(model, x.to(torch.int32))  # the chunk arrays on disk are int32
    assert rec.shape == x.shape and rec.dtype == torch.long


@pytest.mark.parametrize("tb,lb", [(1, 1), (2, 0)])
def test_parameter_count_matches_the_architecture(tb, lb):
    """Counts the spec's layers by hand; the output matrix is the embedding (tied), not a copy."""
    K, l, d, f = 4, 16, 64, 128
    model = make_model(token_blocks=tb, latent_blocks=lb)
    block = 3 * d * f + d  # SwiGLU (no bias) + RMSNorm gain
    expected = (
        V * d  # embedding = output matrix
        + tb * block + (K * d * d + d) + lb * block + d + (d * 2 * l + 2 * l)  # encoder
        + (l * d + d) + lb * block + (d * K * d + K * d) + tb * block + d  # decoder
    )
    assert sum(p.numel() for p in model.parameters()) == expected  # the tied embedding counted once
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == V for m in model.modules())


def test_state_dict_round_trip_gives_identical_outputs():
    a, b = make_model(seed=0), make_model(seed=1)
    x = random_chunks(5)
    assert not torch.equal(a.encode(x)[0], b.encode(x)[0])
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the KL term


def test_kl_per_dim_and_clipped_kl_against_hand_computed_numbers():
    ln2 = math.log(2.0)
    mu = torch.tensor([[0.0, 2.0, 0.5, 0.0], [1.0, 0.0, 0.0, -3.0]])
    log_sigma = torch.tensor([[0.0, 0.0, -ln2, ln2], [0.0, -ln2, 0.0, 0.0]])
    # 0.5 * (mu^2 + sigma^2 - 1 - 2 log sigma), by hand:
    kl_expected = torch.tensor([
        [0.0,  # the prior itself
         2.0,  # 0.5 * 4
         0.5 * (0.25 + 0.25 - 1 + 2 * ln2),  # 0.443147
         0.5 * (4.0 - 1 - 2 * ln2)],  # 0.806853
        [0.5,  # 0.5 * 1
         0.5 * (0.25 - 1 + 2 * ln2),  # 0.318147
         0.0,
         4.5],  # 0.5 * 9
    ])
    kl = kl_per_dim(mu, log_sigma)
    torch.testing.assert_close(kl, kl_expected)
    assert kl[0, 2].item() == pytest.approx(0.443147, abs=1e-6)
    assert kl[0, 3].item() == pytest.approx(0.806853, abs=1e-6)

    # floor 0.5: dims below the floor count as 0.5, dims above as themselves
    floor = clipped_kl(kl, 0.5)
    assert floor.shape == (2,)
    assert floor[0].item() == pytest.approx(0.5 + 2.0 + 0.5 + 0.806853, abs=1e-5)
    assert floor[1].item() == pytest.approx(0.5 + 0.5 + 0.5 + 4.5, abs=1e-5)
    torch.testing.assert_close(clipped_kl(kl, 0.0), kl.sum(-1))


def test_clipped_kl_gives_no_gradient_below_the_floor():
    mu = torch.tensor([[0.1, 2.0]], requires_grad=True)  # KL 0.005 (below 0.5) and 2.0 (above)
    log_sigma = torch.zeros(1, 2, requires_grad=True)
    clipped_kl(kl_per_dim(mu, log_sigma), 0.5).sum().backward()
    assert mu.grad[0, 0].item() == 0.0
    assert mu.grad[0, 1].item() == pytest.approx(2.0)  # d/dmu 0.5 mu^2


def test_loss_is_rec_plus_beta_times_clipped_kl():
    model = make_model(beta=0.25, kl_clip=0.5).eval()
    x = random_chunks(7)
    out = model(x)
    mu, log_sigma = model.encode(x)
    ce = F.cross_entropy(model.decode(mu).flatten(0, 1), x.flatten(), reduction="none").view(7, 4)
    kl = kl_per_dim(mu, log_sigma)
    torch.testing.assert_close(out.rec_loss, ce.sum(-1).mean())
    torch.testing.assert_close(out.kl_loss, clipped_kl(kl, 0.5).mean())
    torch.testing.assert_close(out.kl_raw, kl.sum(-1).mean())
    torch.testing.assert_close(out.loss, out.rec_loss + 0.25 * out.kl_loss)


# ----------------------------------------------------------------------------- train vs eval behaviour


def test_eval_forward_is_deterministic_and_decodes_mu():
    model = make_model(mask_prob=0.5, latent_dropout=0.5).eval()
    x = random_chunks(8)
    a, b = model(x), model(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    mu, _ = model.encode(x)
    torch.testing.assert_close(a.mu, mu, rtol=0, atol=0)
    torch.testing.assert_close(a.logits, model.decode(mu), rtol=0, atol=0)


def test_train_forward_samples_z():
    """No masking, no dropout: training still decodes mu + sigma * eps, not mu."""
    model = make_model(mask_prob=0.0, latent_dropout=0.0).train()
    x = random_chunks(8)
    torch.manual_seed(3)
    out = model(x)
    torch.testing.assert_close(out.mu, model.encode(x)[0])  # encoder saw the real tokens
    assert not torch.allclose(out.logits, model.decode(out.mu))
    assert not torch.allclose(model(x).logits, out.logits)  # and a fresh sample every call


def test_train_mode_masks_non_pad_input_tokens():
    model = make_model(mask_prob=0.999, latent_dropout=0.0).train()
    x = with_padding(random_chunks(32))
    torch.manual_seed(4)
    out = model(x)
    # the encoder saw mask ids where the text was, and the pads where they were
    seen = torch.where(x == PAD, x, torch.full_like(x, MASK))
    same = torch.isclose(out.mu, model.encode(seen)[0], atol=1e-6).all(-1)
    assert same.float().mean() > 0.9  # (1 - 0.999^4 of rows can keep a token)
    # the targets stay the original tokens: the loss is CE against x, not against the mask
    ce = F.cross_entropy(out.logits.flatten(0, 1), x.flatten(), reduction="none").view(32, 4)
    torch.testing.assert_close(out.rec_loss, ce.sum(-1).mean())
    # eval mode: nothing masked
    model.eval()
    torch.testing.assert_close(model(x).mu, model.encode(x)[0], rtol=0, atol=0)


def test_mask_rate_and_pad_positions():
    model = make_model(mask_prob=0.15).train()
    x = with_padding(random_chunks(20000))
    torch.manual_seed(5)
    m = model.mask_tokens(x)
    assert torch.equal(m[x == PAD], x[x == PAD])  # pads are never masked
    changed = m != x
    assert torch.all(m[changed] == MASK)
    rate = changed[x != PAD].float().mean().item()
    assert abs(rate - 0.15) < 0.01
    assert torch.equal(model.eval().mask_tokens(x), x)


def test_train_mode_applies_latent_dropout():
    """Dropout p ~ 1 on z: almost every training row decodes z = 0; never in eval mode."""
    model = make_model(mask_prob=0.0, latent_dropout=0.999).train()
    x = random_chunks(32)
    torch.manual_seed(6)
    out = model(x)
    zero_logits = model.decode(torch.zeros(1, 16))  # [1, K, V]
    rows_zero = torch.isclose(out.logits, zero_logits, atol=1e-6).flatten(1).all(-1)
    assert rows_zero.float().mean() > 0.8
    model.eval()
    rows_zero_eval = torch.isclose(model(x).logits, zero_logits, atol=1e-6).flatten(1).all(-1)
    assert not rows_zero_eval.any()


def test_sample_latent_dropout_statistics():
    model = make_model(latent_dropout=0.25).train()
    mu = torch.full((4000, 16), 2.0)
    log_sigma = torch.full((4000, 16), LOG_SIGMA_MIN)  # sigma ~ 4.5e-5: z ~ dropout(mu)
    torch.manual_seed(7)
    z = model.sample_latent(mu, log_sigma)
    dropped = z == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(z[~dropped], torch.full_like(z[~dropped], 2.0 / 0.75), atol=1e-3, rtol=0)
    assert torch.equal(model.eval().sample_latent(mu, log_sigma), mu)


# ----------------------------------------------------------------------------- gradients, numerics


def test_gradients_are_finite_and_reach_every_parameter():
    model = make_model().train()
    x = with_padding(random_chunks(16))
    torch.manual_seed(8)
    model(x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_log_sigma_is_clamped_but_still_pulled_back():
    model = make_model().train()
    l = 16
    with torch.no_grad():
        model.enc_out.bias[l:] = 50.0  # log sigma far above the safe range
    x = random_chunks(8)
    _, log_sigma = model.encode(x)
    assert log_sigma.max().item() <= LOG_SIGMA_MAX and log_sigma.min().item() >= LOG_SIGMA_MIN
    torch.manual_seed(9)
    out = model(x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the KL gradient still reaches the clamped log sigma and pushes it down (straight-through clamp)
    assert (model.enc_out.bias.grad[l:] > 0).all()


# ----------------------------------------------------------------------------- it learns


def test_tiny_autoencoder_overfits_a_handful_of_chunks():
    """d=64, l=16, K=4, V=50, with the paper's masking / latent dropout / KL floor: 32 random
    chunks are reconstructed exactly (decoding mu) after 300 Adam steps."""
    model = make_model(seed=0)
    x = random_chunks(32, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 300)
    torch.manual_seed(10)
    model.train()
    for _ in range(300):
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    assert torch.equal(reconstruct(model, x), x)
    m = reconstruction_metrics(model, x, PAD, 0.3, torch.Generator().manual_seed(0))
    assert m["correct_mu"].item() == m["tokens"].item() == 32 * 4
    assert m["correct_sample"].item() >= 0.9 * 32 * 4  # posterior samples decode too


# ----------------------------------------------------------------------------- metrics


class _AlwaysPad(ChunkAutoencoder):
    """A decoder that predicts <|pad|> at every position."""

    def decode(self, z):
        logits = torch.zeros(z.shape[0], self.cfg.K, self.vocab_size)
        logits[..., self.pad_id] = 1.0
        return logits


class _Oracle(ChunkAutoencoder):
    """A decoder that reconstructs perfectly (it reads the chunk it was last given)."""

    def encode(self, tokens):
        self._last = tokens.long()
        return super().encode(tokens)

    def decode(self, z):
        return F.one_hot(self._last, self.vocab_size).float()


def test_reconstruction_metrics_exclude_pad_positions():
    x = with_padding(random_chunks(12))  # rows keep 1..4 tokens
    n_real = int((x != PAD).sum())
    assert 0 < n_real < x.numel()
    torch.manual_seed(0)
    pad_model = _AlwaysPad(tiny_cfg(), V, MASK, PAD)
    m = reconstruction_metrics(pad_model, x, PAD, 0.3)
    assert m["tokens"].item() == n_real and m["chunks"].item() == 12
    # every pad position is "right", but none of them counts
    assert m["correct_mu"].item() == m["correct_sample"].item() == m["correct_noise"].item() == 0
    oracle = _Oracle(tiny_cfg(), V, MASK, PAD)
    m = reconstruction_metrics(oracle, x, PAD, 0.3)
    assert m["correct_mu"].item() == m["correct_sample"].item() == m["correct_noise"].item() == n_real


def test_reconstruction_metrics_are_sums_and_restore_the_mode():
    model = make_model().train()
    x = with_padding(random_chunks(20))
    whole = reconstruction_metrics(model, x, PAD, 0.3, torch.Generator().manual_seed(0))
    assert model.training  # left as it was
    halves = [reconstruction_metrics(model, h, PAD, 0.3, torch.Generator().manual_seed(0)) for h in (x[:8], x[8:])]
    assert set(whole) >= {"tokens", "chunks", "correct_mu", "correct_sample", "correct_noise",
                          "rec_loss_sum", "kl_sum", "mu_sum", "mu_sq_sum", "sigma_sum"}
    assert whole["mu_sum"].shape == whole["mu_sq_sum"].shape == whole["sigma_sum"].shape == (16,)
    for k in ("tokens", "chunks", "correct_mu", "rec_loss_sum", "kl_sum", "mu_sum", "mu_sq_sum", "sigma_sum"):
        torch.testing.assert_close(halves[0][k] + halves[1][k], whole[k], rtol=1e-4, atol=1e-4)
    # per chunk, the sums are the eval-mode loss terms
    out = model.eval()(x)
    torch.testing.assert_close(whole["rec_loss_sum"] / 20, out.rec_loss)
    torch.testing.assert_close(whole["kl_sum"] / 20, out.kl_loss)
    # a seeded generator makes the sampled decodings reproducible
    again = reconstruction_metrics(model, x, PAD, 0.3, torch.Generator().manual_seed(0))
    assert again["correct_sample"] == whole["correct_sample"] and again["correct_noise"] == whole["correct_noise"]


def test_active_dims_from_sums():
    torch.manual_seed(0)
    n = 10000
    mu = torch.stack([
        torch.full((n,), 3.0),  # constant: variance 0
        0.05 * torch.randn(n),  # variance 0.0025 < 0.01
        0.5 * torch.randn(n) + 1.0,  # variance 0.25
        torch.randn(n),  # variance 1
    ], dim=1)
    assert active_dims(mu.sum(0), mu.pow(2).sum(0), n) == 2
    assert active_dims(mu.sum(0), mu.pow(2).sum(0), n, threshold=0.001) == 3
    assert active_dims(mu[:1].sum(0), mu[:1].pow(2).sum(0), 1) == 0
    # hand-computed, two chunks: values (0, 0.1) -> variance 0.0025; (0, 1) -> variance 0.25
    assert active_dims(torch.tensor([0.1, 1.0]), torch.tensor([0.01, 1.0]), 2) == 1


def test_the_reports_latent_geometry_matches_the_encoder_directly():
    """ae_report's mean sigma and per-dimension Var(mu), from summed batches, against the encoder's
    mu and sigma over all chunks at once (torch.var, population form)."""
    from pipelines.eval.ae_report import latent_geometry

    model = make_model().eval()
    x = with_padding(random_chunks(40))
    sums: dict = {}
    for part in (x[:15], x[15:]):
        for k, v in reconstruction_metrics(model, part, PAD, 0.3, torch.Generator().manual_seed(0)).items():
            v = torch.as_tensor(v, dtype=torch.float64)
            sums[k] = sums[k] + v if k in sums else v
    with torch.no_grad():
        mu, log_sigma = model.encode(x)
    geo = latent_geometry(sums)
    var = mu.double().var(0, unbiased=False)
    sigma = log_sigma.double().exp().mean(0)
    assert geo["mean_sigma"] == pytest.approx(float(sigma.mean()), rel=1e-5)
    assert geo["mu_var_per_dim"] == pytest.approx(var.tolist(), abs=2e-6)
    assert geo["mu_var_min"] == pytest.approx(float(var.min()), abs=1e-6)
    assert geo["mu_std_over_sigma"] == pytest.approx(float((var.sqrt() / sigma).mean()), rel=1e-4)


def test_decoding_in_slices_bounded_in_bytes_gives_the_tokens_of_one_call():
    """decode_tokens holds at most max_bytes of logits at a time (slices of latents) and returns the
    argmax tokens of decoding everything at once, in the latents' shape."""
    from calm_core.autoencoder import decode_tokens

    model = make_model().eval()
    z = torch.randn(3, 7, 5, model.cfg.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model.decode(z.flatten(0, -2)).argmax(-1).view(3, 7, 5, model.cfg.K)
        sizes = []
        decode = model.decode
        model.decode = lambda x: sizes.append(len(x)) or decode(x)
        per_row = model.cfg.K * V * 4  # bytes of one latent's logits
        got = decode_tokens(model, z, max_bytes=per_row * 10 + 1)
    assert torch.equal(got, whole) and got.shape == (3, 7, 5, model.cfg.K)
    assert max(sizes) == 10 and sum(sizes) == 3 * 7 * 5  # slices of 10 latents: 10 x per_row bytes at most
