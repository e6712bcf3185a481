"""The evaluation's latent- and decoder-level metrics (calm_core/agreement.py, pipelines/eval) against
direct computations and the reference libraries (sacrebleu, rouge-score)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calm_core import agreement as A
from calm_core import rng
from calm_core.autoencoder import ChunkAutoencoder, decode_tokens
from calm_core.baseline import TokenLM
from calm_core.calm_model import CALM
from calm_core.config import AEConfig, HeadConfig, ModelConfig
from calm_core.evaluate import block_generators
from conftest import wake

V, K, LAT = 30, 4, 8


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    m = ModelConfig(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, block_chunks=6)
    a = AEConfig(K=K, latent_dim=LAT, d_model=32, ffn_dim=64)
    calm = CALM(m, HeadConfig(n_samples=4), a, V).eval()
    wake(calm)
    ae = ChunkAutoencoder(a, V, mask_id=1, pad_id=0).eval()
    return calm, ae, TokenLM(m, V, K).eval()


def test_latent_scores_equal_a_direct_computation(models):
    calm, _, _ = models
    h, mu = torch.randn(3, 5, 32), torch.randn(3, 5, LAT)
    got = A.latent_scores(calm, h, mu, 4, block_generators(7, torch.arange(3)))
    z = calm.sample(h, 4, generator=block_generators(7, torch.arange(3)))  # the same draws
    for b in range(3):
        one, mean = z[b, :, 0], z[b].mean(1)  # [5, l]
        assert got["latent_mse_one"][b] == pytest.approx(float(((one - mu[b]) ** 2).mean(-1).sum()), rel=1e-5)
        assert got["latent_mse_mean"][b] == pytest.approx(float(((mean - mu[b]) ** 2).mean(-1).sum()), rel=1e-5)
        cos = sum(float(F.cosine_similarity(one[p], mu[b, p], dim=0)) for p in range(5))
        assert got["latent_cos_one"][b] == pytest.approx(cos, rel=1e-5)
        div = sum(float(torch.cdist(z[b, p], z[b, p]).sum() / 12) for p in range(5))
        fid = sum(float((z[b, p] - mu[b, p]).norm(dim=-1).mean() * 2) for p in range(5))
        assert got["energy_score"][b] == pytest.approx(div - fid, rel=1e-4)


def test_agreement_counts_tokens_and_chunks_without_padding():
    true = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8], [1, 2, 3, 4]])
    pred = torch.tensor([[5, 6, 7, 9], [5, 6, 7, 8], [4, 3, 2, 1]])
    a = A.agreement(pred, true, pad_id=0)
    assert a["token_correct"].tolist() == [3, 4, 0] and a["true_tokens"].tolist() == [3, 4, 4]
    assert a["exact"].tolist() == [False, True, False]  # a pad predicted wrong still breaks the chunk
    t = A.tradeoff(true, pred, true)
    assert t["accuracy"].tolist() == [0.5, 1.0, 0.5] and t["collision"].tolist() == [0.0, 1.0, 0.0]


def test_frequency_bands_follow_the_rank_of_the_counts():
    counts = torch.tensor([0, 50, 3, 7, 100, 1])
    assert A.frequency_bands(counts, (1, 3)).tolist() == [3, 1, 2, 1, 0, 2]  # ranks 0 | 1-2 | >= 3 | unseen


def test_bleu_and_rouge_are_the_libraries_numbers():
    import sacrebleu
    from rouge_score import rouge_scorer

    from pipelines.eval.report import bleu
    from pipelines.eval.scores import RS

    hyp = ["the cat sat on the mat", "a dog", "ran away"]
    ref = ["the cat sat on a mat", "a dog", "", "went away"]
    rows = [{"x_pred_text": RS.join(hyp[:2]), "x_true_text": RS.join(ref[:2])},
            {"x_pred_text": RS.join(["zzz", hyp[2]]), "x_true_text": RS.join(ref[2:])}]
    # positions with no reference text are left out
    assert bleu(rows, "x_") == pytest.approx(sacrebleu.corpus_bleu(hyp, [[ref[0], ref[1], ref[3]]]).score)
    known = rouge_scorer.RougeScorer(["rougeL"]).score("the cat sat on a mat", "the cat sat on the mat")
    assert known["rougeL"].fmeasure == pytest.approx(5 / 6)


def test_the_sweep_at_temperature_one_is_plain_sampling(models):
    calm, ae, lm = models
    h = torch.randn(2, 5, 32)
    x1, x2 = A.calm_picks(calm, ae, h, 1.0, 16, block_generators(3, torch.arange(2)))
    plain = decode_tokens(ae, calm.sample(h, 2, generator=block_generators(3, torch.arange(2)))).flatten(0, 1)
    assert torch.equal(x1, plain[:, 0]) and torch.equal(x2, plain[:, 1])
    tokens = torch.randint(2, V, (2, 24))
    starts = torch.arange(K, 24 - K + 1, K)
    y1, y2 = A.baseline_picks(lm, tokens, starts, K, 1.0, block_generators(3, torch.arange(2)))
    br = lm.branches(tokens, starts, K, 2, generator=block_generators(3, torch.arange(2)))
    assert torch.equal(y1, br.samples.flatten(0, 1)[:, 0]) and torch.equal(y2, br.samples.flatten(0, 1)[:, 1])


def test_lower_temperature_picks_agree_more_often(models):
    """On CALM's batch sampler and the baseline's softmax temperature, collisions rise as T falls."""
    calm, ae, lm = models
    h = torch.randn(4, 5, 32)
    col = [float(A.tradeoff(*A.calm_picks(calm, ae, h, t, 32, block_generators(0, torch.arange(4))), torch.zeros(20, K,
               dtype=torch.long))["collision"].mean()) for t in (1.0, 0.3)]
    assert col[1] > col[0]
    tokens = torch.randint(2, V, (4, 24))
    starts = torch.arange(K, 24 - K + 1, K)
    bcol = [float(A.tradeoff(*A.baseline_picks(lm, tokens, starts, K, t, rng.Rows([torch.Generator().manual_seed(i)
                                                                                    for i in range(4)])),
                             torch.zeros(20, K, dtype=torch.long))["collision"].mean()) for t in (1.0, 0.05)]
    assert bcol[1] > bcol[0]
    assert np.isfinite(col).all()
