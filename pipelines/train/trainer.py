"""Running a stage on Ray Train from the driver: the TorchTrainer over the shared loop, user errors
brought back from the workers, and the last checkpoint published as the stage's artifact."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from calm_core.artifacts import write_trained
from calm_core.errors import ArtifactError, CalmError
from pipelines.progress import progress
from pipelines.storage import RunDir
from pipelines.train.checkpoints import META
from pipelines.train.loop import TrainPlan, run_worker
from pipelines.train.worker import resolve_backend, resolve_precision, worker_env


def fit(stage_cls: type, plan: TrainPlan, run: RunDir, datasets: dict, callbacks: list | None = None):
    """TorchTrainer over the shared loop (``run_worker(stage_cls, plan)``) with the layout of
    ``distributed``, checkpoints in RUN/_train/<section> (a fixed name: rerunning resumes). Returns
    the Result; a user error raised inside a worker comes back as itself. ``callbacks``: Ray Train
    callbacks (a sweep trial's TuneReportCallback)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    d, name = plan.config.distributed, plan.section
    trainer = TorchTrainer(
        functools.partial(run_worker, stage_cls, plan),
        torch_config=TorchConfig(backend=resolve_backend(d)),
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker={"CPU": d.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=run.uri("_train"),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(d)},
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=ordered_split(),
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


def ordered_split():
    """Ray Train's DataConfig with ``preserve_order``: each rank's shard of a materialised dataset is
    then the same blocks in the same order on every run (blocks go to the rank with the fewest rows,
    in block order; by default they follow locality and timing), which a resumed run's data position
    relies on (``stream.BatchStream``). Costs the split's locality on multi-node clusters."""
    import copy

    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    # Ray Train's default_ingest_options() with preserve_order, built without touching the deprecated
    # exclude_resources (reading it back into a new ExecutionOptions is what warns)
    ctx = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=copy.deepcopy(ctx.resource_limits), preserve_order=True,
                               verbose_progress=ctx.verbose_progress)
    return DataConfig(execution_options=options)


def unwrap_training_error(e: Exception) -> Exception:
    """Bring a CalmError raised inside a worker back as itself (a one-line message for the user)."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, CalmError):
            return cur
        for attr in ("worker_failures", "errors"):  # Ray Train: {rank: the worker's exception}
            inner = getattr(cur, attr, None)
            if isinstance(inner, dict):
                for v in inner.values():
                    found = unwrap_training_error(v)
                    if isinstance(found, CalmError):
                        return found
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__  # RayTaskError.cause
    return e


def publish_trained(run: RunDir, artifact: str, plan: TrainPlan, result, tok, inputs: dict[str, Any],
                    extra: dict[str, Any], load: Callable[[Path], torch.nn.Module]) -> tuple[dict[str, Any], str]:
    """Turn the last Ray Train checkpoint into RUN/<artifact> (``calm_core.artifacts.write_trained``):
    the weights rank 0 consolidated in the final report, the metric records it carried, and as
    final metrics the last record plus the step and how the run ended."""
    with result.checkpoint.as_directory() as ck, tempfile.TemporaryDirectory() as tmp:
        ck = Path(ck)
        if not (ck / "model.safetensors").is_file():
            raise ArtifactError(f"the last checkpoint '{result.checkpoint.path}' holds no consolidated weights")
        meta = json.loads((ck / META).read_text())
        records = meta.get("records", [])
        final = {**(records[-1] if records else {}), "step": meta["step"],
                 "stopped_early": bool(result.metrics.get("stopped_early", False))}
        final.update({k: result.metrics[k] for k in ("num_workers", "num_nodes") if k in result.metrics})
        manifest = write_trained(tmp, artifact, ck / "model.safetensors",
                                 plan.config, tok, records, final, inputs, {**extra, "identity": plan.identity}, load)
        uri = run.publish_artifact(tmp, artifact)
    return manifest, uri
