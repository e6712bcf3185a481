"""Stage 1 through a real local Ray cluster: 2 Ray Train workers, DeepSpeed ZeRO, Ray Data shards,
on 2 logical CPUs (the CI machine's size: this also proves the pipeline does not starve itself)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from calm_core.autoencoder import load_autoencoder_dir, reconstruct
from calm_core.config import load_config
from calm_core.errors import ArtifactError, DataError
from pipelines.train.stage1 import run_stage1
from pipelines.storage import RunDir

pytestmark = pytest.mark.slow


def _trace(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _steps(run_path):
    return [json.loads(line)["step"] for line in (run_path / "ae" / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_checkpoint_then_rerun_resumes(ray_session, tiny_corpus, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from pipelines.train.trace import TRACE_ENV

    run_path = tmp_path / "run"
    run = RunDir(str(run_path))
    # a wall-clock budget of ~0 stops the first invocation at its first log boundary (step 3),
    # like a job that was cut short; its checkpoint is the resume point
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace" / "cut"))
    cut = load_config("debug", ["stage1.max_minutes=0.0001", "distributed.zero_stage=2"])
    m1 = run_stage1(cut, str(tiny_corpus), run)
    assert m1["metrics"]["step"] == 3 and m1["metrics"]["stopped_early"] is True
    assert (run_path / "_train" / "stage1").is_dir()
    cut_weights = load_file(run_path / "ae" / "model.safetensors")  # published from the step-3 checkpoint

    # the same command without the budget resumes: the step count continues from 3 to 6, from the
    # weights of the checkpoint, each rank's data where it stopped
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace" / "resumed"))
    full = load_config("debug", ["distributed.zero_stage=2"])
    m2 = run_stage1(full, str(tiny_corpus), run)
    assert m2["metrics"]["step"] == 6 and m2["metrics"]["stopped_early"] is False
    assert _steps(run_path) == [3, 6]  # step 3 logged by the first invocation, 6 by the resumed one
    resumed_weights = load_file(tmp_path / "trace" / "resumed" / "resumed_step3.safetensors")
    assert resumed_weights.keys() == cut_weights.keys()
    assert all(torch.equal(resumed_weights[k], v) for k, v in cut_weights.items())
    for r in (0, 1):
        before, after = (_trace(tmp_path / "trace" / part / f"rank{r}.jsonl") for part in ("cut", "resumed"))
        assert [t["step"] for t in before] == [1, 2, 3] and [t["step"] for t in after] == [4, 5, 6]
        pos = [(t["epoch"], t["batches"]) for t in before + after]
        assert pos[0] == (0, 1) and all(b in ((e, n + 1), (e + 1, 1)) for (e, n), b in zip(pos, pos[1:])), pos
        assert len({t["batch"] for t in before + after}) == 6
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


def _held_out_metrics(model, cfg, tok, corpus) -> dict:
    """Stage 1's held-out figures, recomputed on ``model`` with plain PyTorch: the first
    ``stage1.val_max_chunks`` chunks of the val split in corpus order (one worker validates them
    all), in batches of ``stage1.batch_size``, noise from a CPU generator seeded with stage1.seed."""
    from calm_core.autoencoder import active_dims, reconstruction_metrics
    from calm_core.chunking import chunk_documents
    from pipelines.data.ingest import iter_texts, load_corpus

    t = cfg.stage1
    _, val_docs, stats = load_corpus(str(corpus), cfg.data)
    assert stats.documents["val"] > 0  # validated on the val split, not the training fallback
    chunks, _, _ = chunk_documents(tok.encode_batch(list(iter_texts(val_docs))), cfg.ae.K, tok.eot_id, tok.pad_id)
    val = torch.from_numpy(chunks[: t.val_max_chunks].astype(np.int64))
    gen = torch.Generator().manual_seed(t.seed)
    s = {}
    with torch.no_grad():
        for i in range(0, len(val), t.batch_size):
            for k, v in reconstruction_metrics(model, val[i : i + t.batch_size], tok.pad_id, cfg.ae.eval_noise_std,
                                               gen).items():
                s[k] = s.get(k, 0) + v.double()
    n_tok, n_chunks = float(s["tokens"]), float(s["chunks"])
    return {"val_acc_mu": float(s["correct_mu"]) / n_tok, "val_acc_sample": float(s["correct_sample"]) / n_tok,
            "val_acc_noise": float(s["correct_noise"]) / n_tok, "val_rec_loss": float(s["rec_loss_sum"]) / n_chunks,
            "val_kl": float(s["kl_sum"]) / n_chunks, "active_dims": active_dims(s["mu_sum"], s["mu_sq_sum"], n_chunks)}


def test_zero3_publishes_the_trained_weights_whole(ray_session, tiny_corpus, tmp_path):
    """Under ZeRO-3 the engine holds the parameters as flat partitions; the published RUN/ae must hold
    the trained weights consolidated: every tensor at its full shape, moved from the seeded initial
    weights by three optimizer steps, and the very weights the run validated (its recorded held-out
    figures recompute, to float rounding, on the loaded model)."""
    from calm_core.autoencoder import ChunkAutoencoder
    from calm_core.checkpoint import load_weights
    from calm_core.optim import lr_at

    cfg = load_config("debug", ["distributed.zero_stage=3", "distributed.num_workers=1", "stage1.max_steps=3"])
    m = run_stage1(cfg, str(tiny_corpus), RunDir(str(tmp_path / "run")))
    assert m["metrics"]["step"] == 3 and m["metrics"]["num_workers"] == 1 and m["metrics"]["stopped_early"] is False
    ae = tmp_path / "run" / "ae"
    model, acfg, tok, manifest = load_autoencoder_dir(ae)
    # the config it was trained with, its layout resolved (auto: document) for the stages after it
    assert acfg.to_dict() == dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout="document")).to_dict()

    # the weights file holds every tensor of a fresh model of the artifact's config, at full shape
    state = load_weights(ae / "model.safetensors")
    torch.manual_seed(cfg.stage1.seed)  # the initial weights, drawn as the stage draws them
    init = ChunkAutoencoder(acfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in init.items()}
    fresh = ChunkAutoencoder(acfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
    fresh.load_state_dict(state, strict=True)
    assert manifest["parameters"] == sum(p.numel() for p in fresh.parameters())

    # trained: every tensor moved from the seeded init, each weight by no more than 3 AdamW steps can
    # move it (|m_hat / sqrt(v_hat)| <= ~1 per step, plus the decoupled decay) -- so the init the
    # training started from is this one
    t = cfg.stage1
    lr_sum = sum(lr_at(i, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio) for i in range(3))
    for k, w0 in init.items():
        change = (state[k] - w0).abs().max().item()
        assert 0 < change <= lr_sum * (1.05 + t.weight_decay * w0.abs().max().item()), (k, change)

    # the published weights are the ones the run validated at its last step
    recomputed = _held_out_metrics(model, cfg, tok, tiny_corpus)
    for key, value in recomputed.items():
        assert manifest["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_a_batch_larger_than_the_corpus_is_refused(ray_session, tiny_corpus, tmp_path):
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
