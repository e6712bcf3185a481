"""Stage 2 (the CALM model) and the discrete baseline, trained with Ray Train + DeepSpeed ZeRO from
the latents Parquet.

Driver (``run_stage2``): RUN/ae (or ``ae_path``) -> ``read_latents`` (refuses latents of another AE
or layout) -> training blocks of L consecutive chunks (``latent_blocks``; the baseline takes their
L*K tokens: both models see the same tokenizer, corpus, split and blocks) -> ``trainer.fit`` ->
RUN/calm or RUN/baseline (safetensors, resolved config, tokenizer, metrics, manifest naming the AE).

Worker (``ModelStage`` in the shared loop, ``pipelines.train.loop``): DeepSpeed engine over CALM or
the token baseline; every ``log_every`` steps a validation pass on held-out blocks: the loss and
BrierLM at every chunk start (``calm_core.evaluate``: CALM from ``brier_samples`` decoded head
samples; the baseline from its probabilities, the sample-only estimate beside it), tokens/s and
training FLOPs so far. Checkpoints through ``ray.train.report``; rerunning resumes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from calm_core.artifacts import AEArtifact, build_model, flops_breakdown, load_ae, load_model, loaded_model, model_inputs
from calm_core.autoencoder import ChunkAutoencoder, encoder_flops_per_token
from calm_core.brierlm import ORDERS
from calm_core.chunking import layout_of
from calm_core.config import Config
from calm_core.errors import ArtifactError, ConfigError, DataError
from calm_core.evaluate import baseline_heldout, calm_heldout, heldout_record
from calm_core.tokenizer import CalmTokenizer
from pipelines.claim import Spot, claim
from pipelines.data import latents as LT
from pipelines.progress import progress
from pipelines.storage import RunDir
from pipelines.train.loop import TrainPlan
from pipelines.train.stream import corpus_shuffled
from pipelines.train.trainer import fit, publish_trained
from pipelines.train.worker import all_reduce_sum

SECTIONS = {"calm": "stage2", "baseline": "baseline"}  # kind -> its config section; the artifact is RUN/<kind>


# ============================================================================ worker side


class ModelStage:
    """CALM or the baseline on a worker (``pipelines.train.loop.Stage``), on blocks of L chunks."""

    def __init__(self, plan: TrainPlan, device: torch.device):
        self.kind, self.cfg, self.device = plan.kind, plan.config, device
        self.t = getattr(self.cfg, plan.section)
        self.tok = CalmTokenizer.from_str(plan.tokenizer_json)
        self.val_label = plan.val_label
        self.tokens_per_batch = self.t.batch_size * self.cfg.model.block_chunks * self.cfg.ae.K
        self.too_small = (f"this worker's shard holds less than one batch of {self.t.batch_size} blocks; lower "
                          f"{plan.section}.batch_size or model.block_chunks, or use a larger corpus")
        self.ae = None
        if self.kind == "calm":  # the frozen decoder, for the in-training BrierLM
            self.ae = ChunkAutoencoder(self.cfg.ae, self.tok.vocab_size, self.tok.mask_id, self.tok.pad_id)
            self.ae.load_state_dict(load_safetensors(plan.ae_weights))
            self.ae.to(device).eval().requires_grad_(False)

        self.init_weights = plan.init_weights  # read by the first build only (later ones: ZeRO-3 validation copies)

    def build(self) -> torch.nn.Module:
        if not self.init_weights:
            return build_model(self.kind, self.cfg, self.tok.vocab_size)
        from pipelines.storage import fetch_dir  # fine-tuning: the earlier model's weights (a resume then loads its checkpoint)

        model = loaded_model(self.kind, self.cfg, self.tok.vocab_size, fetch_dir(self.init_weights, file_ok=True))
        self.init_weights = ""
        return model

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return flops_breakdown(self.kind, model)["total"]

    def step(self, engine, b):
        if self.kind == "calm":
            out = engine(b["tokens"].to(self.device).long(), b["mu"].to(self.device), b["log_sigma"].to(self.device))
            return out.loss, {"loss": out.loss.item(), "fidelity": out.fidelity.item(), "diversity": out.diversity.item()}
        loss = engine(b["tokens"].to(self.device).long().flatten(1))  # [B, L*K]
        return loss, {"loss": loss.item()}

    def validate(self, model, val) -> dict[str, float]:
        t = self.t
        sums = (calm_heldout(model, self.ae, val, t.batch_size, t.brier_samples, t.seed) if self.kind == "calm"
                else baseline_heldout(model, val, t.batch_size, self.cfg.ae.K, t.brier_samples, t.seed, self.tok.pad_id))
        return {**heldout_record(self.kind, all_reduce_sum(sums, self.device)),
                "val_on_training_data": float(self.val_label != "held-out")}

    def describe(self, r: dict[str, Any]) -> str:
        gap = f", gap closed {r['val_gap_closed']:.1%}" if "val_gap_closed" in r else ""
        return (f"loss {r.get('loss', float('nan')):.4f} | {self.val_label} loss {r['val_loss']:.4f}{gap} BrierLM "
                f"{r['val_brierlm']:.2f} (Brier-1 {r['val_brier1']:.3f}) | {r['tokens_per_s']:,.0f} tok/s | "
                f"{r['train_flops']:.3g} FLOPs")


# ============================================================================ driver side


def _blocks(ds, manifest: dict, L: int, kind: str, cpus: float, shuffle_seed: int | None = None,
            num_workers: int = 1):
    blocks = LT.latent_blocks(ds, manifest, L, num_cpus=cpus)
    if shuffle_seed is not None:
        # ~512 training blocks per Ray Data block (~34 MB at config small), at least 4 per rank
        approx = int(manifest["metrics"]["rows_per_split"]["train"]) // L
        blocks = corpus_shuffled(blocks, shuffle_seed, cpus, num_blocks=max(4 * num_workers, -(-approx // 512)))
    return blocks.select_columns(["tokens"], num_cpus=cpus) if kind == "baseline" else blocks


def held_out_blocks(run: RunDir, lman: dict, ae_ident: dict, L: int, max_chunks: int,
                    kind: str = "calm", workers: int = 1) -> tuple[dict[str, np.ndarray], str]:
    """Up to ``max_chunks`` held-out chunks as blocks of L, at least one per worker (the workers split
    them evenly: fewer blocks than workers and none would validate): tokens int64 [N, L, K], mu and
    log_sigma float32 [N, L, l], ``key`` [N] (its noise seed in ``calm_core.evaluate``), and their
    label: "held-out", or "training-block" when the training split stands in (said in a warning)."""
    want = max(workers, max_chunks // L)
    split = "val" if lman["metrics"]["rows_per_split"].get("val", 0) >= workers * L else "train"
    # the FIRST blocks in stream order, every run: runs on the same latents validate on the same
    # blocks (once, when Ray Data chose them, a sweep's trials on one latent set showed unconditional
    # reference losses of 18.93 and 18.72)
    rows = LT.first_blocks(run, split, L, want, expected=ae_ident, manifest=lman)
    if split == "val" and len(rows) < workers:  # held-out chunks enough in all, but not in runs of L per file
        split, rows = "train", LT.first_blocks(run, "train", L, want, expected=ae_ident, manifest=lman)
    if split == "train":
        progress(f"[{kind}] warning: fewer than {workers} held-out block(s) of {L} chunks; validating on "
                 "training blocks (every figure below says 'training-block')")
    if len(rows) < workers:
        raise DataError(f"the latents hold {len(rows)} run(s) of {L} consecutive chunks within one part file, fewer "
                        f"than the {workers} workers that validate on them; lower model.block_chunks or "
                        "distributed.num_workers, or precompute from a larger corpus")
    val = {k: np.stack([r[k] for r in rows]).astype(np.int64 if k == "tokens" else np.float32)
           for k in ("tokens", "mu", "log_sigma")}
    val["key"] = np.arange(len(rows), dtype=np.int64)  # each block's noise seed, whatever rank scores it
    return val, "held-out" if split == "val" else "training-block"


def stage2_identity(kind: str, cfg: Config, ae_ident: dict, latents_identity: dict) -> dict[str, Any]:
    """What a CALM or baseline checkpoint depends on; a rerun with anything else here is refused."""
    section = SECTIONS[kind]
    ident = {"kind": kind, **{f"model.{k}": v for k, v in cfg.to_dict()["model"].items()},
             "ae_sha256": ae_ident["ae_sha256"], "tokenizer_sha256": ae_ident["tokenizer_sha256"],
             "latents_dtype": latents_identity.get("dtype"), "corpus_documents": latents_identity.get("corpus_documents"),
             f"{section}.batch_size": getattr(cfg, section).batch_size,
             # (only when set: the identities of runs made before the key existed stay the same)
             **({f"{section}.grad_accum": getattr(cfg, section).grad_accum}
                if getattr(cfg, section).grad_accum != 1 else {}),
             **({f"{section}.shuffle": "corpus", f"{section}.seed": getattr(cfg, section).seed}
                if getattr(cfg, section).shuffle == "corpus" else {}),
             "distributed.num_workers": cfg.distributed.num_workers, "distributed.zero_stage": cfg.distributed.zero_stage,
             **({"data.layout": "packed"} if cfg.data.layout == "packed" else {})}
    if kind == "calm":
        ident.update({f"head.{k}": v for k, v in cfg.to_dict()["head"].items()})
    return ident


def _load_ae(cfg: Config, run: RunDir, ae_path: str | None) -> tuple[AEArtifact, Config]:
    """The AE and the config with its ``ae`` section (K and the latent width come from the AE) and
    its layout (``data.layout`` auto: the AE's)."""
    ae = load_ae(Path(ae_path) if ae_path else run.local_artifact("ae"))
    cfg = _with_layout(cfg, ae)
    if ae.cfg.ae.K < max(ORDERS):
        raise ConfigError(f"the autoencoder at '{ae.path}' has K = {ae.cfg.ae.K}; BrierLM compares the first "
                          f"{max(ORDERS)} tokens of one predicted chunk, so stage 2 needs K >= {max(ORDERS)}")
    return ae, dataclasses.replace(cfg, ae=ae.cfg.ae)


def _with_layout(cfg: Config, ae: AEArtifact) -> Config:
    """``cfg`` with its layout resolved: data.layout, or (auto) the layout the AE was trained on."""
    if cfg.data.layout != "auto":
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout=layout_of(ae.cfg.data.layout)))


