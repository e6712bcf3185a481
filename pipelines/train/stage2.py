"""Stage 2 (the CALM model) and the discrete baseline, trained with Ray Train + DeepSpeed ZeRO from
the latents Parquet.

Driver (``run_stage2``): RUN/ae (or ``ae_path``) -> ``read_latents`` (refuses latents of another AE)
-> training blocks of L consecutive chunks (``latent_blocks``; the baseline takes their L*K tokens,
so both models see the same tokenizer, corpus, split and blocks) -> ``TorchTrainer.fit`` ->
RUN/calm or RUN/baseline (consolidated safetensors, resolved config, tokenizer, metrics, manifest
naming the AE by hash).

Worker (``train_loop``): DeepSpeed engine over ``calm_core.calm_model.CALM`` or
``calm_core.baseline.TokenLM``; every ``log_every`` steps a validation pass on held-out blocks:
the loss (CALM: energy loss with its fidelity and diversity terms; baseline: cross-entropy) and
BrierLM at every chunk start (``calm_core.evaluate``: CALM from ``brier_samples`` head samples
decoded by the frozen AE decoder; the baseline from its probabilities, with the sample-only
estimate beside it), tokens/s and training FLOPs so far. Checkpoints through
``ray.train.report``; rerunning resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm_core.autoencoder import ChunkAutoencoder, encoder_flops_per_token, load_autoencoder_dir
from calm_core.baseline import TokenLM, baseline_train_flops_per_token
from calm_core.brierlm import ORDERS
from calm_core.calm_model import CALM, calm_train_flops_per_token
from calm_core.config import Config, config_from_dict
from calm_core.errors import ArtifactError, ConfigError, DataError
from calm_core.evaluate import baseline_heldout, calm_heldout, heldout_record
from calm_core.optim import lr_at, param_groups
from calm_core.tokenizer import CalmTokenizer
from pipelines.data import latents as LT
from pipelines.train import common as tc
from pipelines.storage import RunDir

KINDS = {"calm": ("stage2", "calm"), "baseline": ("baseline", "baseline")}  # kind -> (config section, artifact)


def build_model(kind: str, cfg: Config, vocab_size: int) -> torch.nn.Module:
    if kind == "calm":
        return CALM(cfg.model, cfg.head, cfg.ae, vocab_size)
    return TokenLM(cfg.model, vocab_size, cfg.ae.K)


def flops_per_token(kind: str, model) -> float:
    return flops_breakdown(kind, model)["total"]


def flops_breakdown(kind: str, model) -> dict[str, float]:
    """Training FLOPs per token by part (formulas in calm_core/calm_model.py and calm_core/baseline.py)."""
    return calm_train_flops_per_token(model) if kind == "calm" else baseline_train_flops_per_token(model)


# ============================================================================ worker side


def train_loop(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed
    import ray.train
    from safetensors.torch import load as load_safetensors

    kind = loop["kind"]
    section, _ = KINDS[kind]
    cfg = config_from_dict(loop["config"], f"{kind} train_loop_config")
    t, d = getattr(cfg, section), cfg.distributed
    tok = CalmTokenizer.from_str(loop["tokenizer_json"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = tc.setup_worker(d)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(kind, cfg, tok.vocab_size)
    fpt = flops_per_token(kind, model)
    ae = None
    if kind == "calm":  # the frozen decoder, for the quick BrierLM
        ae = ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
        ae.load_state_dict(load_safetensors(loop["ae_weights"]))
        ae.to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt,
        config=tc.deepspeed_config(t.batch_size, t.grad_clip, d.zero_stage, tc.resolve_precision(d)))
    tc.compile_step(engine, d)

    nv = (len(loop["val"]["tokens"]) // world) * world
    val = {k: torch.as_tensor(np.asarray(v, dtype=np.int64 if k == "tokens" else np.float32))[:nv][rank::world]
           for k, v in loop["val"].items()}

    step, records = tc.resume(engine, loop["identity"], rank, kind)
    log = tc.MetricsLog(records, loop["live_log"], loop["tb_dir"]) if rank == 0 else None
    torch.manual_seed(t.seed + 1000 * rank + 1_000_003 * step + 1)  # head noise, targets: a stream per rank

    shard = ray.train.get_dataset_shard("train")
    L, K = cfg.model.block_chunks, cfg.ae.K
    tokens_per_step = t.batch_size * L * K * world
    tokens_seen = records[-1].get("tokens_seen", 0) if records else 0
    thr, t_start, last, stopped_early = tc.Throughput(), time.perf_counter(), {}, False

    data = tc.epoch_batches(shard, t.batch_size, t.shuffle_buffer, t.seed,
                            f"this worker's shard holds less than one batch of {t.batch_size} blocks; lower "
                            f"{section}.batch_size or model.block_chunks, or use a larger corpus")
    report = lambda metrics, final: tc.save_and_report(  # noqa: E731
        engine, step, loop["identity"], log, d.zero_stage, rank, metrics, final)
    engine.train()
    while step < t.max_steps:
        b = next(data)
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        for grp in engine.optimizer.param_groups:
            grp["lr"] = lr
        if kind == "calm":
            out = engine(b["tokens"].to(device).long(), b["mu"].to(device), b["log_sigma"].to(device))
            loss = out.loss
            last = {"loss": loss.item(), "fidelity": out.fidelity.item(), "diversity": out.diversity.item()}
        else:
            loss = engine(b["tokens"].to(device).long().flatten(1))
            last = {"loss": loss.item()}
        engine.backward(loss)
        engine.step()
        step += 1
        tokens_seen += tokens_per_step
        thr.add(tokens_per_step)
        last["lr"] = lr

        if step % t.log_every == 0 or step == t.max_steps:
            m = tc.eval_model(engine, d.zero_stage, lambda: build_model(kind, cfg, tok.vocab_size), device)
            with tc.eager(d):
                sums = (calm_heldout(m, ae, val, t.batch_size, t.brier_samples, t.seed) if kind == "calm"
                        else baseline_heldout(m, val, t.batch_size, K, t.brier_samples, t.seed, tok.pad_id))
            rec = {"step": step, **last, **heldout_record(kind, tc.all_reduce_sum(sums, device)),
                   "tokens_per_s": thr.rate(), "tokens_seen": tokens_seen,
                   "train_flops": tokens_seen * fpt, "elapsed_s": time.perf_counter() - t_start}
            if log is not None:
                log.log(rec)
                tc.progress(f"[{kind}] step {step}/{t.max_steps} loss {last['loss']:.4f} | held-out loss "
                            f"{rec['val_loss']:.4f} BrierLM {rec['val_brierlm']:.2f} (Brier-1 {rec['val_brier1']:.3f}) "
                            f"| {thr.rate():,.0f} tok/s | {rec['train_flops']:.3g} FLOPs")
            thr.reset()
            if tc.budget_reached(t, t_start, step, device, rank, kind):
                stopped_early = True
                break
            if step % t.checkpoint_every == 0 and step < t.max_steps:
                report({**rec, "final": False}, final=False)

    final_record = dict(log.records[-1]) if log and log.records else {"step": step}
    report({**final_record, "step": step, "final": True, "stopped_early": stopped_early,
                     "flops_per_token": fpt, "num_workers": world}, final=True)
    if log is not None:
        log.close()


# ============================================================================ driver side


def _blocks(ds, manifest: dict, L: int, kind: str, cpus: float):
    blocks = LT.latent_blocks(ds, manifest, L, num_cpus=cpus)
    return blocks.select_columns(["tokens"], num_cpus=cpus) if kind == "baseline" else blocks


def held_out_blocks(run: RunDir, lman: dict, ae_ident: dict, L: int, max_chunks: int, cpus: float,
                    kind: str = "calm") -> dict[str, list]:
    """Up to ``max_chunks`` held-out chunks as blocks of L: {"tokens", "mu", "log_sigma"} nested lists
    (the training split stands in, with a warning, when the held-out split has fewer than L chunks)."""
    split = "val" if lman["metrics"]["rows_per_split"].get("val", 0) >= L else "train"
    if split == "train":
        tc.progress(f"[{kind}] warning: fewer than {L} held-out chunks; validating on training blocks")
    ds, _ = LT.read_latents(run, split, expected=ae_ident)
    rows = _blocks(ds, lman, L, "calm", cpus).limit(max(1, max_chunks // L)).take_all()
    return {k: np.stack([r[k] for r in rows]).tolist() for k in ("tokens", "mu", "log_sigma")}


def _identity(kind: str, cfg: Config, ae_ident: dict, latents_identity: dict) -> dict[str, Any]:
    section, _ = KINDS[kind]
    t = getattr(cfg, section)
    ident = {"kind": kind, **{f"model.{k}": v for k, v in cfg.to_dict()["model"].items()},
             "ae_sha256": ae_ident["ae_sha256"], "tokenizer_sha256": ae_ident["tokenizer_sha256"],
             "latents_dtype": latents_identity.get("dtype"), "corpus_documents": latents_identity.get("corpus_documents"),
             f"{section}.batch_size": t.batch_size, "distributed.num_workers": cfg.distributed.num_workers,
             "distributed.zero_stage": cfg.distributed.zero_stage}
    if kind == "calm":
        ident.update({f"head.{k}": v for k, v in cfg.to_dict()["head"].items()})
    return ident


def run_stage2(cfg: Config, run: RunDir, kind: str = "calm", ae_path: str | None = None,
               overwrite: bool = False, replace_stale: bool = False) -> dict[str, Any]:
    """Train (or resume, or leave alone if complete) RUN/calm or RUN/baseline; returns the manifest.

    A run or artifact of another setup (another AE, latents, model, batch or layout) is refused
    unless ``overwrite``; ``replace_stale`` (the chained run_all job) replaces it with a message."""
    section, artifact = KINDS[kind]
    t, d = getattr(cfg, section), cfg.distributed
    name = section
    id_path = ("_train", f"{name}.identity.json")

    def discard():
        for p in ((artifact,), ("_train", name), id_path):
            run.delete(*p)

    if overwrite:
        discard()
    t0 = time.perf_counter()
    ae_dir = Path(ae_path) if ae_path else run.local_artifact("ae")
    ae_model, ae_cfg, tok, ae_manifest = load_autoencoder_dir(ae_dir)
    cfg.ae = ae_cfg.ae  # K and the latent width come from the AE
    with torch.device("meta"):  # shapes only: no weights allocated on the driver
        flops = flops_breakdown(kind, build_model(kind, cfg, tok.vocab_size))
    flops["encoder_forward_once"] = encoder_flops_per_token(ae_model)  # per token; not in "total"
    if cfg.ae.K < max(ORDERS):
        raise ConfigError(f"the autoencoder at '{ae_dir}' has K = {cfg.ae.K}; BrierLM compares the first "
                          f"{max(ORDERS)} tokens of one predicted chunk, so stage 2 needs K >= {max(ORDERS)}")
    ae_ident = LT.ae_identity(ae_dir, ae_manifest)
    lman = LT.latents_manifest(run)
    LT.check_matches(lman, ae_ident, run.uri(LT.ARTIFACT))
    identity = _identity(kind, cfg, ae_ident, lman["identity"])

    old = run.read_json(*id_path) if run.exists(*id_path) else None
    if old is None and run.has_artifact(artifact):
        old = run.read_json(artifact, "manifest.json").get("identity")
    if old is not None and old != identity:
        msg = (f"'{run.uri(artifact)}' / '{run.uri('_train', name)}' hold a {kind} run with a different setup "
               f"({tc.diff_identity(old, identity)})")
        if not replace_stale:
            raise ArtifactError(msg + "; use a new --run, or --overwrite")
        tc.progress(f"[{kind}] {msg}; retraining for the current AE and latents")
        discard()
    if run.has_artifact(artifact):
        m = run.read_json(artifact, "manifest.json")
        if m["metrics"].get("step", 0) >= t.max_steps:
            tc.progress(f"[{kind}] {run.uri(artifact)} is complete ({m['metrics'].get('step')} steps); nothing to "
                        f"do (raise {section}.max_steps to extend it, --overwrite retrains)")
            return m
    if not run.exists(*id_path):
        if run.exists("_train", name):
            raise ArtifactError(f"'{run.uri('_train', name)}' exists but has no identity record; use a new --run "
                                "or --overwrite")
        run.write_text(json.dumps(identity, indent=1), *id_path)

    train_ds, lman = LT.read_latents(run, "train", expected=ae_ident)
    L = cfg.model.block_chunks
    train = _blocks(train_ds, lman, L, kind, cfg.data.read_cpus).materialize()
    n_train = train.count()
    need = t.batch_size * d.num_workers
    if n_train < need:
        raise DataError(f"the latents give {n_train} training blocks of {L} chunks, fewer than one step needs "
                        f"({section}.batch_size {t.batch_size} x {d.num_workers} workers); lower them or "
                        "model.block_chunks, or use a larger corpus")
    val = held_out_blocks(run, lman, ae_ident, L, t.val_max_chunks, cfg.data.read_cpus, kind)
    tc.progress(f"[{kind}] {n_train:,} training blocks of L={L} chunks (K={cfg.ae.K}: {n_train * L * cfg.ae.K:,} "
                f"tokens), {len(val['tokens'])} held-out blocks; prepared in {time.perf_counter() - t0:.1f}s")

    result = tc.fit(train_loop, {
        "kind": kind, "config": cfg.to_dict(), "tokenizer_json": tok.to_str(), "val": val,
        "identity": identity, "ae_weights": (ae_dir / "model.safetensors").read_bytes() if kind == "calm" else b"",
        "live_log": run.path("logs", f"{name}.metrics.jsonl") if run.is_local else None,
        "tb_dir": run.path("logs", "tb", name) if run.is_local else None,
    }, d, run, name, {"train": train})
    return _publish(kind, cfg, run, tok, result, ae_ident, identity, flops)


def _publish(kind: str, cfg: Config, run: RunDir, tok: CalmTokenizer, result, ae_ident: dict, identity: dict,
             flops: dict[str, float]) -> dict:
    _, artifact = KINDS[kind]
    manifest, uri = tc.publish_trained(
        run, artifact, kind, result, cfg.to_yaml(), tok,
        inputs={"ae_sha256": ae_ident["ae_sha256"], "tokenizer_sha256": tok.sha256, "config_sha256": cfg.section_hash()},
        load_model=lambda d: load_stage2_dir(d, kind, verify=False)[0],
        extra={"flops_per_token": result.metrics.get("flops_per_token"), "flops_per_token_by_part": flops, "K": cfg.ae.K,
               "latent_dim": cfg.ae.latent_dim, "identity": identity},
    )
    final = manifest["metrics"]
    tc.progress(f"[{kind}] wrote {uri}: {manifest['parameters']:,} parameters, step {final['step']}, held-out "
                f"loss {final.get('val_loss', float('nan')):.4f}, BrierLM {final.get('val_brierlm', float('nan')):.2f}")
    return manifest


def load_stage2_dir(directory: str | Path, kind: str, verify: bool = True, expected_ae_sha256: str | None = None):
    """RUN/calm or RUN/baseline -> (model in eval mode, Config, tokenizer, manifest). Plain PyTorch;
    refuses an artifact trained on another AE than ``expected_ae_sha256``."""
    from calm_core.checkpoint import load_weights, read_manifest
    from calm_core.config import config_from_yaml

    d = Path(directory)
    manifest = read_manifest(d, kind=kind) if verify else {}
    if expected_ae_sha256 and manifest.get("inputs", {}).get("ae_sha256") != expected_ae_sha256:
        raise ArtifactError(f"'{d}' was trained on latents of another autoencoder "
                            f"({manifest['inputs'].get('ae_sha256', '?')[:12]}, expected {expected_ae_sha256[:12]})")
    cfg = config_from_yaml((d / "config.yaml").read_text(), str(d / "config.yaml"))
    tok = CalmTokenizer.from_file(d / "tokenizer.json")
    model = build_model(kind, cfg, tok.vocab_size)
    model.load_state_dict(load_weights(d / "model.safetensors"))
    return model.eval(), cfg, tok, manifest


# ============================================================================ the two job scripts


def job(kind: str, description: str):
    """``main(argv)`` of jobs/stage2.py (kind "calm") and jobs/baseline.py (kind "baseline")."""
    from pipelines.cli import make_parser, parse
    from pipelines.ray_env import init_ray

    def main(argv=None):
        parser = make_parser(description, corpus=False)
        parser.add_argument("--ae", default=None, help="the autoencoder artifact (default: RUN/ae)")
        args, cfg, run = parse(parser, argv)
        ae_dir = args.ae or str(run.local_artifact("ae"))  # a missing AE fails before Ray starts
        init_ray(cfg.ray)
        run_stage2(cfg, run, kind=kind, ae_path=ae_dir, overwrite=args.overwrite)

    return main
