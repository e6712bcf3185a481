"""Pieces every Ray Train + DeepSpeed stage shares: the DeepSpeed config, worker set-up, collective
sums, consolidated weights under any ZeRO stage, checkpoint save/restore, and the metrics log.

Conventions (PIPELINE.md): ``deepspeed.initialize`` runs inside the train function; every rank saves
its DeepSpeed shard into a local folder and reports it through ``ray.train.report`` (Ray Train
merges the ranks' files into one checkpoint directory); ``report`` is called the same number of
times on every rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from calm_core.config import DistributedConfig
from calm_core.errors import ArtifactError, CalmError, DataError

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every reported checkpoint
META = "meta.json"  # rank 0's record of the step, the run identity and the metrics so far


# ----------------------------------------------------------------------------- resolution


def resolve_precision(d: DistributedConfig) -> str:
    if d.precision != "auto":
        return d.precision
    return "bf16" if d.use_gpu else "fp32"


def resolve_backend(d: DistributedConfig) -> str:
    if d.backend != "auto":
        return d.backend
    return "nccl" if d.use_gpu else "gloo"


def worker_env(d: DistributedConfig) -> dict[str, str]:
    """Environment for the training workers (RunConfig.worker_runtime_env)."""
    threads = str(max(1, int(d.cpus_per_worker)))
    env = {
        "OMP_NUM_THREADS": threads,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        # Ray Train's print patch tees every print twice to the driver when stdout is wrapped
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not d.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def deepspeed_config(batch_size: int, grad_clip: float, zero_stage: int, precision: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # a client torch.optim.AdamW: no JIT-compiled DeepSpeed optimizer op needed
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return cfg


def setup_worker(d: DistributedConfig) -> torch.device:
    import logging
    import warnings

    # DeepSpeed 0.19.8 calls torch's deprecated all_gather_into_tensor at every ZeRO step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    # Ray Train 2.60 logs every report's full metrics dict from every rank (a logger named after
    # its source file); our progress line says it once
    try:
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    if d.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Sum every tensor over all ranks (one flattened collective)."""
    import torch.distributed as dist

    keys = sorted(values)
    flat = [values[k].detach().double().reshape(-1).to(device) for k in keys]
    sizes = [t.numel() for t in flat]
    buf = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(buf)
    out, i = {}, 0
    for k, n in zip(keys, sizes):
        out[k] = buf[i : i + n].cpu().reshape(values[k].shape)
        i += n
    return out


def count_nodes() -> int:
    """How many distinct Ray nodes the ranks of this worker group run on (a collective)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop together)."""
    t = all_reduce_sum({"f": torch.tensor([1.0 if flag else 0.0])}, device)["f"]
    return bool(t.item() > 0)


def budget_reached(t, t_start: float, step: int, device: torch.device, rank: int, name: str) -> bool:
    """True on every rank when any rank has spent ``t.max_minutes`` since ``t_start`` and the run
    is not at its last step anyway (rank 0 says so); a collective: call it on every rank."""
    over = t.max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= t.max_minutes
    if not any_rank(over, device) or step >= t.max_steps:
        return False
    if rank == 0:
        progress(f"[{name}] wall-clock budget of {t.max_minutes} min reached at step {step}")
    return True


# ----------------------------------------------------------------------------- weights


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


# ----------------------------------------------------------------------------- checkpoints


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


def diff_identity(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts) if parts else "none"


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """Rank 0's metrics: kept in memory (travels in checkpoints), appended live to a JSONL file and,
    when tensorboardX is installed, to TensorBoard event files."""

    def __init__(self, records: list[dict], live_path: str | None, tb_dir: str | None):
        self.records = list(records)
        self.live_path = Path(live_path) if live_path else None
        if self.live_path:
            self.live_path.parent.mkdir(parents=True, exist_ok=True)
            # rewrite: a resumed run drops lines logged after its checkpoint
            self.live_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.tb = None
        if tb_dir:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(tb_dir)
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.live_path:
            with self.live_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()


class Throughput:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.items = 0

    def add(self, n: int) -> None:
        self.items += n

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.items / dt if dt > 0 else 0.0

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.items = 0


# ----------------------------------------------------------------------------- the final artifact