def _init_from(cfg: Config, kind: str, ae: AEArtifact) -> tuple[Config, str, dict[str, Any]]:
    """``<section>.init_from``: the earlier artifact's architecture in ``cfg`` (the training layout,
    model.block_chunks, stays this config's), the path of its weights and what names it. Its
    tokenizer, and for CALM its AE, must be this run's (by hash)."""
    from pipelines.storage import fetch_dir

    spec = getattr(cfg, SECTIONS[kind]).init_from
    if not spec:
        return cfg, "", {}
    cfg = _with_layout(cfg, ae)
    init = load_model(fetch_dir(spec), kind, expected_ae_sha256=ae.sha256 if kind == "calm" else None, weights=False)
    if init.tok.sha256 != ae.tok.sha256:
        raise ArtifactError(f"{SECTIONS[kind]}.init_from '{spec}' was made with another tokenizer "
                            f"({init.tok.sha256[:12]}) than this run's AE ({ae.tok.sha256[:12]})")
    if layout_of(init.cfg.data.layout) != cfg.data.layout:
        raise ArtifactError(f"{SECTIONS[kind]}.init_from '{spec}' was trained on the {layout_of(init.cfg.data.layout)} "
                            f"layout and this run trains on the {cfg.data.layout} layout (data.layout); set "
                            f"data.layout={layout_of(init.cfg.data.layout)} and precompute the latents with it")
    if init.cfg.ae.K != cfg.ae.K:
        raise ArtifactError(f"{SECTIONS[kind]}.init_from '{spec}' works on chunks of K={init.cfg.ae.K}, this run's AE on K={cfg.ae.K}")
    model = dataclasses.replace(init.cfg.model, block_chunks=cfg.model.block_chunks)
    cfg = dataclasses.replace(cfg, model=model, head=init.cfg.head if kind == "calm" else cfg.head)
    weights = init.path / "model.safetensors"
    progress(f"[{kind}] starting from {spec} ({sum(p.numel() for p in init.model.parameters()):,} parameters, "
             f"d_model {model.d_model}, {model.n_layers} layers)")
    return cfg, spec.rstrip("/") + "/model.safetensors" if "://" in spec else str(weights), {
        "init_from_sha256": init.manifest.get("files", {}).get("model.safetensors")}


