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

import json
import time
from typing import Any

import numpy as np
import torch

from calm_core.autoencoder import (ChunkAutoencoder, active_dims, autoencoder_train_flops_per_token,
                                   load_autoencoder_dir, reconstruction_metrics)
from calm_core.config import Config, config_from_dict
from calm_core.errors import ArtifactError, DataError
from calm_core.optim import lr_at, param_groups
from calm_core.tokenizer import CalmTokenizer
from pipelines.train import common as tc
from pipelines.storage import RunDir

RUN_NAME = "stage1"


# ============================================================================ worker side


def _val_metrics(model, val: torch.Tensor, cfg: Config, pad_id: int, batch: int, device, seed: int) -> dict[str, float]:
    """Validation over this rank's slice, summed over every rank."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    for i in range(0, len(val), batch):
        m = reconstruction_metrics(model, val[i : i + batch].to(device), pad_id, cfg.ae.eval_noise_std, gen)
        for k, v in m.items():
            v = torch.as_tensor(v, dtype=torch.float64).cpu()
            sums[k] = sums[k] + v if k in sums else v
    tot = tc.all_reduce_sum(sums, device)
    n_tok = max(1.0, float(tot["tokens"]))
    n_chunks = max(1.0, float(tot["chunks"]))
    return {
        "val_acc_mu": float(tot["correct_mu"]) / n_tok,
        "val_acc_sample": float(tot["correct_sample"]) / n_tok,
        "val_acc_noise": float(tot["correct_noise"]) / n_tok,
        "val_rec_loss": float(tot["rec_loss_sum"]) / n_chunks,
        "val_kl": float(tot["kl_sum"]) / n_chunks,
        "active_dims": active_dims(tot["mu_sum"], tot["mu_sq_sum"], float(tot["chunks"])),
    }


def train_loop(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed
    import ray.train

    cfg = config_from_dict(loop["config"], "stage1 train_loop_config")
    t, d = cfg.stage1, cfg.distributed
    tok = CalmTokenizer.from_str(loop["tokenizer_json"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = tc.setup_worker(d)
    precision = tc.resolve_precision(d)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=tc.deepspeed_config(t.batch_size, t.grad_clip, d.zero_stage, precision)
    )
    tc.compile_step(engine, d)

    # held-out chunks: rank r takes rows r, r + world, ... (equal counts: collectives line up)
    val_all = torch.as_tensor(np.asarray(loop["val_tokens"], dtype=np.int64))
    n_val = (len(val_all) // world) * world
    val = val_all[:n_val][rank::world]

    num_nodes = tc.count_nodes()
    if rank == 0:
        tc.progress(f"[stage1] {world} workers on {num_nodes} node(s)")

    step, records = tc.resume(engine, loop["identity"], rank, "stage1")
    log = tc.MetricsLog(records, loop["live_log"], loop["tb_dir"]) if rank == 0 else None

    shard = ray.train.get_dataset_shard("train")
    # masking, latent dropout and z ~ q(z|x) draw from torch's global RNG: a distinct stream per
    # rank, and a fresh one after a resume (step is part of the seed)
    torch.manual_seed(t.seed + 1000 * rank + 1_000_003 * step + 1)
    tokens_per_step = t.batch_size * cfg.ae.K * world
    thr = tc.Throughput()
    t_start = time.perf_counter()
    last: dict[str, float] = {}
    stopped_early = False

    data = tc.epoch_batches(shard, t.batch_size, t.shuffle_buffer, t.seed,
                            "this worker's shard of training chunks holds less than one batch; "
                            "lower stage1.batch_size or use a larger corpus")
    build = lambda: ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)  # noqa: E731
    report = lambda metrics, final: tc.save_and_report(  # noqa: E731
        engine, step, loop["identity"], log, d.zero_stage, rank, metrics, final)
    engine.train()
    while step < t.max_steps:
        x = next(data)["tokens"].to(device).long()  # [B, K]
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        out = engine(x)
        engine.backward(out.loss)
        engine.step()
        step += 1
        thr.add(tokens_per_step)
        last = {"loss": out.loss.item(), "rec_loss": out.rec_loss.item(), "kl": out.kl_loss.item(), "lr": lr}

        boundary = step % t.log_every == 0 or step == t.max_steps
        if boundary:
            model_now = tc.eval_model(engine, d.zero_stage, build, device)
            with tc.eager(d):
                val_m = _val_metrics(model_now, val, cfg, tok.pad_id, t.batch_size, device, seed=t.seed)
            record = {"step": step, **last, **val_m, "tokens_per_s": thr.rate(),
                      "elapsed_s": time.perf_counter() - t_start}
            if log is not None:
                log.log(record)
                tc.progress(
                    f"[stage1] step {step}/{t.max_steps} loss {last['loss']:.4f} (rec {last['rec_loss']:.4f} "
                    f"kl {last['kl']:.2f}) | held-out acc mu {100 * val_m['val_acc_mu']:.2f}% "
                    f"sample {100 * val_m['val_acc_sample']:.2f}% noise {100 * val_m['val_acc_noise']:.2f}% | "
                    f"active {val_m['active_dims']}/{cfg.ae.latent_dim} | {thr.rate():,.0f} tok/s"
                )
            thr.reset()
            if tc.budget_reached(t, t_start, step, device, rank, "stage1"):
                stopped_early = True
                break
            if step % t.checkpoint_every == 0 and step < t.max_steps:
                report({"step": step, **record, "final": False}, final=False)

    final_record = dict(log.records[-1]) if log and log.records else {"step": step}
    report({**final_record, "step": step, "final": True, "stopped_early": stopped_early,
                     "num_workers": world, "num_nodes": num_nodes}, final=True)
    if log is not None:
        log.close()


# ============================================================================ driver side


def stage1_identity(cfg: Config, tok: CalmTokenizer, n_train_docs: int) -> dict[str, Any]:
    """What a stage-1 checkpoint depends on; a rerun with anything else here is refused."""
    ident: dict[str, Any] = {f"ae.{k}": v for k, v in cfg.to_dict()["ae"].items()}
    ident.update({
        "tokenizer.sha256": tok.sha256,
        "corpus.train_documents": n_train_docs,
        "stage1.batch_size": cfg.stage1.batch_size,
        "distributed.num_workers": cfg.distributed.num_workers,
        "distributed.zero_stage": cfg.distributed.zero_stage,
    })
    return ident


def _check_identity(run: RunDir, identity: dict[str, Any]) -> None:
    path = ("_train", f"{RUN_NAME}.identity.json")
    if run.exists(*path):
        old = run.read_json(*path)
        if old != identity:
            raise ArtifactError(
                f"'{run.uri('_train', RUN_NAME)}' holds a stage-1 run with a different setup "
                f"({tc.diff_identity(old, identity)}); use a new --run directory, or --overwrite to discard it"
            )
    else:
        if run.exists("_train", RUN_NAME):
            raise ArtifactError(f"'{run.uri('_train', RUN_NAME)}' exists but was not made by this pipeline "
                                "(no identity record); use a new --run directory or --overwrite")
        run.write_text(json.dumps(identity, indent=1), *path)


def _val_tokens(val_chunks, train_chunks, limit: int) -> np.ndarray:
    rows = val_chunks.limit(limit).take_all() if val_chunks is not None else []
    if not rows:
        tc.progress("[stage1] warning: the validation split is empty (tiny corpus or data.val_fraction=0); "
                    "validating on training chunks instead")
        rows = train_chunks.limit(limit).take_all()
    return np.stack([np.asarray(r["tokens"], dtype=np.int32) for r in rows])


def run_stage1(cfg: Config, corpus: str | None, run: RunDir, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume, or skip if complete) the autoencoder; returns the RUN/ae manifest."""
    from pipelines.data.chunks import chunk_dataset
    from pipelines.data.ingest import load_corpus
    from pipelines.data.tokenizer import ensure_tokenizer

    if overwrite:
        for p in (("ae",), ("_train", RUN_NAME), ("_train", f"{RUN_NAME}.identity.json")):
            run.delete(*p)
    if run.has_artifact("ae"):
        m = run.read_json("ae", "manifest.json")
        if m["metrics"].get("step", 0) >= cfg.stage1.max_steps:
            tc.progress(f"[stage1] {run.uri('ae')} is complete ({m['metrics'].get('step')} steps); nothing to do "
                        "(--overwrite retrains)")
            return m

    t0 = time.perf_counter()
    train_docs, val_docs, stats = load_corpus(corpus, cfg.data)
    tc.progress(f"[corpus] {stats.summary()}")
    corpus_info = {"spec": corpus, **stats.to_dict()}
    tok = ensure_tokenizer(cfg, run, train_docs, corpus_info)
    if tok.vocab_size > 0 and cfg.tokenizer.path == "" and tok.vocab_size != cfg.tokenizer.vocab_size:
        tc.progress(f"[tokenizer] note: the corpus supported {tok.vocab_size} tokens of the {cfg.tokenizer.vocab_size} asked")

    K = cfg.ae.K
    # materialised with only the column training reads: while the Train workers hold their CPUs,
    # streaming it to them then needs no Ray Data task (a task the leftover CPU share of a
    # 2-core machine could not schedule would stall training forever)
    train_chunks = chunk_dataset(train_docs, tok, K, cfg.data.read_cpus).select_columns(
        ["tokens"], num_cpus=cfg.data.read_cpus).materialize()
    val_chunks = chunk_dataset(val_docs, tok, K, cfg.data.read_cpus).materialize() if val_docs is not None else None
    n_train = train_chunks.count()
    d = cfg.distributed
    need = cfg.stage1.batch_size * d.num_workers
    if n_train < need:
        raise DataError(f"the corpus gives {n_train} training chunks, fewer than one step needs "
                        f"(stage1.batch_size {cfg.stage1.batch_size} x {d.num_workers} workers); "
                        "lower stage1.batch_size or use a larger corpus")
    val_tokens = _val_tokens(val_chunks, train_chunks, cfg.stage1.val_max_chunks)
    tc.progress(f"[stage1] {n_train:,} training chunks of K={K} ({n_train * K:,} token slots), "
                f"{len(val_tokens):,} held-out chunks; prepared in {time.perf_counter() - t0:.1f}s")

    identity = stage1_identity(cfg, tok, stats.documents.get("train", 0))
    _check_identity(run, identity)
    live_log = run.path("logs", "stage1.metrics.jsonl") if run.is_local else None
    tb_dir = run.path("logs", "tb", "stage1") if run.is_local else None

    result = tc.fit(train_loop, {
        "config": cfg.to_dict(),
        "tokenizer_json": tok.to_str(),
        "val_tokens": val_tokens.tolist(),
        "identity": identity,
        "live_log": live_log,
        "tb_dir": tb_dir,
    }, d, run, RUN_NAME, {"train": train_chunks})
    return _publish_ae(cfg, run, tok, result, corpus_info, identity)


