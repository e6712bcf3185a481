"""Stage 1 through a real local Ray cluster: 2 Ray Train workers, DeepSpeed ZeRO, Ray Data shards,
on 2 logical CPUs (the CI machine's size: this also proves the pipeline does not starve itself)."""

import json

import pytest
import torch

from calm_core.autoencoder import load_autoencoder_dir, reconstruct
from calm_core.config import load_config
from calm_core.errors import ArtifactError, DataError
from pipelines.train.stage1 import run_stage1
from pipelines.storage import RunDir

pytestmark = pytest.mark.slow


def _steps(run_path):
    return [json.loads(line)["step"] for line in (run_path / "ae" / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_checkpoint_then_rerun_resumes(ray_session, tiny_corpus, tmp_path):
    run_path = tmp_path / "run"
    run = RunDir(str(run_path))
    # a wall-clock budget of ~0 stops the first invocation at its first log boundary (step 3),
    # like a job that was cut short; its checkpoint is the resume point
    cut = load_config("debug", ["stage1.max_minutes=0.0001", "distributed.zero_stage=2"])
    m1 = run_stage1(cut, str(tiny_corpus), run)
    assert m1["metrics"]["step"] == 3 and m1["metrics"]["stopped_early"] is True
    assert (run_path / "_train" / "stage1").is_dir()

    # the same command without the budget resumes: the step count continues from 3 to 6
    full = load_config("debug", ["distributed.zero_stage=2"])
    m2 = run_stage1(full, str(tiny_corpus), run)
    assert m2["metrics"]["step"] == 6 and m2["metrics"]["stopped_early"] is False
    assert _steps(run_path) == [3, 6]  # step 3 logged by the first invocation, 6 by the resumed one
    for key in ("val_acc_mu", "val_acc_sample", "val_acc_noise", "active_dims", "rec_loss", "kl", "tokens_per_s"):
        assert key in m2["metrics"], key

    # a finished run is left alone
    m3 = run_stage1(full, str(tiny_corpus), run)
    assert m3["files"] == m2["files"]

    # the artifact loads with plain PyTorch (no Ray, no DeepSpeed) and reconstructs chunks
    model, cfg, tok, manifest = load_autoencoder_dir(run_path / "ae")
    assert manifest["inputs"]["tokenizer_sha256"] == tok.sha256
    x = torch.tensor([tok.encode("the cat sat on the mat")[:4]])
    assert reconstruct(model, x).shape == x.shape
    assert (run_path / "tokenizer" / "manifest.json").is_file()

    # a rerun with another model setup is refused with the key named
    other = load_config("debug", ["distributed.zero_stage=2", "ae.latent_dim=8", "stage1.max_steps=9"])
    with pytest.raises(ArtifactError, match="ae.latent_dim"):
        run_stage1(other, str(tiny_corpus), run)


def test_zero3_single_worker_and_bad_batch(ray_session, tiny_corpus, tmp_path):
    cfg = load_config("debug", ["distributed.zero_stage=3", "distributed.num_workers=1", "stage1.max_steps=3"])
    m = run_stage1(cfg, str(tiny_corpus), RunDir(str(tmp_path / "run")))
    assert m["metrics"]["step"] == 3
    model, *_ = load_autoencoder_dir(tmp_path / "run" / "ae")  # consolidated from ZeRO-3 shards
    assert all(p.numel() > 0 for p in model.parameters())

    big = load_config("debug", ["stage1.batch_size=100000"])
    with pytest.raises(DataError, match="batch_size"):
        run_stage1(big, str(tiny_corpus), RunDir(str(tmp_path / "run2")))


def test_damaged_ae_artifact_is_refused(tmp_path):
    """A truncated or edited RUN/ae never loads as a silently different model (no Ray needed)."""
    import shutil

    from calm_core.autoencoder import ChunkAutoencoder
    from calm_core.checkpoint import save_weights, write_manifest
    from calm_core.tokenizer import CalmTokenizer

    cfg = load_config("debug")
    tok = CalmTokenizer.train(["the cat sat on the mat"] * 20, vocab_size=320, min_frequency=1)
    ae = tmp_path / "ae"
    ae.mkdir()
    save_weights(ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id).state_dict(),
                 ae / "model.safetensors")
    (ae / "config.yaml").write_text(cfg.to_yaml())
    tok.save(ae)
    write_manifest(ae, "ae", inputs={"tokenizer_sha256": tok.sha256}, metrics={})
    load_autoencoder_dir(ae)  # intact: loads

    w = ae / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_autoencoder_dir(ae)
    shutil.rmtree(ae)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_autoencoder_dir(ae)