def _train_blocks(cfg: Config, run: RunDir, kind: str, ae_ident: dict):
    t, d, L = getattr(cfg, SECTIONS[kind]), cfg.distributed, cfg.model.block_chunks
    train_ds, lman = LT.read_latents(run, "train", expected=ae_ident)
    # blocks in file order, not in read-task completion order: a rerun that resumes then cuts the
    # same shards (pipelines.train.stream)
    train_ds.context.execution_options.preserve_order = True
    train = _blocks(train_ds, lman, L, kind, cfg.data.read_cpus,
                    shuffle_seed=t.seed if t.shuffle == "corpus" else None, num_workers=d.num_workers).materialize()
    n_train = train.count()
    if n_train < t.batch_size * d.num_workers:
        raise DataError(f"the latents give {n_train} training blocks of {L} chunks, fewer than one step needs "
                        f"({SECTIONS[kind]}.batch_size {t.batch_size} x {d.num_workers} workers); lower them or "
                        "model.block_chunks, or use a larger corpus")
    return train, n_train


def run_stage2(cfg: Config, run: RunDir, kind: str = "calm", ae_path: str | None = None,
               overwrite: bool = False, replace_stale: bool = False, latents: RunDir | None = None,
               callbacks: list | None = None) -> dict[str, Any]:
    """Train (or resume, or leave alone if complete) RUN/calm or RUN/baseline; returns the manifest.

    A run or artifact of another setup (another AE, latents, model, batch or layout) is refused
    unless ``overwrite``; ``replace_stale`` (the chained run_all job) replaces it with a message.
    ``latents``: the run directory whose LATENTS/latents are read (default ``run``; a sweep's trials
    share one); ``callbacks``: Ray Train callbacks (a sweep's TuneReportCallback), which also makes
    every log line's metrics a report, not only the checkpoints'."""
    section, t0 = SECTIONS[kind], time.perf_counter()
    spot = Spot(run, kind, record=("_train", f"{section}.identity.json"), work=(("_train", section),),
                label=kind, what=f"a {kind} run", remedy="use a new --run, or --overwrite")
    if overwrite:
        spot.discard()
    ae, cfg = _load_ae(cfg, run, ae_path)
    cfg, init_weights, init_ident = _init_from(cfg, kind, ae)
    src = latents or run
    lman = LT.latents_manifest(src)
    LT.check_matches(lman, ae.identity, src.uri(LT.ARTIFACT))
    LT.check_layout(lman, cfg.data.layout, src.uri(LT.ARTIFACT), f"this {kind} run")
    identity = {**stage2_identity(kind, cfg, ae.identity, lman["identity"]), **init_ident}
    max_steps = getattr(cfg, section).max_steps
    done = claim(spot, identity, lambda m: f"{m['metrics'].get('step', 0)} steps"
                 if m["metrics"].get("step", 0) >= max_steps else None, replace_stale=replace_stale,
                 hint=f"raise {section}.max_steps to extend it, --overwrite retrains")
    if done is not None:
        return done
    train, n_train = _train_blocks(cfg, src, kind, ae.identity)
    L = cfg.model.block_chunks
    val, label = held_out_blocks(src, lman, ae.identity, L, getattr(cfg, section).val_max_chunks, kind,
                                 workers=cfg.distributed.num_workers)
    progress(f"[{kind}] {n_train:,} training blocks of L={L} chunks (K={cfg.ae.K}: {n_train * L * cfg.ae.K:,} "
             f"tokens), {len(val['tokens'])} {label} blocks for validation; prepared in {time.perf_counter() - t0:.1f}s")
    local = run.is_local
    plan = TrainPlan(kind, section, cfg, ae.tok.to_str(), val, identity,
                     run.path("logs", f"{section}.metrics.jsonl") if local else None,
                     run.path("logs", "tb", section) if local else None,
                     (ae.path / "model.safetensors").read_bytes() if kind == "calm" else b"", label, init_weights,
                     report_every_log=bool(callbacks))
    return _publish(plan, run, ae, fit(ModelStage, plan, run, {"train": train}, callbacks=callbacks))