def ae_train_flops(model: ChunkAutoencoder, cfg: Config, metrics: dict[str, Any]) -> float:
    """Stage-1 training FLOPs of a run: FLOPs per token x steps x batch x K x workers."""
    return (autoencoder_train_flops_per_token(model) * metrics.get("step", 0) * cfg.stage1.batch_size * cfg.ae.K
            * metrics.get("num_workers", cfg.distributed.num_workers))


def _publish_ae(cfg: Config, run: RunDir, tok: CalmTokenizer, result, corpus_info: dict, identity: dict) -> dict:
    with torch.device("meta"):  # shapes only
        shapes = ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
    manifest, uri = tc.publish_trained(
        run, "ae", "ae", result, cfg.to_yaml(), tok,
        inputs={"tokenizer_sha256": tok.sha256, "corpus": corpus_info, "config_sha256": cfg.section_hash()},
        load_model=lambda d: load_autoencoder_dir(d, verify=False)[0],
        extra={"K": cfg.ae.K, "latent_dim": cfg.ae.latent_dim, "identity": identity,
               "flops_per_token": autoencoder_train_flops_per_token(shapes),  # stage-1 training, per token
               "train_flops": ae_train_flops(shapes, cfg, result.metrics)},
    )
    final = manifest["metrics"]
    tc.progress(f"[stage1] wrote {uri}: {manifest['parameters']:,} parameters, step {final['step']}, "
                f"held-out acc mu {100 * final.get('val_acc_mu', 0):.2f}% sample "
                f"{100 * final.get('val_acc_sample', 0):.2f}% noise {100 * final.get('val_acc_noise', 0):.2f}%")
    return manifest
