"""The recipe levers of a training stage: the learning-rate schedule (cosine, or constant after the
warm-up as the official code) and gradient accumulation (``grad_accum`` micro-batches per optimizer
step: the tokens per step of a large batch on a small machine)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from calm_core.config import load_config
from calm_core.errors import ConfigError
from calm_core.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]


def test_constant_schedule_holds_lr_after_the_warmup_and_cosine_decays_to_its_floor():
    lr, warm, steps = 3e-4, 10, 110
    assert [lr_at(s, lr, warm, steps, 0.1, "constant") for s in (0, 4, 9)] == pytest.approx([3e-5, 1.5e-4, 3e-4])
    assert all(lr_at(s, lr, warm, steps, 0.1, "constant") == lr for s in (10, 60, 109, 500))
    # cosine: lr at the end of the warm-up, halfway between lr and its floor at mid-span, the floor at max_steps
    assert lr_at(10, lr, warm, steps, 0.1) == pytest.approx(lr)
    assert lr_at(60, lr, warm, steps, 0.1) == pytest.approx(0.5 * (lr + 3e-5))
    assert lr_at(110, lr, warm, steps, 0.1) == pytest.approx(3e-5)
    assert lr_at(35, lr, warm, steps, 0.1) == pytest.approx(3e-5 + (lr - 3e-5) * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("override,key", [("stage2.schedule=linear", "stage2.schedule"),
                                          ("baseline.grad_accum=0", "baseline.grad_accum")])
def test_bad_recipe_settings_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("debug", [override])


ACCUM_SCRIPT = r"""
import json, sys
import torch
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from calm_core.config import load_config
from pipelines.train.loop import grad_norm, optimizer_step
from pipelines.train.worker import make_engine

torch.manual_seed(1)
x, y = torch.randn(8, 4), torch.randn(8, 2)


class Stage:  # a training stage's step: the mean squared error of one micro-batch
    def step(self, engine, b):
        loss = ((engine(b[0]) - b[1]) ** 2).mean()
        return loss, {"loss": loss.item()}


def one_step(batch, accum):
    cfg = load_config("debug", [f"stage1.batch_size={batch}", f"stage1.grad_accum={accum}", "stage1.weight_decay=0"])
    torch.manual_seed(0)
    engine = make_engine(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)),
                         cfg.stage1, cfg.distributed)
    data = iter([(x[i:i + batch], y[i:i + batch]) for i in range(0, 8, batch)])
    rec = optimizer_step(engine, Stage(), data, accum, lr=0.1)
    return {"weights": [p.detach().flatten().tolist() for p in engine.module.parameters()],
            "grad_norm": grad_norm(engine), "loss": rec["loss"],
            "steps": engine.global_steps, "left": len(list(data))}


def plain_norm():  # the same model and batch in plain torch: the gradient's norm, before any clipping
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ((model(x) - y) ** 2).mean().backward()
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())


print("RESULT " + json.dumps({"whole": one_step(8, 1), "accum": one_step(4, 2), "accum4": one_step(2, 4),
                              "plain_norm": plain_norm()}))
"""


@pytest.mark.slow
def test_grad_accum_micro_batches_make_the_step_of_their_whole_batch():
    """One optimizer step over 2 (or 4) micro-batches through the training engine (``make_engine``,
    DeepSpeed in a one-rank subprocess, no Ray) equals one step over the whole batch: the same
    gradient norm (a loss not scaled by 1 / grad_accum would double it), the same weights, the mean
    loss, one optimizer step, every micro-batch consumed; and the gradient norm training logs is
    the norm plain torch computes for that batch (before clipping)."""
    from pipelines.ray_env import free_port

    env = {**__import__("os").environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", ACCUM_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    whole = out["whole"]
    # the norm training logs (before clipping) is the gradient's, as plain torch computes it
    assert whole["grad_norm"] == pytest.approx(out["plain_norm"], rel=1e-5)
    for name in ("accum", "accum4"):
        got = out[name]
        assert got["steps"] == 1 and got["left"] == 0, got
        assert got["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
        assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        for a, b in zip(got["weights"], whole["weights"]):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_shuffle_order_is_a_seeded_permutation_that_forgets_corpus_order():
    import numpy as np

    from pipelines.train.stream import shuffle_order

    keys = np.arange(5000, dtype=np.int64) * 7919 + 12345  # blocks in corpus order
    a, b, other = shuffle_order(keys, 0), shuffle_order(keys, 0), shuffle_order(keys, 1)
    assert np.array_equal(a, b) and (a >= 0).all() and len(np.unique(a)) == len(keys)
    rank = np.argsort(np.argsort(a))
    # Spearman's rho between corpus position and shuffled position: ~N(0, 1/sqrt(n)) for a random order
    rho = np.corrcoef(np.arange(len(keys)), rank)[0, 1]
    assert abs(rho) < 0.05
    # neighbours in the corpus land far apart: the mean gap of 4999 neighbour pairs ~ n / 3 (uniform)
    assert abs(np.abs(np.diff(rank)).mean() / len(keys) - 1 / 3) < 0.03
    assert not np.array_equal(np.argsort(a), np.argsort(other))  # another seed, another order


@pytest.mark.slow
def test_corpus_shuffle_is_the_same_order_however_ray_data_cuts_the_blocks(ray_session):
    import numpy as np
    import ray.data

    from pipelines.train.stream import corpus_shuffled, shuffle_order

    n = 300
    keys = np.arange(n, dtype=np.int64) * 31 + 7
    # each block's content names its key; 32 KB a row, so that Ray Data's map steps keep blocks of ~50
    # rows apart (it bundles blocks under 1 MiB) as they keep real training blocks apart
    tokens = np.stack([np.full((64, 64), k) for k in keys])
    orders, cuts = [], []
    for parts in (1, 7, 7):
        ds = ray.data.from_items([{"tokens": t, "key": k} for t, k in zip(tokens, keys)]).repartition(parts)
        ds.context.execution_options.preserve_order = True  # as stage 2 reads its training blocks
        shuffled = corpus_shuffled(ds, seed=3, cpus=0.25, num_blocks=6).materialize()
        rows = shuffled.take_all()
        assert "_order" not in rows[0]
        assert all((r["tokens"] == r["key"]).all() for r in rows)  # rows moved whole
        orders.append([int(r["key"]) for r in rows])
        # the same blocks every time (Ray Data's sort cuts its output at randomly sampled boundaries):
        # Ray Train's ordered split hands blocks to ranks by their sizes, so each rank's stream is the same too
        cuts.append([meta.num_rows for b in shuffled.iter_internal_ref_bundles() for meta in b.metadata])
    assert all(o == orders[0] for o in orders)
    assert len(cuts[0]) == 6 and sum(cuts[0]) == n and all(c == cuts[0] for c in cuts), cuts
    assert sorted(orders[0]) == keys.tolist()
    assert orders[0] == keys[np.argsort(shuffle_order(keys, 3))].tolist()


@pytest.mark.parametrize("override", ["stage1.shuffle=corpus", "stage2.shuffle=global"])
def test_shuffle_settings_that_do_not_exist_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("debug", [override])