def publish_trained(run, artifact: str, kind: str, result, config_yaml: str, tok, inputs: dict[str, Any],
                    load_model, extra: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Turn the last Ray Train checkpoint into RUN/<artifact>: model.safetensors (consolidated by
    rank 0 in the final report), config.yaml, tokenizer.json, metrics.jsonl and a manifest (written
    last) whose metrics are the last logged record plus the step and how the run ended.
    ``load_model(folder)`` must load the weights with plain PyTorch (it proves they do)."""
    import tempfile

    from calm_core.checkpoint import write_manifest

    with result.checkpoint.as_directory() as ck, tempfile.TemporaryDirectory() as tmp:
        ck, out = Path(ck), Path(tmp)
        meta = json.loads((ck / META).read_text())
        if not (ck / "model.safetensors").is_file():
            raise ArtifactError(f"the last checkpoint '{result.checkpoint.path}' holds no consolidated weights")
        (out / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes())
        (out / "config.yaml").write_text(config_yaml)
        tok.save(out)
        records = meta.get("records", [])
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        final = dict(records[-1]) if records else {}
        final["step"] = meta["step"]
        final["stopped_early"] = bool(result.metrics.get("stopped_early", False))
        for key in ("num_workers", "num_nodes"):
            if key in result.metrics:
                final[key] = result.metrics[key]
        model = load_model(out)
        manifest = write_manifest(out, kind, inputs=inputs, metrics=final,
                                  extra={"parameters": sum(p.numel() for p in model.parameters()), **extra})
        uri = run.publish_artifact(out, artifact)
    return manifest, uri


# ----------------------------------------------------------------------------- running a stage


def fit(train_fn, loop_config: dict[str, Any], d: DistributedConfig, run, name: str, datasets: dict):
    """TorchTrainer over ``train_fn`` with the layout of ``d``, checkpoints in RUN/_train/<name>
    (a deterministic name: rerunning resumes). Returns the Result; a user error raised inside a
    worker comes back as itself."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=resolve_backend(d)),
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker={"CPU": d.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=run.uri("_train"),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(d)},
        ),
        datasets=datasets,
    )
    progress(f"[{name}] Ray Train: {d.num_workers} workers x {d.cpus_per_worker} CPU, "
             f"{'GPU' if d.use_gpu else 'CPU'}, DeepSpeed ZeRO-{d.zero_stage}, {resolve_precision(d)}")
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        raise unwrap_training_error(e) from None
    if result.checkpoint is None:
        raise ArtifactError(f"{name} finished without a checkpoint; see the worker logs above")
    return result


def unwrap_training_error(e: Exception) -> Exception:
    """Bring a CalmError raised inside a worker back as itself (a one-line message for the user)."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, CalmError):
            return cur
        for attr in ("worker_failures", "errors"):
            inner = getattr(cur, attr, None)
            if isinstance(inner, dict):
                for v in inner.values():
                    found = unwrap_training_error(v)
                    if isinstance(found, CalmError):
                        return found
        cur = cur.__cause__ or cur.__context__
    text = str(e)
    for line in text.splitlines()[::-1]:
        for cls in (ArtifactError, DataError):
            tag = f"{cls.__name__}: "
            if tag in line:
                return cls(line.split(tag, 1)[1])
    return e




# ----------------------------------------------------------------------------- worker-loop pieces


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


def epoch_batches(shard, batch_size: int, shuffle_buffer: int, seed: int, too_small: str):
    """Endless batches of a Ray Train dataset shard, reshuffled locally each epoch; ``too_small``
    is the DataError message when the shard cannot fill one batch."""
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                          local_shuffle_buffer_size=shuffle_buffer or None,
                                          local_shuffle_seed=seed + epoch):
            n += 1
            yield b
        if n == 0:
            raise DataError(too_small)
        epoch += 1


def eval_model(engine, zero_stage: int, build, device: torch.device):
    """The model to validate: the engine's module, or under ZeRO-3 (whose parameters are partitioned
    outside the module's own forward) a whole copy, built by ``build()``, gathered from the shards."""
    if zero_stage < 3:
        return engine.module
    copy = build()
    copy.load_state_dict(full_state_dict(engine, zero_stage))
    return copy.to(device)


def compile_step(engine, d: DistributedConfig) -> None:
    """``distributed.compile``: torch.compile the model's forward through DeepSpeed (``engine.compile``,
    the module keeps its parameter names). Measured on one H200 at d = 768, 12 layers, 2048 tokens:
    eager bf16 16-18% MFU, compiled 26% (CALM) and 36% (the baseline). Validation runs eager
    (``eager``): its shapes and seeded generators differ from the training step's."""
    if d.compile:
        engine.compile()


def eager(d: DistributedConfig):
    """A context in which a compiled module runs its plain eager forward."""
    return torch.compiler.set_stance("force_eager") if d.compile else contextlib.nullcontext()


def save_and_report(engine, step: int, identity: dict[str, Any], log, zero_stage: int, rank: int,
                    metrics: dict[str, Any], final: bool) -> None:
    """Every rank saves its DeepSpeed shard and calls ray.train.report with it; the final report
    also carries rank 0's consolidated model.safetensors."""
    import tempfile

    import ray.train

    from calm_core.checkpoint import save_weights

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_checkpoint(engine, folder, step, {"identity": identity, "records": log.records if log else []}, rank)
        state = full_state_dict(engine, zero_stage) if final else None  # a collective under ZeRO-3
        if final and rank == 0:
            save_weights(state, folder / "model.safetensors", {"format": "pt"})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
