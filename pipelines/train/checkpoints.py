"""Checkpoints of a training stage: every rank's DeepSpeed shard plus rank 0's record, reported to
Ray Train; restore (refusing a checkpoint of another run); consolidated weights under any ZeRO stage.

Every rank saves its DeepSpeed shard into a local folder and reports it through
``ray.train.report`` (Ray Train merges the ranks' files into one checkpoint directory); ``report``
is called the same number of times on every rank. ``meta.json`` (rank 0) holds the step, the run's
identity and the metric records so far, so a resumed run continues its metrics log.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from calm_core.checkpoint import save_weights
from calm_core.errors import ArtifactError
from pipelines.claim import diff_identity
from pipelines.progress import progress

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every reported checkpoint
META = "meta.json"  # rank 0's record of the step, the run identity and the metrics so far


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of ``engine.module`` on every rank (collective under ZeRO-3)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    else:
        state = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    for n, b in module.named_buffers():
        state[n] = b.detach().cpu().clone()
    return state


def save_checkpoint(engine, folder: Path, step: int, meta: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 also writes meta.json."""
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={"step": step})
    if rank == 0:
        (folder / META).write_text(json.dumps({"step": step, **meta}))


def restore_checkpoint(engine, checkpoint, identity: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Load the DeepSpeed state from a Ray checkpoint; refuse one from a different run."""
    with checkpoint.as_directory() as d:
        meta_path = Path(d) / META
        if not meta_path.is_file():
            raise ArtifactError(f"checkpoint '{checkpoint.path}' has no {META}: not made by this pipeline")
        meta = json.loads(meta_path.read_text())
        if meta.get("identity") != identity:
            raise ArtifactError(
                f"checkpoint '{checkpoint.path}' belongs to a different run (identity "
                f"{diff_identity(meta.get('identity') or {}, identity)}); use a new --run or --overwrite"
            )
        _, client = engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        step = int((client or {}).get("step", meta["step"]))
    return step, meta


def resume(engine, identity: dict[str, Any], rank: int, label: str) -> tuple[int, list[dict]]:
    """(step, metric records) from Ray Train's latest checkpoint, or (0, []) on a fresh run."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    step, meta = restore_checkpoint(engine, ckpt, identity)
    if rank == 0:
        progress(f"[{label}] resumed from step {step} ({ckpt.path})")
    return step, [r for r in meta.get("records", []) if r.get("step", 0) <= step]


def eval_model(engine, zero_stage: int, build, device: torch.device):
    """The model to validate: the engine's module, or under ZeRO-3 (whose parameters are partitioned
    outside the module's own forward) a whole copy, built by ``build()``, gathered from the shards."""
    if zero_stage < 3:
        return engine.module
    copy = build()
    copy.load_state_dict(full_state_dict(engine, zero_stage))
    return copy.to(device)


def save_and_report(engine, step: int, identity: dict[str, Any], log, zero_stage: int, rank: int,
                    metrics: dict[str, Any], final: bool) -> None:
    """Every rank saves its DeepSpeed shard and calls ray.train.report with it; the final report
    also carries rank 0's consolidated model.safetensors."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_checkpoint(engine, folder, step, {"identity": identity, "records": log.records if log else []}, rank)
        state = full_state_dict(engine, zero_stage) if final else None  # a collective under ZeRO-3
        if final and rank == 0:
            save_weights(state, folder / "model.safetensors", {"format": "pt"})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
