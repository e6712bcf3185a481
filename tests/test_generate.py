"""CALM generation (CALM.md sections 2 and 4): the cached loop, the temperature batch approximation."""

import math

import pytest
import torch

from calm_core.autoencoder import ChunkAutoencoder
from calm_core.calm_model import CALM
from calm_core.config import AEConfig, HeadConfig, ModelConfig
from calm_core.generate import generate, next_chunks, prompt_chunks
from calm_core.temperature import pick_by_counts

V, K, LAT = 20, 2, 8


def tiny(input_mode):
    torch.manual_seed(0)
    a = AEConfig(K=K, latent_dim=LAT, d_model=32, ffn_dim=64)
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=8, input_mode=input_mode)
    model = CALM(m, HeadConfig(n_samples=4, n_targets=8), a, V).eval()
    torch.nn.init.normal_(model.head.out.weight, std=0.5)  # the zero-initialised head would give one chunk
    return model, ChunkAutoencoder(a, V, mask_id=V - 1, pad_id=V - 2).eval()


@pytest.mark.parametrize("mode", ["tokens", "both"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_cached_generation_equals_recomputing_every_step(mode, temperature):
    model, ae = tiny(mode)
    context = torch.randint(0, V - 2, (2, 3, K))
    out = generate(model, ae, context, 5, temperature, candidates=16, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 5, K)
    g, seq = torch.Generator().manual_seed(1), context
    with torch.no_grad():
        for _ in range(5):  # no cache: the whole sequence through the model at every step
            mu = ae.encode(seq.flatten(0, 1))[0].view(*seq.shape[:2], -1)
            h = model.hidden(seq, mu)[:, -1]
            seq = torch.cat([seq, next_chunks(model, ae, h, temperature, 16, g)[:, None]], 1)
    assert torch.equal(out, seq[:, 3:])


def test_temperature_batch_approximation_weights_chunks_by_binomial_counts():
    a, b, c = [1, 1], [2, 2], [3, 3]
    cands = torch.tensor([a] * 6 + [b] * 3 + [c])  # counts 6, 3, 1
    g = torch.Generator().manual_seed(0)

    def freq(T, n=6000):
        picks = [tuple(x) for x in pick_by_counts(cands.expand(n, -1, -1), T, g).tolist()]
        return [picks.count(tuple(x)) / n for x in (a, b, c)]

    f = freq(0.5)  # weights C(6,2)=15, C(3,2)=3, C(1,2)=0
    assert f[2] == 0 and abs(f[0] - 15 / 18) < 0.02
    f = freq(1.0)  # weights = counts
    assert abs(f[0] - 0.6) < 0.02 and abs(f[2] - 0.1) < 0.015
    f = freq(1 / 2.5)  # s = 2.5: generalised binomial, only counts >= 2.5
    w6, w3 = (math.gamma(n + 1) / (math.gamma(3.5) * math.gamma(n - 1.5)) for n in (6, 3))
    assert f[2] == 0 and abs(f[0] - w6 / (w6 + w3)) < 0.02
    # nobody seen twice: falls back to m = 1, uniform over the candidates
    f = [tuple(x) for x in pick_by_counts(torch.tensor([a, b, c]).expand(3000, -1, -1), 0.25, g).tolist()]
    assert all(abs(f.count(tuple(x)) / 3000 - 1 / 3) < 0.04 for x in (a, b, c))


def test_temperature_choice_is_per_row():
    """Rows of a batch are independent: a row whose candidates all agree always gets that chunk."""
    g = torch.Generator().manual_seed(0)
    cands = torch.stack([torch.tensor([[1, 1]] * 5), torch.tensor([[2, 2], [3, 3], [2, 2], [4, 4], [2, 2]])])
    for _ in range(20):
        out = pick_by_counts(cands, 0.5, g)
        assert out[0].tolist() == [1, 1] and out[1].tolist() == [2, 2]  # [2, 2] is the only chunk seen twice


def test_prompt_chunks_start_at_a_document_boundary_and_keep_the_prompt_end():
    chunks, kept = prompt_chunks([5, 6, 7, 8, 9], 2, "document", eot_id=0, pad_id=1, bos_id=3)
    assert kept == [6, 7, 8, 9]
    assert chunks.tolist() == [[[0, 1], [6, 7], [8, 9]]]


def test_packed_prompts_start_with_bos_keep_every_token_and_pad_the_end():
    """The official layout: BOS, the whole prompt, PAD up to a multiple of K (and no BOS: refused)."""
    chunks, kept = prompt_chunks([5, 6, 7, 8, 9], 4, "packed", eot_id=0, pad_id=1, bos_id=3)
    assert kept == [5, 6, 7, 8, 9]
    assert chunks.tolist() == [[[3, 5, 6, 7], [8, 9, 1, 1]]]
    assert prompt_chunks([5, 6, 7], 4, "packed", 0, 1, 3)[0].tolist() == [[[3, 5, 6, 7]]]
    with pytest.raises(ValueError, match="begin-of-text"):
        prompt_chunks([5], 4, "packed", 0, 1, None)


def test_temperature_out_of_range_is_refused():
    model, ae = tiny("tokens")
    with pytest.raises(ValueError, match="temperature"):
        next_chunks(model, ae, torch.zeros(1, 32), temperature=1.5)
