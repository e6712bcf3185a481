"""The benchmarks' own held-out scoring (bench/bench_stage2.py ``evaluate``, which the Gutenberg and
TinyStories tables of docs/BENCHMARKS.md come from) gives what training's validation gives on the
same blocks (the stage a Ray Train worker runs, ``ModelStage.validate``, at the training config's
samples and seed), and the baseline's figures that have a closed form equal a direct computation."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, write_random_model

from calm_core.artifacts import load_model
from pipelines.storage import RunDir
from pipelines.train.loop import TrainPlan
from pipelines.train.stage2 import SECTIONS, ModelStage


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
    art = load_model(run_dir / kind, kind)
    cfg, model = art.cfg, art.model.eval()
    t = getattr(cfg, SECTIONS[kind])
    L, K, latent = cfg.model.block_chunks, ae.cfg.K, ae.cfg.latent_dim
    rng = np.random.default_rng(0)
    # what stage 2's held_out_blocks returns: numpy, integer tokens and keys (the keys seed each block's noise)
    val = {"tokens": rng.integers(0, tok.vocab_size, (3, L, K)).astype(np.int64),
           "mu": rng.normal(size=(3, L, latent)).astype(np.float32),
           "log_sigma": rng.normal(-1.0, 0.1, size=(3, L, latent)).astype(np.float32),
           "key": np.array([3, 2**40 + 7, 11], dtype=np.int64)}
    val["tokens"][0, -1, 1:] = tok.pad_id  # a padded last chunk: pad targets leave the loss
    got = _bench_stage2().evaluate(kind, RunDir(str(run_dir)), run_dir / "ae", val, samples=t.brier_samples,
                                   seed=t.seed)

    ae_weights = (run_dir / "ae" / "model.safetensors").read_bytes() if kind == "calm" else b""
    stage = ModelStage(TrainPlan(kind, SECTIONS[kind], cfg, tok.to_str(), {}, {}, ae_weights=ae_weights),
                       torch.device("cpu"))
    want = stage.validate(model, {k: torch.from_numpy(v.copy()) for k, v in val.items()})
    assert set(got) == set(want) - {"val_on_training_data"}
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    if kind == "baseline":  # the closed forms: cross-entropy over non-pad targets, exact Brier-1 over every target
        flat = torch.from_numpy(val["tokens"]).flatten(1)  # [3, L*K]
        with torch.no_grad():
            logits = model.logits(flat[:, :-1])  # [3, L*K-1, V]
        target = flat[:, 1:]
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=tok.pad_id)
        p = logits.softmax(-1).double()
        brier1 = (2 * p.gather(-1, target[..., None])[..., 0] - (p**2).sum(-1)).mean()
        assert got["val_loss"] == pytest.approx(ce.item(), rel=1e-5)
        assert got["val_brier1_exact"] == pytest.approx(brier1.item(), rel=1e-5, abs=1e-7)
    assert np.isfinite(got["val_loss"])