def _publish(plan: TrainPlan, run: RunDir, ae: AEArtifact, result) -> dict:
    kind, cfg = plan.kind, plan.config
    with torch.device("meta"):  # shapes only: no weights allocated on the driver
        flops = flops_breakdown(kind, build_model(kind, cfg, ae.tok.vocab_size))
    flops["encoder_forward_once"] = encoder_flops_per_token(ae.model)  # per token; not in "total"
    manifest, uri = publish_trained(
        run, kind, plan, result, ae.tok, model_inputs(cfg, ae.tok, ae.sha256),
        extra={"flops_per_token": result.metrics.get("flops_per_token"), "flops_per_token_by_part": flops,
               "K": cfg.ae.K, "latent_dim": cfg.ae.latent_dim},
        load=lambda d: load_model(d, kind, verify=False).model)
    final = manifest["metrics"]
    progress(f"[{kind}] wrote {uri}: {manifest['parameters']:,} parameters, step {final['step']}, {plan.val_label} "
             f"loss {final.get('val_loss', float('nan')):.4f}, BrierLM {final.get('val_brierlm', float('nan')):.2f}")
    return manifest


# ============================================================================ the two job scripts


def job(kind: str, description: str):
    """``parser(), main(argv)`` of jobs/stage2.py (kind "calm") and jobs/baseline.py (kind "baseline")."""
    from pipelines.cli import make_parser, parse
    from pipelines.ray_env import init_ray

    parser = lambda: make_parser(description, corpus=False, ae=True)  # noqa: E731

    def main(argv=None):
        args, cfg, run = parse(parser(), argv)
        ae_dir = args.ae or str(run.local_artifact("ae"))  # a missing AE fails before Ray starts
        init_ray(cfg.ray)
        run_stage2(cfg, run, kind=kind, ae_path=ae_dir, overwrite=args.overwrite)

    return parser, main
