"""jobs/sweep.py: a spec's trials as a Ray Tune experiment over the project's own stages.

The spec: unknown keys refused by name, grids and random draws expanded the same way every time,
every trial's config checked before anything starts, and trials that differ only after stage 1
sharing one AE key; correlations and the results table. The harness itself, submitted, stopped and
resubmitted on a real cluster, is tests/test_cluster_jobs.py::test_a_submitted_sweep_...
(it shares that module's `ray start --head` cluster).
"""

from __future__ import annotations

import math

import pytest

from calm_core.errors import ConfigError
from pipelines.sweep.results import correlation, markdown
from pipelines.sweep.spec import ae_key, expand, folder_name, load_spec, spec_from_dict, trial_config

BASE = {"name": "t", "config": "debug"}


def test_a_misspelt_spec_key_is_refused_by_name():
    with pytest.raises(ConfigError, match="unknown key 'budget_flop'.*did you mean 'budget_flops'"):
        spec_from_dict({**BASE, "budget_flop": 1e9, "trials": [{"name": "a"}]})
    with pytest.raises(ConfigError, match=r"unknown key 'trials\[0\].overide'"):
        spec_from_dict({**BASE, "trials": [{"name": "a", "overide": []}]})
    with pytest.raises(ConfigError, match="model 'gpt'"):
        spec_from_dict({**BASE, "trials": [{"name": "a", "model": "gpt"}]})
    with pytest.raises(ConfigError, match="no trials"):
        spec_from_dict(BASE)


def test_a_trial_whose_config_is_wrong_is_named_before_anything_runs():
    spec = spec_from_dict({**BASE, "trials": [{"name": "ok"}, {"name": "typo", "overrides": ["stage2.lrr=1"]}]})
    trial_config(spec, expand(spec)[0])
    with pytest.raises(ConfigError, match="trial 'typo'.*stage2.lrr"):
        trial_config(spec, expand(spec)[1])


def test_grids_expand_in_order_for_each_model_and_random_draws_repeat_with_their_seed():
    spec = spec_from_dict({**BASE, "models": ["calm", "baseline"], "trials": [{"name": "today"}],
                           "grid": {"stage2.lr": [1e-3, 3e-4], "head.alpha": [1.0, 2]}})
    names = [t.name for t in expand(spec)]
    assert names[0] == "today" and len(names) == 1 + 4 * 2
    assert names[1:3] == ["stage2.lr=0.001,head.alpha=1.0/calm", "stage2.lr=0.001,head.alpha=1.0/baseline"]
    assert expand(spec)[1].overrides == ["stage2.lr=0.001", "head.alpha=1.0"]
    draw = {**BASE, "search": "random", "samples": 5, "seed": 3, "grid": {"stage2.lr": [1e-3, 3e-4, 1e-4]}}
    a, b = expand(spec_from_dict(draw)), expand(spec_from_dict(draw))
    assert [t.overrides for t in a] == [t.overrides for t in b] and len(a) == 5
    assert len({t.name for t in a}) == 5  # repeated draws get their own names (and folders)
    assert len({folder_name(t.name) for t in a}) == 5


def test_quick_replaces_the_spec_keys_it_names_and_appends_its_overrides():
    data = {**BASE, "config": "small", "overrides": ["stage2.seed=1"], "budget_flops": 2e13,
            "trials": [{"name": "a"}], "quick": {"config": "debug", "budget_flops": 0, "overrides": ["stage2.max_steps=4"]}}
    q = spec_from_dict(data, quick=True)
    assert (q.config, q.budget_flops, q.overrides) == ("debug", 0, ["stage2.seed=1", "stage2.max_steps=4"])
    with pytest.raises(ConfigError, match="no 'quick:' section"):
        spec_from_dict({**BASE, "trials": [{"name": "a"}]}, quick=True)


def test_trials_that_differ_after_stage_one_share_an_autoencoder():
    from calm_core.config import load_config

    key = lambda *ov: ae_key(load_config("debug", list(ov)), "/c.txt")  # noqa: E731
    assert key("stage2.lr=3e-4") == key("stage2.grad_accum=4", "head.alpha=2") == key()
    assert len({key(), key("ae.beta=0.1"), key("ae.kl_clip=0"), key("stage1.max_steps=9")}) == 4
    assert ae_key(load_config("debug"), "/other.txt") != key()


def test_every_shipped_spec_loads_with_its_quick_variant_and_valid_trials():
    from pipelines.sweep.spec import builtin_specs

    specs = sorted(builtin_specs().glob("*.yaml"))
    assert len(specs) >= 6
    for path in specs:
        for quick in (False, True):
            spec = load_spec(path.stem, quick=quick)
            for t in expand(spec):
                trial_config(spec, t)


def test_correlations_against_known_values():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    p, s = correlation(x, [2.0, 4.0, 6.0, 8.0, 10.0])
    assert p == pytest.approx(1.0) and s == pytest.approx(1.0)
    p, s = correlation(x, [1.0, 8.0, 27.0, 64.0, 125.0])  # monotonic, not linear
    assert s == pytest.approx(1.0) and 0.9 < p < 0.99
    p, s = correlation(x, [5.0, 4.0, 4.0, 2.0, 1.0])  # a tie: mean ranks (3.5, 3.5)
    assert s == pytest.approx(-0.9746794, abs=1e-6)  # Spearman with tied ranks, by hand
    assert math.isnan(correlation([1.0, 2.0], [1.0, 2.0])[0])


def test_the_table_puts_the_papers_number_beside_each_row():
    spec = spec_from_dict({**BASE, "trials": [{"name": "a", "paper": "4.70"}], "correlate": ["val_loss", "val_brierlm"]})
    rows = [{"trial": "a", "model": "calm", "overrides": "", "paper": "4.70", "status": "done", "val_loss": 1.5,
             "val_brierlm": 3.25}]
    text = markdown(spec, rows, {"a": []})
    line = next(x for x in text.splitlines() if x.startswith("| a |"))
    assert "1.5000" in line and "3.25" in line and line.rstrip(" |").endswith("4.70")
    assert "Pearson nan" in text  # one trial: no correlation, said as such
