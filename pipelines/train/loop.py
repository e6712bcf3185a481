"""The training loop every stage shares (stage 1, CALM, the baseline), run by each Ray Train worker.

    plan (TrainPlan, from the driver) -> stage = Stage(plan, device) -> DeepSpeed engine over stage.build()
    -> resume from Ray Train's latest checkpoint (same identity only): weights, optimizer, each rank's
       data position and RNG states -> until max_steps:
         next batch of this worker's shard (``stream.BatchStream``) -> stage.step -> backward, optimizer step
         every log_every steps and at the last: stage.validate on this rank's held-out slice (summed
         over ranks) -> a metrics record -> progress line -> wall-clock budget -> checkpoint
    -> the final report, carrying rank 0's consolidated model.safetensors

A stage supplies only what differs (``Stage``): its model, one step, its validation, its progress
line. docs/PIPELINE.md "Adding a stage" says how a new one plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from calm_core.config import Config
from calm_core.optim import lr_at
from pipelines.progress import progress
from pipelines.train.checkpoints import WorkerState, eval_model, full_state_dict, resume, save_and_report
from pipelines.train.metrics import Clock, MetricsLog
from pipelines.train.stream import BatchStream, StreamPosition
from pipelines.train.trace import Trace
from pipelines.train.worker import budget_reached, count_nodes, eager, make_engine, setup_worker


@dataclass(frozen=True)
class TrainPlan:
    """Everything the driver hands the workers, as one pickled object."""

    kind: str  # "stage1", "calm" or "baseline": the stage's name in progress lines
    section: str  # the config section that holds its training settings (stage1, stage2, baseline)
    config: Config
    tokenizer_json: str
    val: dict[str, np.ndarray]  # held-out rows (tokens [N, ...], ...); rank r validates rows r, r + world, ...
    identity: dict[str, Any]  # what a checkpoint must carry to be resumed
    live_log: str | None = None  # rank 0 appends every record here (local runs)
    tb_dir: str | None = None  # TensorBoard events (local runs, when tensorboardX is installed)
    ae_weights: bytes = b""  # CALM: the frozen AE's safetensors, for the in-training BrierLM
    val_label: str = "held-out"  # what ``val`` is, in progress lines: "held-out", or "training-block" (fallback)
    init_weights: str = ""  # stage 2 / baseline fine-tuning: the safetensors (path or URI) the model starts from
    report_every_log: bool = False  # every log line's metrics go to ray.train.report (a sweep's Tune trial), not
    #                                 only the checkpoints'


class Stage(Protocol):
    """What a stage gives the loop; built on the worker as ``Stage(plan, device)``."""

    tokens_per_batch: int  # tokens in one worker's batch
    too_small: str  # the DataError when a worker's shard cannot fill one batch

    def build(self) -> torch.nn.Module: ...

    def flops_per_token(self, model: torch.nn.Module) -> float: ...

    def step(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def validate(self, model: torch.nn.Module, val: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def describe(self, rec: dict[str, Any]) -> str: ...


def rank_slice(val: dict[str, np.ndarray], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rows rank, rank + world, ... of every held-out array (equal counts, so collectives line up)."""
    n = (len(next(iter(val.values()))) // world) * world
    return {k: torch.from_numpy(np.ascontiguousarray(v[:n][rank::world])) for k, v in val.items()}


def start_stream(plan: TrainPlan, stage, state: WorkerState | None, rank: int, device: torch.device) -> BatchStream:
    """This rank's batches from where its checkpoint left them, and its RNG as it was then; on a
    fresh run, epoch 0 and a distinct random stream per rank (masking, noise, targets)."""
    import ray.train

    t = getattr(plan.config, plan.section)
    if state is None:
        torch.manual_seed(t.seed + 1000 * rank + 1)
    else:
        state.restore_rng(device)
    return BatchStream(ray.train.get_dataset_shard("train"), t.batch_size, t.shuffle_buffer, t.seed, stage.too_small,
                       state.position if state else StreamPosition(), plan.kind)


def validate_start(plan: TrainPlan, stage, engine, val, log, clock_rec: dict, device: torch.device) -> None:
    """A step-0 record: the validation of the weights training starts from (every rank validates)."""
    d = plan.config.distributed
    with eager(d):
        val_m = stage.validate(eval_model(engine, d.zero_stage, stage.build, device), val)
    if log is not None:
        rec = {"step": 0, "init": True, **val_m, **clock_rec}
        log.log(rec)
        progress(f"[{plan.kind}] step 0 (from {plan.init_weights}) {stage.describe(rec)}")


def optimizer_step(engine, stage, data, grad_accum: int, lr: float) -> dict:
    """One optimizer step at ``lr`` over ``grad_accum`` micro-batches (DeepSpeed accumulates their
    gradients, each loss scaled by 1 / grad_accum, and steps on the last); the metrics averaged over them."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    sums: dict = {}
    for _ in range(grad_accum):
        loss, last = stage.step(engine, next(data))
        engine.backward(loss)
        engine.step()
        for k, v in last.items():
            sums[k] = sums.get(k, 0.0) + v / grad_accum
    return sums


def grad_norm(engine) -> float:
    """The global gradient norm of the step just taken, before clipping (DeepSpeed's, over every rank)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def grad_summary(norms: list[float], clip: float) -> dict[str, float]:
    """The gradient norms of the steps since the last log line: their mean and maximum, and the
    fraction of steps whose norm exceeded ``grad_clip`` (clipping acted on those)."""
    if not norms:
        return {}
    return {"grad_norm": sum(norms) / len(norms), "grad_norm_max": max(norms),
            "clipped_frac": sum(n > clip for n in norms) / len(norms) if clip > 0 else 0.0}


def run_worker(stage_cls: type, plan: TrainPlan) -> None:
    """The loop of the module docstring, on one Ray Train worker."""
    import ray.train

    d, t = plan.config.distributed, getattr(plan.config, plan.section)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = setup_worker(d)
    stage = stage_cls(plan, device)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = stage.build()
    fpt = stage.flops_per_token(model)
    engine = make_engine(model, t, d)
    val = rank_slice(plan.val, rank, world)
    num_nodes = count_nodes()
    if rank == 0:
        progress(f"[{plan.kind}] {world} workers on {num_nodes} node(s)")
    state, records = resume(engine, plan.identity, rank, plan.kind)
    step = state.step if state else 0
    log = MetricsLog(records, plan.live_log, plan.tb_dir) if rank == 0 else None
    trace = Trace(rank, lambda: full_state_dict(engine, d.zero_stage))
    trace.resumed(state)
    data = start_stream(plan, stage, state, rank, device)
    clock = Clock(records[-1].get("tokens_seen", 0) if records else 0)
    report = lambda metrics, final: save_and_report(  # noqa: E731
        engine, WorkerState.capture(step, data.position(), device), plan.identity, log, d.zero_stage, rank,
        metrics, final)
    stopped_early = False
    if step == 0 and plan.init_weights:  # fine-tuning: where the loaded model stands before its first step
        validate_start(plan, stage, engine, val, log, clock.record(fpt), device)
    engine.train()
    norms: list[float] = []  # the global gradient norm of each step since the last log line
    while step < t.max_steps:
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio, t.schedule)
        last = optimizer_step(engine, stage, data, t.grad_accum, lr)
        norms.append(grad_norm(engine))
        step += 1
        clock.add(stage.tokens_per_batch * world * t.grad_accum)
        trace.stepped(step, data)
        if step % t.log_every == 0 or step == t.max_steps:
            with eager(d):
                val_m = stage.validate(eval_model(engine, d.zero_stage, stage.build, device), val)
            rec = {"step": step, **last, "lr": lr, **grad_summary(norms, t.grad_clip), **val_m, **clock.record(fpt)}
            norms.clear()
            if device.type == "cuda":  # to check docs/CLUSTER.md's memory formula against the real peak
                rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            if log is not None:
                log.log(rec)
                progress(f"[{plan.kind}] step {step}/{t.max_steps} {stage.describe(rec)}")
            if stopped_early := budget_reached(t, clock.t_start, step, device, rank, plan.kind):
                break
            if step % t.checkpoint_every == 0 and step < t.max_steps:
                report({**rec, "final": False}, final=False)
            elif plan.report_every_log and step < t.max_steps:  # a sweep: metrics only (every rank: a collective)
                ray.train.report({**rec, "final": False})
    final = dict(log.records[-1]) if log and log.records else {}
    report({**final, "step": step, "final": True, "stopped_early": stopped_early, "num_workers": world,
            "num_nodes": num_nodes, "flops_per_token": fpt}, final=True)
    if log is not None:
        log.close()
