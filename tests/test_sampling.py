"""calm_core/sampling.py: the token models' temperature and nucleus against their definitions, and
the limits every request's sampling settings are checked against (one place for every caller)."""

from __future__ import annotations

import pytest
import torch

from calm_core.sampling import SamplingError, SamplingLimits, SamplingParams, exact_attempt_draws, nucleus, token_probs


def test_token_probs_is_softmax_of_logits_over_t_within_the_nucleus():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    logits = p.log() + 3.0  # any shift: the same distribution
    assert token_probs(logits, 1.0)[0].tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert token_probs(logits, 0.5)[0].tolist() == pytest.approx((p ** 2 / (p ** 2).sum())[0].tolist())  # P^(1/T)
    assert token_probs(logits, 2.0)[0].tolist() == pytest.approx((p ** 0.5 / (p ** 0.5).sum())[0].tolist())
    assert token_probs(logits, 0.0)[0].tolist() == [1.0, 0.0, 0.0]  # greedy
    assert token_probs(logits, 1.0, top_p=0.7)[0].tolist() == pytest.approx([0.625, 0.375, 0.0])  # 0.5 + 0.3 reach 0.7
    assert token_probs(logits, 1.0, top_p=0.5)[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert nucleus(p, 1.0) is p


def test_the_exact_samplers_attempt_is_floor_of_one_over_t():
    assert [exact_attempt_draws(t) for t in (1.0, 0.5, 1 / 3, 0.4, 1e-6)] == [1, 2, 3, 2, 1_000_000]


@pytest.mark.parametrize("kind,settings,param", [
    ("calm", dict(temperature=0.0), "temperature"), ("calm", dict(temperature=1.5), "temperature"),
    ("baseline", dict(temperature=2.5), "temperature"), ("calm", dict(top_p=0.9), "top_p"),
    ("baseline", dict(top_p=0.0), "top_p"), ("calm", dict(sampler="greedy"), "sampler"),
    ("calm", dict(n=17), "n"), ("calm", dict(max_tokens=0), "max_tokens"), ("calm", dict(candidates=2001), "candidates"),
    ("calm", dict(max_draws=2001), "max_draws"), ("calm", dict(seed=1 << 64), "seed"),
    ("calm", dict(temperature=0.5, n=16, candidates=513), "candidates"),  # 8,208 draws per step > 8,192
    ("calm", dict(temperature=0.5, sampler="exact", n=5, max_draws=2000), "max_draws"),
    ("calm", dict(temperature=1e-4, sampler="exact", max_draws=2000), "temperature"),  # one attempt: 10,000 draws
    ("calm", dict(max_tokens=1024, n=16, stop=()), "max_tokens"),  # 16,384 per prompt: two prompts are too many
    ("calm", dict(stop=("a",) * 5), "stop"), ("calm", dict(stop=("s" * 129,)), "stop"), ("calm", dict(stop=("",)), "stop"),
])
def test_each_setting_out_of_range_is_refused_naming_it(kind, settings, param):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**settings).check(kind, SamplingLimits(), prompts=2)
    assert e.value.param == param and str(e.value)


def test_settings_within_the_limits_pass():
    limits = SamplingLimits()
    SamplingParams(temperature=0.5, n=16, candidates=512).check("calm", limits)  # 8,192: just fits
    SamplingParams(temperature=0.5, sampler="exact", n=4, max_draws=2000).check("calm", limits)
    SamplingParams(temperature=1.0, n=16, candidates=2000).check("calm", limits)  # T = 1 draws one sample per row
    SamplingParams(temperature=0.0, top_p=0.5, seed=-(1 << 63)).check("baseline", limits)
    SamplingParams(max_tokens=1024, n=16).check("baseline", limits, prompts=1)
