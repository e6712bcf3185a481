"""One worker's training batches, endless and resumable to the batch.

Each rank reads its shard of the training dataset (Ray Train's ``streaming_split`` of one
materialised dataset) epoch after epoch, shuffled locally with seed ``seed + epoch``. Where a
rank stands is a ``StreamPosition``: the epoch, the batches of it already consumed, and a digest
of the last one. A checkpoint records every rank's position; a resumed rank starts that epoch with
the same seed and reads past the consumed batches, so its next batch is the one the interrupted
run would have read next. The digest of the last batch passed over must equal the recorded one; if
it does not (the dataset was cut into other blocks, e.g. on a cluster of another size), the rank
says so and goes on from the same position of the new order.

Why the order is reproducible (Ray 2.60; docs/TRAINING.md, proved by tests/test_stage2.py):
the training dataset is materialised with ``preserve_order`` (its blocks in corpus order, not in
task completion order: without it two materialisations of the same data differed), Ray Train
splits it with ``preserve_order`` (``trainer.ordered_split``: blocks go to the rank with the fewest rows, in
block order, instead of by locality), and ``iter_torch_batches`` with a fixed
``local_shuffle_seed`` over the same block sequence gives the same batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from calm_core.errors import DataError
from pipelines.progress import progress


def shuffle_order(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random sort key for each training block from its ``key`` (its first chunk's document
    and position; pipelines.data.latents.LatentBlocks): splitmix64 of key + seed. Sorting by it puts
    the blocks of the whole corpus in one random order that depends only on the blocks and the seed,
    not on how Ray Data cut them into tasks: the same on every run, so a resumed run finds its place."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)  # non-negative: Ray Data sorts it as a plain int64 column


def corpus_shuffled(blocks, seed: int, cpus: float, num_blocks: int):
    """``blocks`` (a Ray Dataset with a ``key`` column) in the seeded corpus-level order of
    ``shuffle_order`` (``<stage>.shuffle=corpus``): training blocks stream in corpus order otherwise,
    so consecutive steps see one or two books through the local buffer. The result comes in
    ``num_blocks`` Ray Data blocks cut at fixed values of the order (it is uniform on [0, 2^63)), not
    at the boundaries Ray Data's sort would sample at random: Ray Train's ordered split hands blocks
    to ranks by their sizes, so each rank's stream is then the same on every run (measured before:
    two CALM runs of identical settings differed from the first validation on)."""
    def add_order(batch: dict) -> dict:
        return {**batch, "_order": shuffle_order(np.asarray(batch["key"]), seed)}

    cuts = [int(i * (2**63 // num_blocks)) for i in range(1, max(1, num_blocks))]
    return (blocks.map_batches(add_order, batch_format="numpy", num_cpus=cpus)
            .sort("_order", boundaries=cuts).drop_columns(["_order"]))


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's data stream stands: after ``batches`` batches of epoch ``epoch``."""

    epoch: int = 0
    batches: int = 0  # batches of ``epoch`` consumed
    last: str = ""  # batch_digest of the last consumed batch ("" before the first)


def batch_digest(batch: dict[str, torch.Tensor]) -> str:
    """A short digest of a batch: its column names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k in sorted(batch):
        t = batch[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class BatchStream:
    """Endless batches of ``shard`` (a Ray Train dataset shard, or anything with Ray Data's
    ``iter_torch_batches``) from ``start`` on; ``position()`` says where it stands."""

    def __init__(self, shard, batch_size: int, shuffle_buffer: int, seed: int, too_small: str,
                 start: StreamPosition = StreamPosition(), label: str = "train"):
        self.shard, self.batch_size, self.shuffle_buffer, self.seed = shard, batch_size, shuffle_buffer, seed
        self.too_small, self.label = too_small, label
        self._epoch, self._batches, self._last, self._last_digest = start.epoch, start.batches, None, start.last
        self._it = self._run(start)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._it)

    def position(self) -> StreamPosition:
        """The position after the last batch handed out (its digest computed here, not per step)."""
        if self._last is not None:
            self._last_digest, self._last = batch_digest(self._last), None
        return StreamPosition(self._epoch, self._batches, self._last_digest)

    def _epoch_batches(self, epoch: int):
        return self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True,
                                             local_shuffle_buffer_size=self.shuffle_buffer or None,
                                             local_shuffle_seed=self.seed + epoch)

    def _run(self, start: StreamPosition):
        epoch, skip = start.epoch, start.batches
        while True:
            n = 0
            for b in self._epoch_batches(epoch):
                n += 1
                if n < skip:
                    continue  # consumed before the checkpoint
                if n == skip:
                    self._check_landing(b, start)
                    continue
                self._epoch, self._batches, self._last = epoch, n, b
                yield b
            if n == 0:
                raise DataError(self.too_small)
            if n < skip:
                progress(f"[{self.label}] warning: epoch {epoch} of this rank's shard has {n} batches, but the "
                         f"checkpoint had consumed {skip}: the shard differs from the interrupted run's")
            epoch, skip = epoch + 1, 0

    def _check_landing(self, batch: dict[str, torch.Tensor], start: StreamPosition) -> None:
        if start.last and batch_digest(batch) != start.last:
            progress(f"[{self.label}] warning: batch {start.batches} of epoch {start.epoch} of this rank's shard is "
                     "not the one the interrupted run consumed there (its dataset was cut into other blocks?); "
                     "training goes on from the same position of this order")
