"""Stage 1: the chunk autoencoder trained with Ray Train (TorchTrainer) + DeepSpeed ZeRO.

Driver (``run_stage1``): corpus -> Ray Data documents -> tokenizer (RUN/tokenizer) -> K-token chunks
(materialised Ray Dataset, streamed to the workers as shards) -> ``TorchTrainer.fit`` -> RUN/ae.

Worker (``train_loop``): ``deepspeed.initialize`` on the process group Ray Train made (gloo on
CPU, NCCL on GPU); a step-counted loop over the streamed shard; every ``log_every`` steps a
validation pass over this rank's slice of the held-out chunks, summed over ranks (token accuracy
decoding mu, a posterior sample and mu + N(0, 0.3^2), active latent dimensions, loss parts,
tokens/s); every ``checkpoint_every`` steps a DeepSpeed checkpoint through ``ray.train.report``.
Rerunning the same command resumes from the last checkpoint (the run is named ``stage1`` under
``RUN/_train``); a checkpoint from a different setup is refused.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from calm_core.artifacts import ae_inputs
from calm_core.chunking import layout_of
from calm_core.autoencoder import (ChunkAutoencoder, active_dims, autoencoder_train_flops_per_token,
                                   load_autoencoder_dir, reconstruction_metrics)
from calm_core.config import Config
from calm_core.errors import DataError
from calm_core.tokenizer import CalmTokenizer
from pipelines.claim import Spot, claim
from pipelines.progress import progress
from pipelines.storage import RunDir
from pipelines.train.loop import TrainPlan
from pipelines.train.trainer import fit, publish_trained
from pipelines.train.worker import all_reduce_sum


# ============================================================================ worker side


class AEStage:
    """Stage 1 on a worker (``pipelines.train.loop.Stage``): the chunk autoencoder on K-token chunks."""

    def __init__(self, plan: TrainPlan, device: torch.device):
        self.cfg, self.device = plan.config, device
        self.tok = CalmTokenizer.from_str(plan.tokenizer_json)
        self.tokens_per_batch = self.cfg.stage1.batch_size * self.cfg.ae.K
        self.too_small = ("this worker's shard of training chunks holds less than one batch; "
                          "lower stage1.batch_size or use a larger corpus")

    def build(self) -> ChunkAutoencoder:
        return ChunkAutoencoder(self.cfg.ae, self.tok.vocab_size, self.tok.mask_id, self.tok.pad_id)

    def flops_per_token(self, model: ChunkAutoencoder) -> float:
        return autoencoder_train_flops_per_token(model)

    def step(self, engine, batch):
        out = engine(batch["tokens"].to(self.device).long())  # [B, K]
        return out.loss, {"loss": out.loss.item(), "rec_loss": out.rec_loss.item(), "kl": out.kl_loss.item()}

    def validate(self, model, val) -> dict[str, float]:
        """Reconstruction of this rank's held-out chunks, summed over every rank."""
        cfg, t = self.cfg, self.cfg.stage1
        gen = torch.Generator(device="cpu").manual_seed(t.seed)
        sums: dict[str, torch.Tensor] = {}
        for i in range(0, len(val["tokens"]), t.batch_size):
            x = val["tokens"][i : i + t.batch_size].long().to(self.device)
            for k, v in reconstruction_metrics(model, x, self.tok.pad_id, cfg.ae.eval_noise_std, gen).items():
                v = torch.as_tensor(v, dtype=torch.float64).cpu()
                sums[k] = sums[k] + v if k in sums else v
        tot = all_reduce_sum(sums, self.device)
        n_tok, n_chunks = max(1.0, float(tot["tokens"])), max(1.0, float(tot["chunks"]))
        return {"val_acc_mu": float(tot["correct_mu"]) / n_tok, "val_acc_sample": float(tot["correct_sample"]) / n_tok,
                "val_acc_noise": float(tot["correct_noise"]) / n_tok, "val_rec_loss": float(tot["rec_loss_sum"]) / n_chunks,
                "val_kl": float(tot["kl_sum"]) / n_chunks,
                "active_dims": active_dims(tot["mu_sum"], tot["mu_sq_sum"], float(tot["chunks"]))}

    def describe(self, r: dict[str, Any]) -> str:
        return (f"loss {r['loss']:.4f} (rec {r['rec_loss']:.4f} kl {r['kl']:.2f}) | held-out acc mu "
                f"{100 * r['val_acc_mu']:.2f}% sample {100 * r['val_acc_sample']:.2f}% noise "
                f"{100 * r['val_acc_noise']:.2f}% | active {r['active_dims']}/{self.cfg.ae.latent_dim} | "
                f"{r['tokens_per_s']:,.0f} tok/s")


# ============================================================================ driver side


def stage1_identity(cfg: Config, tok: CalmTokenizer, n_train_docs: int) -> dict[str, Any]:
    """What a stage-1 checkpoint depends on; a rerun with anything else here is refused."""
    ident: dict[str, Any] = {f"ae.{k}": v for k, v in cfg.to_dict()["ae"].items()}
    ident.update({
        "tokenizer.sha256": tok.sha256,
        "corpus.train_documents": n_train_docs,
        "stage1.batch_size": cfg.stage1.batch_size,
        **({"stage1.grad_accum": cfg.stage1.grad_accum} if cfg.stage1.grad_accum != 1 else {}),
        "distributed.num_workers": cfg.distributed.num_workers,
        "distributed.zero_stage": cfg.distributed.zero_stage,
        # (only when packed: the identities of runs made before the setting existed stay the same)
        **({"data.layout": "packed"} if cfg.data.layout == "packed" else {}),
    })
    return ident


