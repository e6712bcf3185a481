"""Stage-2 models in calm_core (CALM.md section 2): backbone, heads, CALM, the token baseline."""

import pytest
import torch

from calm_core.baseline import TokenLM, baseline_train_flops_per_token
from calm_core.brierlm import brier1_exact
from calm_core.calm_model import CALM, calm_train_flops_per_token
from calm_core.config import AEConfig, HeadConfig, ModelConfig
from calm_core.energy import energy_score_loss, posterior_energy_loss, posterior_energy_terms
from calm_core.transformer import Backbone, apply_rope, rope_tables
from test_energy_brier import two_sample_rule

V, K, LAT = 20, 2, 8


def tiny(input_mode="tokens", kind="energy", **head):
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=6, input_mode=input_mode)
    h = HeadConfig(kind=kind, n_samples=8, n_targets=16, **head)
    return CALM(m, h, AEConfig(K=K, latent_dim=LAT), V)


def test_posterior_energy_loss_equals_the_loss_on_explicit_targets():
    g = torch.Generator().manual_seed(0)
    B, T, N, M = 2, 3, 4, 5
    x = torch.randn(B, T, N, LAT, generator=g)
    mu, ls = torch.randn(B, T, LAT, generator=g), 0.3 * torch.randn(B, T, LAT, generator=g)
    fast = posterior_energy_loss(x, mu, ls, M, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(B, T, M, LAT, generator=torch.Generator().manual_seed(7))
    targets = mu.unsqueeze(-2) + ls.exp().unsqueeze(-2) * eps  # [B, T, M, l]
    ref = energy_score_loss(x, targets)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.fidelity, ref.fidelity, rtol=1e-4, atol=1e-4)


