"""Stage 2 and the baseline through a real 2-CPU Ray cluster: Ray Train + DeepSpeed ZeRO on the
latents Parquet, checkpoint and resume by rerun, artifacts that load with plain PyTorch, and
latents of another AE refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_core.config import load_config
from calm_core.errors import ArtifactError
from pipelines.serve.generation import Generator
from pipelines.data.precompute import precompute_latents
from pipelines.train.stage2 import load_stage2_dir, run_stage2
from pipelines.storage import RunDir
from test_latents import make_ae

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_calm_two_workers_checkpoint_resume_and_baseline(ray_session, tiny_corpus, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    make_ae(tmp_path / "run" / "ae", tiny_corpus.read_text())
    precompute_latents(load_config("debug"), str(tiny_corpus), run)

    cut = load_config("debug", ["stage2.max_minutes=0.0001", "distributed.zero_stage=2"])
    m1 = run_stage2(cut, run, "calm")
    assert m1["metrics"]["step"] == 3 and m1["metrics"]["stopped_early"] is True
    full = load_config("debug", ["distributed.zero_stage=2"])
    m2 = run_stage2(full, run, "calm")
    assert m2["metrics"]["step"] == 6 and _steps(tmp_path / "run" / "calm" / "metrics.jsonl") == [3, 6]
    for key in ("val_loss", "val_fidelity", "val_diversity", "val_brierlm", "val_brier1", "train_flops",
                "tokens_per_s", "tokens_seen"):
        assert key in m2["metrics"], key
    assert m2["metrics"]["train_flops"] == pytest.approx(m2["flops_per_token"] * m2["metrics"]["tokens_seen"])
    parts = m2["flops_per_token_by_part"]
    assert parts["total"] == pytest.approx(m2["flops_per_token"]) and parts["encoder_forward_once"] > 0
    assert parts["total"] == pytest.approx(parts["backbone"] + parts["input"] + parts["head"] + parts["loss"])
    assert m2["metrics"]["tokens_seen"] == 6 * 2 * 4 * 8 * 4  # steps x workers x batch x L x K

    ae_sha = m2["inputs"]["ae_sha256"]
    model, cfg, tok, _ = load_stage2_dir(tmp_path / "run" / "calm", "calm", expected_ae_sha256=ae_sha)
    h = model.hidden(torch.randint(0, tok.vocab_size, (1, 5, 4)))
    assert model.sample(h, 3).shape == (1, 5, 3, 16)
    with pytest.raises(ArtifactError, match="another autoencoder"):
        load_stage2_dir(tmp_path / "run" / "calm", "calm", expected_ae_sha256="0" * 64)

    # the baseline on the same blocks: its loss is logged and falls over a few more steps
    mb = run_stage2(load_config("debug", ["baseline.max_steps=12", "baseline.log_every=6"]), run, "baseline")
    losses = [json.loads(line)["val_loss"] for line in (tmp_path / "run" / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert mb["metrics"]["step"] == 12 and losses[-1] < losses[0]
    assert 0.0 <= mb["metrics"]["val_brierlm"] <= 100.0 and "val_brier1_exact" in mb["metrics"]
    assert 0.0 <= mb["metrics"]["val_sampled_brierlm"] <= 100.0
    assert mb["metrics"]["val_positions"] == m2["metrics"]["val_positions"]  # the same chunk starts

    # generation from the run, the way a user runs it; another AE is refused
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate.py"), "--run", str(tmp_path / "run"),
                          "--prompt", "the cat", "--chunks", "3", "--candidates", "8", "--samples", "2", "--no-stop"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- sample") == 2 and "in 3 steps" in out.stdout
    gen = Generator.from_run(run)
    long = gen.complete("the cat sat " * 50, chunks=3, temperature=1.0)
    assert "cut to its last 16 tokens" in long["warning"] and long["steps"] == 3  # (L=8 - 3 - 1) chunks of 4
    assert "exceed the 8-chunk context" in gen.complete("", chunks=9, temperature=1.0, stop_at_end=False)["warning"]
    exact = gen.complete("the cat", chunks=3, temperature=0.5, sampler="exact", max_draws=64, candidates=8)
    assert exact["exact"]["rows"] == 3 and exact["exact"]["draws"] >= 3 * 2  # two agreeing draws per chunk at least
    assert exact["exact"]["fallbacks"] <= 3 and exact["steps"] == 3
    other = tmp_path / "other_ae"
    make_ae(other, tiny_corpus.read_text(), seed=5)
    with pytest.raises(ArtifactError, match="another autoencoder"):
        Generator.from_run(run, str(other))

    # a complete run is left alone; a rerun with another model is refused, naming the key
    assert run_stage2(full, run, "calm")["files"] == m2["files"]
    with pytest.raises(ArtifactError, match="model.n_layers"):
        run_stage2(load_config("debug", ["model.n_layers=3", "stage2.max_steps=9"]), run, "calm")


def test_latents_of_another_ae_are_refused(ray_session, tiny_corpus, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    make_ae(tmp_path / "run" / "ae", tiny_corpus.read_text())
    precompute_latents(load_config("debug"), str(tiny_corpus), run)
    other = tmp_path / "other_ae"
    make_ae(other, tiny_corpus.read_text(), seed=5)
    with pytest.raises(ArtifactError, match="ae_sha256"):
        run_stage2(load_config("debug"), run, "calm", ae_path=str(other))
