"""The benchmarks' own held-out scoring (bench/bench_stage2.py ``evaluate``, which the Gutenberg and
TinyStories tables of docs/BENCHMARKS.md come from) gives what training's scoring gives on the same
blocks: the same estimator, the same per-block noise seeds."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import ROOT, write_random_model

from calm_core.artifacts import load_model
from calm_core.config import load_config
from calm_core.evaluate import baseline_heldout, calm_heldout, heldout_record
from pipelines.storage import RunDir


def _bench_stage2():
    spec = importlib.util.spec_from_file_location("bench_stage2", ROOT / "bench" / "bench_stage2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_bench_scores_held_out_blocks_as_training_does(tmp_path, tiny_corpus_text, make_ae, kind):
    run_dir = tmp_path / "run"
    ae, tok = make_ae(run_dir / "ae", tiny_corpus_text)
    write_random_model(run_dir, kind, tok)
    L, K, latent = load_config("debug").model.block_chunks, ae.cfg.K, ae.cfg.latent_dim
    rng = np.random.default_rng(0)
    # what stage 2's held_out_blocks returns: numpy, integer tokens and keys (the keys seed each block's noise)
    val = {"tokens": rng.integers(0, tok.vocab_size, (3, L, K)).astype(np.int64),
           "mu": rng.normal(size=(3, L, latent)).astype(np.float32),
           "log_sigma": rng.normal(-1.0, 0.1, size=(3, L, latent)).astype(np.float32),
           "key": np.array([3, 2**40 + 7, 11], dtype=np.int64)}
    got = _bench_stage2().evaluate(kind, RunDir(str(run_dir)), run_dir / "ae", val, samples=2)

    model = load_model(run_dir / kind, kind).model
    t = {k: torch.as_tensor(v) for k, v in val.items()}
    sums = (calm_heldout(model, ae, t, 8, 2, 0) if kind == "calm"
            else baseline_heldout(model, t, 8, K, 2, 0, tok.pad_id))
    want = heldout_record(kind, sums)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    assert np.isfinite(got["val_loss"])
