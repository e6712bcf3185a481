"""DeepSpeed checkpoint files read without unpickling arbitrary objects.

DeepSpeed 0.19.8 saves its checkpoints with ``torch.save`` and reads them back with
``torch.load(weights_only=False)`` (``TorchCheckpointEngine.load``): a checkpoint folder someone
else could write to (shared storage, a bucket, a copied run) could run code on every training
worker. ``install(engine)`` swaps the engine's checkpoint engine for ``SafeCheckpointEngine``,
whose ``load`` is ``torch.load(weights_only=True)`` with, as the only non-tensor classes allowed,
the three DeepSpeed records its ZeRO checkpoints hold (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints of ZeRO 0-3, fp32 and
bf16): the loss scaler, the ZeRO stage enum and the address of a parameter's fragment. Every
DeepSpeed read on our path (``engine.load_checkpoint`` of the model states and of the ZeRO
optimizer partitions) goes through ``engine.checkpoint_engine.load``. Anything else in a file is an
``ArtifactError`` naming the file, never an unpickled object.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from calm_core.errors import ArtifactError, ConfigError

DEEPSPEED_RECORDS = [LossScaler, ZeroStageEnum, fragment_address]  # plain-data classes in ZeRO checkpoints


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine (same files on save) reading with ``weights_only=True``."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_RECORDS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0])
            raise ArtifactError(f"checkpoint file '{path}' holds objects other than tensors and DeepSpeed's "
                                f"records; torch.load(weights_only=True) refuses it ({why[:200]}); checkpoint "
                                "files are never unpickled beyond that: use a new --run or --overwrite") from None


def install(engine) -> None:
    """Make ``engine`` read its checkpoints with ``SafeCheckpointEngine`` (refusing a DeepSpeed
    config that chose another checkpoint engine, whose reads this would not cover)."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ConfigError(f"DeepSpeed chose the checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                            "this pipeline reads checkpoints only through its weights_only torch engine")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
