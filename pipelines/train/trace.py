"""A debug record of what every training step read and produced, and a worker crash on cue: how
tests prove that a resumed run continues the interrupted one exactly (tests/test_stage2.py).

    CALM_TRAIN_TRACE=DIR       every rank appends one JSON line per step to DIR/rank<r>.jsonl: the
                               step, its data position and batch digest, and a digest of the weights
                               after the step; at a resume rank 0 writes the weights it loaded to
                               DIR/resumed_step<s>.safetensors
    CALM_TRAIN_KILL_AFTER=N    every rank SIGKILLs itself after step N (a lost node), once Ray Train's
                               controller has taken the rank's last report (``settle``)

Both are read on the workers (``worker.worker_env`` passes them on from the driver's environment);
unset, nothing is computed or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from calm_core.checkpoint import save_weights
from pipelines.train.stream import BatchStream

TRACE_ENV, KILL_ENV = "CALM_TRAIN_TRACE", "CALM_TRAIN_KILL_AFTER"
SETTLE_S = 2.0  # after the controller took the last report: time to register its checkpoint


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Trace:
    """One rank's trace; ``weights()`` gives the consolidated weights (a collective under ZeRO-3,
    called on every rank alike)."""

    def __init__(self, rank: int, weights: Callable[[], dict[str, torch.Tensor]]):
        self.rank, self.weights = rank, weights
        self.dir = Path(os.environ[TRACE_ENV]) if os.environ.get(TRACE_ENV) else None
        self.kill_after = int(os.environ.get(KILL_ENV) or 0)
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def resumed(self, state) -> None:
        """After a restore (``state``: the rank's ``checkpoints.WorkerState``; None on a fresh run)."""
        if self.dir and state is not None:
            weights = self.weights()
            if self.rank == 0:
                save_weights(weights, self.dir / f"resumed_step{state.step}.safetensors")

    def stepped(self, step: int, data: BatchStream) -> None:
        if self.dir:
            position = data.position()
            rec = {"step": step, "epoch": position.epoch, "batches": position.batches, "batch": position.last,
                   "weights": weights_digest(self.weights())}
            with open(self.dir / f"rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.kill_after and step == self.kill_after:
            settle()
            os.kill(os.getpid(), signal.SIGKILL)


def settle() -> None:
    """Wait until Ray Train's controller has taken this rank's last report, then ``SETTLE_S``: a kill
    before it (the controller polls every 2 s) would lose a checkpoint ``ray.train.report`` already
    returned from. Ray 2.60 keeps the reports in a queue of one that the poll empties (an internal
    API: without it, a fixed pause)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().get_result_queue()
    except (ImportError, AttributeError):
        queue = None
    deadline = time.monotonic() + (60.0 if queue is not None else 3 * SETTLE_S)
    # not ``queue.join()``: a controller that never polls again would hold this rank (and a test) forever
    while time.monotonic() < deadline and (queue is None or queue.unfinished_tasks):
        time.sleep(0.05)
    time.sleep(SETTLE_S)
