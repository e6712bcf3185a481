"""Rows of different lengths in one batch (calm_core/ragged.py) and per-request generators
(calm_core.rng.Rows): a row continues exactly as it would alone."""

import pytest
import torch

from calm_core import rng
from calm_core.ragged import RaggedCache
from calm_core.transformer import Backbone


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return Backbone(32, 2, 4, 64).eval()


@torch.no_grad()
def test_rows_that_join_and_leave_continue_exactly_as_a_full_forward_pass(backbone):
    prompts = [torch.randn(1, T, 32) for T in (3, 9, 5)]
    inputs = [torch.randn(6, 32) for _ in prompts]  # the inputs each row is fed, one per step
    joins = [0, 0, 2]  # row 2 joins after two steps
    leaves = [6, 3, 6]  # row 1 leaves after three
    got = [[] for _ in prompts]
    cache, rows = None, []
    for step in range(6):
        for i, j in enumerate(joins):
            if j == step:
                _, c = RaggedCache.prefill(backbone, [prompts[i][0]])
                cache, rows = (c if cache is None else cache.join(c)), rows + [i]
        x = torch.stack([inputs[i][step - joins[i]] for i in rows])[:, None]  # [B, 1, d]
        h, cache = cache.step(backbone, x)
        for b, i in enumerate(rows):
            got[i].append(h[b])
        stay = [b for b, i in enumerate(rows) if step + 1 < leaves[i]]
        cache, rows = cache.keep(torch.tensor(stay, dtype=torch.long)), [rows[b] for b in stay]
    for i, p in enumerate(prompts):
        n = len(got[i])
        full = backbone(torch.cat([p, inputs[i][None, :n]], 1))[0, -n:]  # [n, d]
        torch.testing.assert_close(torch.stack(got[i]), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_columns_that_no_row_needs_are_dropped(backbone):
    short = RaggedCache.prefill(backbone, [torch.randn(2, 32)], rows=[2])[1]
    long = RaggedCache.prefill(backbone, [torch.randn(7, 32)])[1]
    both = short.join(long)
    assert both.valid.shape == (3, 7) and both.valid.sum(1).tolist() == [2, 2, 7]
    assert both.pos.tolist() == [2, 2, 7]
    only_short = both.keep(torch.tensor([1, 0]))
    assert only_short.valid.shape == (2, 2) and only_short.past[0][0].shape[2] == 2


def test_per_request_generators_give_each_request_its_own_numbers_alone_or_batched():
    def g(seed):
        return torch.Generator().manual_seed(seed)

    alone = [rng.uniform((n, 3, 4), "cpu", g(s)) for s, n in ((1, 2), (2, 1), (3, 3))]
    a, b, c = g(1), g(2), g(3)
    batched = rng.uniform((6, 3, 4), "cpu", rng.Rows([a, a, b, c, c, c]))
    torch.testing.assert_close(batched, torch.cat(alone), rtol=0, atol=0)
    # a subset of rows (a sampler redrawing only some) keeps their generators
    a, b, c = g(1), g(2), g(3)
    sub = rng.select(rng.Rows([a, a, b, c, c, c]), torch.tensor([2, 3, 4]))
    torch.testing.assert_close(rng.normal((3, 5), "cpu", sub),
                               torch.cat([rng.normal((1, 5), "cpu", g(2)), rng.normal((2, 5), "cpu", g(3))]))
    w = torch.rand(5, 50)
    a, b = g(7), g(8)
    torch.testing.assert_close(rng.categorical(w, rng.Rows([a, a, a, b, b])),
                               torch.cat([rng.categorical(w[:3], g(7)), rng.categorical(w[3:], g(8))]))
    with pytest.raises(ValueError, match="4 rows with generators for 2"):
        rng.uniform((4,), "cpu", rng.Rows([a, b]))


@torch.no_grad()
def test_prompts_of_different_lengths_prefilled_together_equal_each_alone(backbone):
    prompts = [torch.randn(T, 32) for T in (5, 1, 9)]
    h, cache = RaggedCache.prefill(backbone, prompts, rows=[2, 1, 1])
    assert h.shape == (4, 32) and cache.valid.sum(1).tolist() == [5, 5, 1, 9] and cache.pos.tolist() == [5, 5, 1, 9]
    for row, i in enumerate([0, 0, 1, 2]):
        alone_h, alone_past = backbone.prefix(prompts[i][None])
        torch.testing.assert_close(h[row], alone_h[0, -1], atol=1e-5, rtol=1e-5)
        real = cache.valid[row]
        for (k, v), (k1, v1) in zip(cache.past, alone_past):
            torch.testing.assert_close(k[row][:, real], k1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[row][:, real], v1[0], atol=1e-5, rtol=1e-5)
    # and they continue as a full forward pass would
    x = torch.randn(4, 1, 32)
    h2, _ = cache.step(backbone, x)
    for row, i in enumerate([0, 0, 1, 2]):
        full = backbone(torch.cat([prompts[i][None], x[row][None]], 1))[0, -1]
        torch.testing.assert_close(h2[row], full, atol=1e-5, rtol=1e-5)