def stage1_spot(run: RunDir) -> Spot:
    return Spot(run, "ae", record=("_train", "stage1.identity.json"), work=(("_train", "stage1"),),
                label="stage1", what="a stage-1 run")


def _val_tokens(val_chunks, train_chunks, limit: int) -> np.ndarray:
    rows = val_chunks.limit(limit).take_all() if val_chunks is not None else []
    if not rows:
        progress("[stage1] warning: the validation split is empty (tiny corpus or data.val_fraction=0); "
                 "validating on training chunks instead")
        rows = train_chunks.limit(limit).take_all()
    return np.stack([np.asarray(r["tokens"], dtype=np.int64) for r in rows])


def _chunks(cfg: Config, train_docs, val_docs, tok: CalmTokenizer):
    """(materialised training chunks, held-out chunk tokens [N, K]); refuses a corpus too small for a step."""
    from pipelines.data.chunks import chunk_dataset

    K, d, t0 = cfg.ae.K, cfg.distributed, time.perf_counter()
    # materialised with only the column training reads: while the Train workers hold their CPUs,
    # streaming it to them then needs no Ray Data task (a task the leftover CPU share of a
    # 2-core machine could not schedule would stall training forever)
    # in corpus order (pipelines.train.stream: a resumed run finds its data position in it)
    layout = cfg.data.layout
    train = chunk_dataset(train_docs, tok, K, cfg.data.read_cpus, layout=layout).select_columns(
        ["tokens"], num_cpus=cfg.data.read_cpus)
    train.context.execution_options.preserve_order = True
    train = train.materialize()
    val = chunk_dataset(val_docs, tok, K, cfg.data.read_cpus, layout=layout).materialize() if val_docs is not None else None
    n_train, need = train.count(), cfg.stage1.batch_size * d.num_workers
    if n_train < need:
        raise DataError(f"the corpus gives {n_train} training chunks, fewer than one step needs "
                        f"(stage1.batch_size {cfg.stage1.batch_size} x {d.num_workers} workers); "
                        "lower stage1.batch_size or use a larger corpus")
    val_tokens = _val_tokens(val, train, cfg.stage1.val_max_chunks)
    progress(f"[stage1] {n_train:,} training chunks of K={K} ({n_train * K:,} token slots), "
             f"{len(val_tokens):,} held-out chunks; prepared in {time.perf_counter() - t0:.1f}s")
    return train, val_tokens


def run_stage1(cfg: Config, corpus: str | None, run: RunDir, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume, or skip if complete) the autoencoder; returns the RUN/ae manifest."""
    from pipelines.data.ingest import load_corpus
    from pipelines.data.tokenizer import ensure_tokenizer

    spot = stage1_spot(run)
    if overwrite:
        spot.discard()
    # the AE's config records the layout it was trained on (auto: document); later stages follow it
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout=layout_of(cfg.data.layout)))
    train_docs, val_docs, stats = load_corpus(corpus, cfg.data)
    progress(f"[corpus] {stats.summary()}")
    corpus_info = {"spec": corpus, **stats.to_dict()}
    tok = ensure_tokenizer(cfg, run, train_docs, corpus_info)
    if tok.vocab_size > 0 and cfg.tokenizer.path == "" and tok.vocab_size != cfg.tokenizer.vocab_size:
        progress(f"[tokenizer] note: the corpus supported {tok.vocab_size} tokens of the {cfg.tokenizer.vocab_size} asked")
    identity = stage1_identity(cfg, tok, stats.documents.get("train", 0))
    done = claim(spot, identity, lambda m: f"{m['metrics'].get('step', 0)} steps"
                 if m["metrics"].get("step", 0) >= cfg.stage1.max_steps else None, hint="--overwrite retrains")
    if done is not None:
        return done
    train, val_tokens = _chunks(cfg, train_docs, val_docs, tok)
    local = run.is_local
    plan = TrainPlan("stage1", "stage1", cfg, tok.to_str(), {"tokens": val_tokens}, identity,
                     run.path("logs", "stage1.metrics.jsonl") if local else None,
                     run.path("logs", "tb", "stage1") if local else None)
    result = fit(AEStage, plan, run, {"train": train})
    return _publish_ae(plan, run, tok, result, corpus_info)


def ae_train_flops(model: ChunkAutoencoder, cfg: Config, metrics: dict[str, Any]) -> float:
    """Stage-1 training FLOPs of a run: FLOPs per token x steps x batch x grad_accum x K x workers."""
    return (autoencoder_train_flops_per_token(model) * metrics.get("step", 0) * cfg.stage1.batch_size
            * cfg.stage1.grad_accum * cfg.ae.K * metrics.get("num_workers", cfg.distributed.num_workers))


def _publish_ae(plan: TrainPlan, run: RunDir, tok: CalmTokenizer, result, corpus_info: dict) -> dict:
    cfg = plan.config
    with torch.device("meta"):  # shapes only
        shapes = ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
    manifest, uri = publish_trained(
        run, "ae", plan, result, tok, ae_inputs(cfg, tok, corpus_info),
        extra={"K": cfg.ae.K, "latent_dim": cfg.ae.latent_dim,
               "flops_per_token": autoencoder_train_flops_per_token(shapes),  # stage-1 training, per token
               "train_flops": ae_train_flops(shapes, cfg, result.metrics)},
        load=lambda d: load_autoencoder_dir(d, verify=False)[0])
    final = manifest["metrics"]
    progress(f"[stage1] wrote {uri}: {manifest['parameters']:,} parameters, step {final['step']}, "
             f"held-out acc mu {100 * final.get('val_acc_mu', 0):.2f}% sample "
             f"{100 * final.get('val_acc_sample', 0):.2f}% noise {100 * final.get('val_acc_noise', 0):.2f}%")
    return manifest