def test_posterior_targets_are_independent_per_position():
    """Same samples and posterior at every position: with targets drawn per position the
    per-position fidelity varies like independent draws; a draw shared by the positions of a
    sequence would make it identical along the sequence."""
    B, T, N, M = 2, 64, 4, 8
    x = torch.randn(1, 1, N, LAT, generator=torch.Generator().manual_seed(0)).expand(B, T, N, LAT)
    mu, ls = torch.zeros(B, T, LAT), torch.zeros(B, T, LAT)
    fid, _ = posterior_energy_terms(x, mu, ls, M, generator=torch.Generator().manual_seed(1))  # [B, T]
    assert fid.shape == (B, T)
    assert len(torch.unique(fid)) == B * T  # every position its own targets
    # consecutive positions are uncorrelated (a shared or smoothly varying draw would not be)
    a, b = fid[:, :-1].flatten(), fid[:, 1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.3


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = rope_tables(16, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(s, t):
        return (apply_rope(q, cos[s : s + 1], sin[s : s + 1]) * apply_rope(k, cos[t : t + 1], sin[t : t + 1])).sum()
    torch.testing.assert_close(score(5, 2), score(12, 9))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_backbone_is_causal():
    torch.manual_seed(0)
    net = Backbone(32, 2, 4, 64)
    x = torch.randn(1, 7, 32)
    y = x.clone()
    y[:, 5:] += 1.0  # change the future
    torch.testing.assert_close(net(x)[:, :5], net(y)[:, :5])
    assert not torch.allclose(net(x)[:, 5:], net(y)[:, 5:])


def test_cached_extension_equals_a_full_pass():
    """Incremental decoding: prefix(x[:4]) then extend by x[4:] (default mask) == one causal pass."""
    torch.manual_seed(0)
    net = Backbone(32, 2, 4, 64).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = net(x)
        h0, past = net.prefix(x[:, :4])
        h1, past = net.extend(x[:, 4:7], torch.arange(4, 7), past)
        h2, _ = net.extend(x[:, 7:], torch.arange(7, 9), past)
    torch.testing.assert_close(torch.cat([h0, h1, h2], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pairing", ["adjacent", "halves"])
def test_rope_pairings_are_the_same_rotation_up_to_a_permutation(pairing):
    """Both pairings rotate pair i by t * theta^(-2i/h) and keep scores relative; halves on x equals
    adjacent on x with its features interleaved (x_i, x_{i+h/2} side by side)."""
    cos, sin = rope_tables(16, 8, 10000.0)
    x = torch.randn(1, 1, 1, 8)
    perm = torch.arange(8).view(2, 4).t().flatten()  # [0, 4, 1, 5, 2, 6, 3, 7]
    got = apply_rope(x, cos[3:4], sin[3:4], "halves")
    want = apply_rope(x[..., perm], cos[3:4], sin[3:4], "adjacent")[..., perm.argsort()]
    torch.testing.assert_close(got, want)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(s, t):
        return (apply_rope(q, cos[s : s + 1], sin[s : s + 1], pairing) * apply_rope(k, cos[t : t + 1], sin[t : t + 1], pairing)).sum()
    torch.testing.assert_close(score(5, 2), score(12, 9))


def test_grouped_query_attention_equals_full_attention_with_shared_key_value_heads():
    """n_kv_heads = 2 of 4: each key/value head serves two query heads. The same model with 4 heads
    whose k/v weights repeat each group's head gives the same outputs, with and without the cache."""
    torch.manual_seed(0)
    gqa = Backbone(32, 2, 4, 64, n_kv_heads=2, rope_pairing="halves").eval()
    full = Backbone(32, 2, 4, 64, rope_pairing="halves").eval()
    state = gqa.state_dict()
    h = 8
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]  # [32 + 16 + 16, 32]
        q, k, v = w.split([32, 16, 16])
        rep = lambda t: t.view(2, h, 32).repeat_interleave(2, 0).reshape(32, 32)  # noqa: E731 kv head g -> heads 2g, 2g+1
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    full.load_state_dict(state)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), full(x), rtol=1e-5, atol=1e-5)
        h0, past = gqa.prefix(x[:, :4])
        assert past[0][0].shape == (2, 2, 4, h)  # the cache holds the 2 key/value heads only
        h1, _ = gqa.extend(x[:, 4:], torch.arange(4, 7), past)
        torch.testing.assert_close(torch.cat([h0, h1], 1), full(x), rtol=1e-5, atol=1e-5)


def test_baseline_branches_equal_recomputing_each_continuation():
    """Every sampled branch's log-probabilities match a fresh forward pass over its own prefix and
    tokens: the branches see the block before their start and their own tokens, nothing else."""
    torch.manual_seed(0)
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=8)
    lm = TokenLM(m, V, K).eval()
    tokens = torch.randint(0, V, (2, 16))
    starts = torch.tensor([2, 5, 9, 12])
    with torch.no_grad():
        br = lm.branches(tokens, starts, 4, 3, generator=torch.Generator().manual_seed(1))
        assert br.samples.shape == br.logp.shape == (2, 4, 3, 4) and br.logp_true.shape == (2, 4, 4)
        for b in range(2):
            for s, e in enumerate(starts.tolist()):
                truth = lm.logits(tokens[b : b + 1, : e + 3]).log_softmax(-1)[0]  # [e + 3, V]
                want = truth[torch.arange(e - 1, e + 3), tokens[b, e : e + 4]]
                torch.testing.assert_close(br.logp_true[b, s], want, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(br.collision1[b, s], truth[e - 1].exp().pow(2).sum(), rtol=1e-4, atol=1e-5)
                for r in range(3):
                    seq = torch.cat([tokens[b, :e], br.samples[b, s, r, :3]])[None]
                    lp = lm.logits(seq).log_softmax(-1)[0, e - 1 :]  # [4, V]
                    want = lp[torch.arange(4), br.samples[b, s, r]]
                    torch.testing.assert_close(br.logp[b, s, r], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="starts must lie"):
        lm.branches(tokens, torch.tensor([14]), 4, 2)


@pytest.mark.parametrize("mode", ["tokens", "latents", "both"])
def test_calm_shapes_zero_init_head_and_finite_gradients(mode):
    torch.manual_seed(0)
    model = tiny(mode)
    tokens, mu, ls = torch.randint(0, V, (3, 6, K)), torch.randn(3, 6, LAT), torch.full((3, 6, LAT), -1.0)
    h = model.hidden(tokens, mu)
    assert h.shape == (3, 6, 32)
    s = model.sample(h, 5)
    assert s.shape == (3, 6, 5, LAT) and s.abs().max() == 0  # zero-initialised last layer
    out = model(tokens, mu, ls)
    out.loss.backward()  # all samples coincide at init: the gradient must still be finite
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _train(model, tokens, mu, ls, steps=300, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(tokens, mu, ls, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_tiny_calm_overfits_a_short_sequence():
    torch.manual_seed(0)
    model = tiny()
    tokens, mu = torch.randint(0, V, (1, 6, K)), torch.randn(1, 6, LAT)
    ls = torch.full_like(mu, -4.0)  # near-deterministic targets
    def error():
        with torch.no_grad():
            s = model.sample(model.hidden(tokens[:, :-1]), 16)  # [1, 5, 16, l]
        return (s - mu[:, 1:].unsqueeze(-2)).norm(dim=-1).mean().item()
    before = error()
    _train(model, tokens, mu, ls)
    assert error() < 0.2 * before


def test_head_samples_do_not_collapse_on_a_noisy_target():
    """Targets ~ N(0, I) at every position: the trained head must spread its samples like the data
    (an MSE-trained point predictor would collapse to the mean)."""
    torch.manual_seed(0)
    model = tiny()
    tokens, mu, ls = torch.randint(0, V, (4, 6, K)), torch.zeros(4, 6, LAT), torch.zeros(4, 6, LAT)
    _train(model, tokens, mu, ls, steps=400)
    with torch.no_grad():
        s = model.sample(model.hidden(tokens[:, :-1]), 256)
    std = s.std(dim=-2).mean().item()
    assert 0.6 < std < 1.4, std
    assert s.mean(dim=-2).abs().mean().item() < 0.3


def test_quadratic_head_learns_the_mean_and_margin_is_finite():
    torch.manual_seed(0)
    model = tiny(kind="quadratic", margin=0.5)
    tokens, mu = torch.randint(0, V, (1, 6, K)), torch.randn(1, 6, LAT)
    ls = torch.full_like(mu, -3.0)
    first = model(tokens, mu, ls).loss.item()
    _train(model, tokens, mu, ls, steps=200)
    out = model(tokens, mu, ls)
    assert torch.isfinite(out.loss) and out.loss.item() < 0.2 * first


def test_baseline_loss_falls_and_exact_brier_matches_two_sample():
    torch.manual_seed(0)
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=8)
    lm = TokenLM(m, V, K)
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 2])
    first = lm(seq).item()
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(100):
        loss = lm(seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lm(seq).item() < 0.3 * first
    # the exact Brier-1 from the probabilities and the two-sample estimate agree in expectation
    with torch.no_grad():
        probs = lm.logits(torch.randint(0, V, (64, 8))).softmax(-1).reshape(-1, V)  # [P, V]
    y = torch.randint(0, V, (probs.shape[0],))
    g = torch.Generator().manual_seed(3)
    reps = 400
    x1 = torch.multinomial(probs, reps, replacement=True, generator=g)  # [P, reps]
    x2 = torch.multinomial(probs, reps, replacement=True, generator=g)
    est = two_sample_rule(x1.reshape(-1, 1), x2.reshape(-1, 1), y.repeat_interleave(reps)[:, None]).mean()
    assert abs(est.item() - brier1_exact(probs, y).mean().item()) < 0.01


def test_baseline_cached_generation_equals_recomputing_every_step():
    torch.manual_seed(0)
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=8)
    lm = TokenLM(m, V, K).eval()
    prompt = torch.randint(0, V, (2, 5))
    out = lm.generate(prompt, 6, 0.8, generator=torch.Generator().manual_seed(2))
    g, seq = torch.Generator().manual_seed(2), prompt
    with torch.no_grad():
        for _ in range(6):
            probs = (lm.logits(seq)[:, -1] / 0.8).softmax(-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], 1)
    assert torch.equal(out, seq[:, 5:])


