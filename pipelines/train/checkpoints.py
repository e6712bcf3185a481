"""Checkpoints of a training stage: every rank's DeepSpeed shard and its own record, plus rank 0's
record of the run, reported to Ray Train; restore (refusing a checkpoint of another run, or one
that lacks a part of what it resumes); consolidated weights under any ZeRO stage.

Every rank saves its DeepSpeed shard into a local folder and reports it through
``ray.train.report`` (Ray Train merges the ranks' files into one checkpoint directory); ``report``
is called the same number of times on every rank. A checkpoint holds:

    ds/                 DeepSpeed's files: weights, optimizer state (ZeRO partitions), client state
                        {"step"}; read back with weights_only=True (``pipelines.train.safe_load``)
    worker_<rank>.json  each rank's step, data position (``stream.StreamPosition``) and RNG states:
                        a resumed rank reads its next batch and draws its next noise exactly as the
                        interrupted run would have
    meta.json           rank 0: the step, the run's identity, the metric records so far (so a
                        resumed run continues its metrics log)
"""

from __future__ import annotations

import base64
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from calm_core.checkpoint import save_weights
from calm_core.errors import ArtifactError
from pipelines.claim import diff_identity
from pipelines.progress import progress
from pipelines.train.stream import StreamPosition

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every reported checkpoint
META = "meta.json"  # rank 0's record of the step, the run identity and the metrics so far


def worker_file(rank: int) -> str:
    return f"worker_{rank}.json"


@dataclass(frozen=True)
class WorkerState:
    """What one rank resumes besides DeepSpeed's state: its step, data position and RNG states."""

    step: int
    position: StreamPosition
    rng: dict[str, str]  # "cpu" (and "cuda" on a GPU rank): base64 of torch's RNG state

    @classmethod
    def capture(cls, step: int, position: StreamPosition, device: torch.device) -> "WorkerState":
        states = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(device)
        return cls(step, position, {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()})

    def restore_rng(self, device: torch.device) -> None:
        def state(key: str) -> torch.Tensor:
            return torch.frombuffer(bytearray(base64.b64decode(self.rng[key])), dtype=torch.uint8)

        torch.set_rng_state(state("cpu"))
        if device.type == "cuda":
            torch.cuda.set_rng_state(state("cuda"), device)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerState":
        d = json.loads(text)
        return cls(int(d["step"]), StreamPosition(**d["position"]), dict(d["rng"]))


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


def save_checkpoint(engine, folder: Path, state: WorkerState, meta: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shard and its WorkerState; rank 0 also writes meta.json."""
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={"step": state.step})
    (folder / worker_file(rank)).write_text(state.to_json())
    if rank == 0:
        (folder / META).write_text(json.dumps({"step": state.step, **meta}))


def restore_checkpoint(engine, checkpoint, identity: dict[str, Any], rank: int) -> tuple[dict[str, Any], WorkerState]:
    """Load the DeepSpeed state (weights, optimizer) and this rank's WorkerState from a Ray
    checkpoint; refuse one from a different run, or one without any of the parts a resume needs."""
    where = f"checkpoint '{checkpoint.path}'"
    with checkpoint.as_directory() as d:
        meta_path, state_path = Path(d) / META, Path(d) / worker_file(rank)
        if not meta_path.is_file():
            raise ArtifactError(f"{where} has no {META}: not made by this pipeline")
        meta = json.loads(meta_path.read_text())
        if meta.get("identity") != identity:
            raise ArtifactError(
                f"{where} belongs to a different run (identity "
                f"{diff_identity(meta.get('identity') or {}, identity)}); use a new --run or --overwrite"
            )
        if not state_path.is_file():
            raise ArtifactError(f"{where} has no {state_path.name} (rank {rank}'s data position and random state; "
                                "written by an earlier version of this pipeline?): it cannot resume exactly; "
                                "use --overwrite to retrain")
        state = WorkerState.from_json(state_path.read_text())
        path, client = engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ArtifactError(f"{where} holds no DeepSpeed state under '{DS_TAG}/'; use --overwrite to retrain")
        if "step" not in (client or {}):
            raise ArtifactError(f"{where}: DeepSpeed's client state has no step (not written by this pipeline)")
        steps = {"DeepSpeed's client state": int(client["step"]), META: int(meta["step"]), state_path.name: state.step}
        if len(set(steps.values())) != 1:
            raise ArtifactError(f"{where} disagrees with itself about its step ({steps}); use --overwrite to retrain")
    return meta, state


def resume(engine, identity: dict[str, Any], rank: int, label: str) -> tuple[WorkerState | None, list[dict]]:
    """(this rank's WorkerState, metric records) from Ray Train's latest checkpoint, or (None, [])
    on a fresh run."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, []
    meta, state = restore_checkpoint(engine, ckpt, identity, rank)
    if rank == 0:
        p = state.position
        progress(f"[{label}] resumed from step {state.step} ({ckpt.path}); data at epoch {p.epoch}, "
                 f"batch {p.batches} of rank 0's shard")
    return state, [r for r in meta.get("records", []) if r.get("step", 0) <= state.step]


def eval_model(engine, zero_stage: int, build, device: torch.device):
    """The model to validate: the engine's module, or under ZeRO-3 (whose parameters are partitioned
    outside the module's own forward) a whole copy, built by ``build()``, gathered from the shards."""
    if zero_stage < 3:
        return engine.module
    copy = build()
    copy.load_state_dict(full_state_dict(engine, zero_stage))
    return copy.to(device)


def save_and_report(engine, state: WorkerState, identity: dict[str, Any], log, zero_stage: int, rank: int,
                    metrics: dict[str, Any], final: bool) -> None:
    """Every rank saves its DeepSpeed shard and WorkerState and calls ray.train.report with them;
    the final report also carries rank 0's consolidated model.safetensors."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_checkpoint(engine, folder, state, {"identity": identity, "records": log.records if log else []}, rank)
        weights = full_state_dict(engine, zero_stage) if final else None  # a collective under ZeRO-3
        if final and rank == 0:
            save_weights(weights, folder / "model.safetensors", {"format": "pt"})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