def _forward_flops(forward) -> dict[str, dict[str, int]]:
    """Forward matmul FLOPs by module ("CALM.backbone", ...) and op, counted by torch's
    FlopCounterMode. Attention runs on the math kernel: the counter does not count the CPU's fused
    attention kernel, but counts the math kernel's dense T x T score and value matmuls (aten.bmm)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        forward()
    return {name: {str(op): n for op, n in ops.items()} for name, ops in fc.get_flop_counts().items()}


def _backbone_train_flops(ops: dict[str, int]) -> float:
    """Training FLOPs of a backbone pass = 3 x forward: every weight matmul, and half of the dense
    attention matmuls (causal: a query attends to half the block on average)."""
    ops = dict(ops)
    attention = ops.pop("aten.bmm")  # q k^T and p v, per head
    return 3.0 * (sum(ops.values()) + attention / 2)


def counted_calm_flops(model: CALM, vocab: int, B: int, monkeypatch) -> dict[str, float]:
    """Training FLOPs per token of ``model`` by part, counted by torch's FlopCounterMode on a training
    forward of B blocks of L = model.block_chunks chunks (L - 1 positions of K tokens each): 3 x the
    forward FLOPs of the backbone (its attention halved: causal), the input layers and the head; for
    the loss, the forward and backward FLOPs of the energy loss called again on the arguments the
    model's forward gave it (its own distance matmuls; the gradients into the head are the head's)."""
    import calm_core.calm_model as calm_model
    from torch.utils.flop_counter import FlopCounterMode

    L, K, lat = model.mcfg.block_chunks, model.K, model.latent_dim
    calls = []

    def spy(samples, *args, **kwargs):
        calls.append((samples.detach().requires_grad_(), *args))  # mu, log_sigma, targets, alpha, ...
        return posterior_energy_loss(samples, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(calm_model, "posterior_energy_loss", spy)
        counts = _forward_flops(lambda: model(torch.randint(0, vocab, (B, L, K)), torch.randn(B, L, lat),
                                              torch.zeros(B, L, lat)))
    loss = 0
    for args in calls:
        with FlopCounterMode(display=False) as fc:
            posterior_energy_loss(*args).loss.backward()
        loss = fc.get_total_flops()

    def train_flops(module: str) -> float:
        return 3.0 * sum(counts.get(f"CALM.{module}", {}).values())

    tokens = B * (L - 1) * K
    return {"backbone": _backbone_train_flops(counts["CALM.backbone"]) / tokens, "head": train_flops("head") / tokens,
            "input": (train_flops("token_in") + train_flops("latent_in")) / tokens, "loss": loss / tokens}


@pytest.mark.parametrize("kind,arch,n,mode,width", [("energy", "paper", 8, "tokens", 1.0),
                                                    ("energy", "adanorm", 16, "both", 1.0),
                                                    ("quadratic", "paper", 8, "latents", 1.0),
                                                    ("energy", "paper", 8, "tokens", 0.5),
                                                    ("energy", "adanorm", 8, "tokens", 2.0)])
def test_calm_flops_per_token_match_a_flop_counter(kind, arch, n, mode, width, monkeypatch):
    """calm_train_flops_per_token, part by part and in total, = the counter's (``counted_calm_flops``).
    The head draws N samples per position, its per-position weights counted once; a head narrower
    or wider than the backbone (``head.width_ratio``) is counted at its own width."""
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=6, input_mode=mode)
    torch.manual_seed(0)
    model = CALM(m, HeadConfig(kind=kind, arch=arch, n_samples=n, n_targets=16, width_ratio=width),
                 AEConfig(K=K, latent_dim=LAT), V)
    if kind == "energy":
        assert tuple(model.head.cond.weight.shape) == (round(32 * width), 32)  # backbone width in, head width out
    counted = counted_calm_flops(model, V, 3, monkeypatch)
    parts = calm_train_flops_per_token(model)
    for part, flops in counted.items():
        assert parts[part] == pytest.approx(flops, rel=1e-9), part
    assert parts["total"] == pytest.approx(sum(counted.values()), rel=1e-9)
    assert (counted["loss"] > 0) == (kind == "energy")  # the quadratic head's loss has no matmul


def test_baseline_flops_per_token_match_a_flop_counter():
    """baseline_train_flops_per_token = 3 x the counted forward FLOPs per token of the backbone over
    L*K - 1 token positions, and of the tied softmax head (one V x d matmul per position)."""
    B, L = 3, 6
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=L)
    torch.manual_seed(0)
    lm = TokenLM(m, V, K)
    counts = _forward_flops(lambda: lm(torch.randint(0, V, (B, L * K))))
    tokens = B * (L * K - 1)
    head = sum(counts["TokenLM"].values()) - sum(counts["TokenLM.backbone"].values())  # outside the backbone

    parts = baseline_train_flops_per_token(lm)
    assert parts["backbone"] == pytest.approx(_backbone_train_flops(counts["TokenLM.backbone"]) / tokens, rel=1e-9)
    assert parts["head"] == pytest.approx(3.0 * head / tokens, rel=1e-9)
    assert parts["total"] == pytest.approx(parts["backbone"] + parts["head"])


def test_encoder_flops_match_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from calm_core.autoencoder import ChunkAutoencoder, encoder_flops_per_token

    ae = ChunkAutoencoder(AEConfig(K=4, latent_dim=8, d_model=32, ffn_dim=64), V, V - 1, V - 2)
    with FlopCounterMode(display=False) as fc:
        ae.encode(torch.randint(0, V, (10, 4)))
    assert encoder_flops_per_token(ae) == pytest.approx(fc.get_total_flops() / 40, rel=1e-6)


def test_autoencoder_training_flops_match_a_flop_counter():
    """Stage-1 training FLOPs per token = 3 x the forward FLOPs of encode + decode (the counter's)."""
    from torch.utils.flop_counter import FlopCounterMode

    from calm_core.autoencoder import ChunkAutoencoder, autoencoder_train_flops_per_token

    ae = ChunkAutoencoder(AEConfig(K=4, latent_dim=8, d_model=32, ffn_dim=64), V, V - 1, V - 2)
    with FlopCounterMode(display=False) as fc:
        ae.decode(ae.encode(torch.randint(0, V, (10, 4)))[0])
    assert autoencoder_train_flops_per_token(ae) == pytest.approx(3 * fc.get_total_flops() / 40, rel=1e-6)


@pytest.mark.parametrize("arch", ["paper", "adanorm"])
def test_training_forward_compiles_to_one_graph_and_matches_eager(arch):
    """distributed.compile: the training step's forward has no graph break (fullgraph) and, with the
    same global seed, the compiled loss equals the eager one (aot_eager: the traced graph, no C++)."""
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=6)
    torch.manual_seed(0)
    model = CALM(m, HeadConfig(arch=arch, n_targets=16), AEConfig(K=4, latent_dim=LAT), V)
    tok, mu, ls = torch.randint(0, V, (2, 6, 4)), torch.randn(2, 6, LAT), -torch.ones(2, 6, LAT)
    torch.manual_seed(1)
    eager = model(tok, mu, ls).loss
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    loss = compiled(tok, mu, ls).loss
    torch.testing.assert_close(loss, eager)
    loss.backward()
    lm = TokenLM(m, V, 4)
    seq = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(torch.compile(lm, backend="aot_eager", fullgraph=True)(seq), lm(seq))
