"""What a resume restores, without Ray: the data stream's position (to the batch), the RNG states,
a restore that refuses an incomplete checkpoint, and DeepSpeed files read with weights_only=True.
The end-to-end proof (a run killed after a checkpoint, then rerun) is in tests/test_stage2.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calm_core.errors import ArtifactError, DataError
from pipelines.train.checkpoints import DS_TAG, META, WorkerState, restore_checkpoint, save_checkpoint, worker_file
from pipelines.train.stream import BatchStream, StreamPosition, batch_digest


class Shard:
    """Ray Data's ``iter_torch_batches`` over rows 0..n-1 (an "id" column, offset by ``base``): the
    local shuffle a permutation drawn from the seed, as Ray's is for a fixed block sequence."""

    def __init__(self, n: int, base: int = 0):
        self.n, self.base, self.calls = n, base, []

    def iter_torch_batches(self, batch_size, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        assert drop_last
        self.calls.append(local_shuffle_seed)
        order = np.random.default_rng(local_shuffle_seed).permutation(self.n) + self.base
        for i in range(0, self.n - batch_size + 1, batch_size):
            yield {"id": torch.from_numpy(order[i : i + batch_size].copy())}


def _ids(stream, steps: int) -> list[list[int]]:
    return [next(stream)["id"].tolist() for _ in range(steps)]


def test_a_stream_resumed_from_any_position_continues_the_uninterrupted_one(capsys):
    # 10 rows in batches of 3: 3 batches per epoch (the last row dropped), 12 steps span 4 epochs
    full = _ids(BatchStream(Shard(10), 3, 4, seed=7, too_small="x"), 12)
    assert full[0] != full[3]  # each epoch is reshuffled (seed + epoch)
    for cut in range(12):
        first = BatchStream(Shard(10), 3, 4, seed=7, too_small="x")
        head = _ids(first, cut)
        pos = first.position()
        assert pos == StreamPosition(cut and (cut - 1) // 3, cut and (cut - 1) % 3 + 1,
                                     batch_digest({"id": torch.tensor(head[-1])}) if cut else "")
        shard = Shard(10)
        tail = _ids(BatchStream(shard, 3, 4, seed=7, too_small="x", start=pos), 12 - cut)
        assert head + tail == full, cut
        assert shard.calls[0] == 7 + pos.epoch  # the checkpoint's epoch, with its seed
    assert "warning" not in capsys.readouterr().out


def test_a_stream_says_so_when_the_shard_is_not_the_one_it_left(capsys):
    first = BatchStream(Shard(10), 3, 4, seed=7, too_small="x")
    _ids(first, 2)
    other = BatchStream(Shard(10, base=100), 3, 4, seed=7, too_small="x", start=first.position())
    next(other)
    out = capsys.readouterr().out
    assert "warning" in out and "batch 2 of epoch 0" in out


def test_a_shard_without_one_batch_is_a_data_error():
    with pytest.raises(DataError, match="too small"):
        next(BatchStream(Shard(2), 3, 4, seed=0, too_small="too small"))


def test_worker_state_restores_the_random_stream():
    torch.manual_seed(3)
    torch.rand(5)
    state = WorkerState.capture(4, StreamPosition(1, 2, "ab"), torch.device("cpu"))
    want = torch.rand(7)
    torch.manual_seed(99)
    back = WorkerState.from_json(state.to_json())
    assert back == state
    back.restore_rng(torch.device("cpu"))
    assert torch.equal(torch.rand(7), want)


# ------------------------------------------------------------------ restore_checkpoint, no DeepSpeed


class FakeCheckpoint:
    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class FakeEngine:
    def __init__(self, result):
        self.result, self.loaded = result, False

    def load_checkpoint(self, d, tag, load_optimizer_states, load_lr_scheduler_states):
        assert tag == DS_TAG and load_optimizer_states
        self.loaded = True
        return self.result


def _checkpoint(tmp_path: Path, step: int = 3, ranks=(0, 1)) -> FakeCheckpoint:
    (tmp_path / META).write_text(json.dumps({"step": step, "identity": {"a": 1}, "records": []}))
    for r in ranks:
        state = WorkerState(step, StreamPosition(0, step, "d"), {"cpu": ""})
        (tmp_path / worker_file(r)).write_text(state.to_json())
    return FakeCheckpoint(tmp_path)


class SavingEngine(FakeEngine):
    """DeepSpeed's side of a checkpoint: writes its client state, loads it back."""

    def save_checkpoint(self, folder, tag, client_state):
        (Path(folder) / tag).mkdir(exist_ok=True)
        (Path(folder) / tag / "client.json").write_text(json.dumps(client_state))

    def load_checkpoint(self, d, tag, load_optimizer_states, load_lr_scheduler_states):
        return str(Path(d) / tag), json.loads((Path(d) / tag / "client.json").read_text())


def test_each_rank_restores_its_own_position_and_random_state_after_a_restart(tmp_path):
    """Two ranks on shards of their own, each checkpointed through ``save_checkpoint`` at another
    position of its stream (epoch 1 batch 2, epoch 2 batch 1) and RNG state, into one folder as Ray
    Train merges them; after the restart each rank's ``restore_checkpoint`` gives it back its own
    position and RNG state: its next batches and noise are those its uninterrupted run would have
    drawn. (A rank the checkpoint has no record of is refused: the test after the next.)"""
    step, identity = 4, {"a": 1}
    shards = {0: lambda: Shard(10), 1: lambda: Shard(13, base=100)}  # 3 and 4 batches of 3 per epoch
    seeds = {0: 7, 1: 8}
    uninterrupted = {}
    for rank in (0, 1):
        torch.manual_seed(10 + rank)
        stream = BatchStream(shards[rank](), 3, 4, seed=seeds[rank], too_small="x")
        _ids(stream, (5, 9)[rank])  # consumed before the checkpoint
        pos = stream.position()
        state = WorkerState.capture(step, pos, torch.device("cpu"))
        save_checkpoint(SavingEngine(None), tmp_path, state, {"identity": identity, "records": []}, rank)
        uninterrupted[rank] = (pos, _ids(stream, 4), torch.rand(3))
    positions = {r: uninterrupted[r][0] for r in (0, 1)}
    assert positions[0] != positions[1] and positions[0].epoch != positions[1].epoch

    torch.manual_seed(99)  # the restarted process: another random state
    for rank in (1, 0):
        meta, state = restore_checkpoint(SavingEngine(None), FakeCheckpoint(tmp_path), identity, rank=rank)
        assert meta["step"] == state.step == step and state.position == positions[rank], rank
        stream = BatchStream(shards[rank](), 3, 4, seed=seeds[rank], too_small="x", start=state.position)
        state.restore_rng(torch.device("cpu"))
        _, batches, noise = uninterrupted[rank]
        assert _ids(stream, 4) == batches, rank
        assert torch.equal(torch.rand(3), noise), rank


@pytest.mark.parametrize("case, result, match", [
    ("no DeepSpeed state", (None, None), "holds no DeepSpeed state"),
    ("no client step", ("p", {"other": 1}), "client state has no step"),
    ("another step", ("p", {"step": 6}), "disagrees with itself"),
])
def test_restore_refuses_a_checkpoint_missing_what_it_resumes(tmp_path, case, result, match):
    ck = _checkpoint(tmp_path)
    with pytest.raises(ArtifactError, match=match) as e:
        restore_checkpoint(FakeEngine(result), ck, {"a": 1}, rank=0)
    assert str(tmp_path) in str(e.value), case  # names the checkpoint


def test_restore_refuses_a_checkpoint_without_the_ranks_position(tmp_path):
    engine = FakeEngine(("p", {"step": 3}))
    with pytest.raises(ArtifactError, match=f"{worker_file(1)}.*rank 1") as e:
        restore_checkpoint(engine, _checkpoint(tmp_path, ranks=(0,)), {"a": 1}, rank=1)
    assert str(tmp_path) in str(e.value) and not engine.loaded
    with pytest.raises(ArtifactError, match="different run"):
        restore_checkpoint(engine, _checkpoint(tmp_path), {"a": 2}, rank=0)


# ------------------------------------------------------------------ DeepSpeed files, weights_only


class Planted:
    """Unpickling this writes a file: what arbitrary code in a checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipelines.train.safe_load import SafeCheckpointEngine

    engine = SafeCheckpointEngine(None)
    # what a ZeRO optimizer partition holds (records found in real checkpoints of ZeRO 0-3)
    good = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                     "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                     "single_partition_of_fp32_groups": [torch.ones(4)]}, "ds_version": "0.19.8"}
    torch.save(good, tmp_path / "good.pt")
    back = engine.load(str(tmp_path / "good.pt"), map_location="cpu")
    sd = back["optimizer_state_dict"]
    assert sd["zero_stage"] is ZeroStageEnum.gradients and sd["loss_scaler"].cur_scale == 1.0
    assert sd["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)

    marker = tmp_path / "pwned"
    torch.save({**good, "extra": Planted(marker)}, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="bad.pt.*weights_only=True"):
        engine.load(str(tmp_path / "bad.pt"), map_location="cpu")
    assert not marker.exists()


ENGINE_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from calm_core.config import load_config
from calm_core.errors import ArtifactError
from pipelines.train.checkpoints import DS_TAG
from pipelines.train.worker import make_engine

folder, marker, planted = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = load_config("debug", ["distributed.zero_stage=2"])

def engine():
    torch.manual_seed(0)
    return make_engine(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), cfg.stage1, cfg.distributed)

e = engine()
e.backward(e(torch.randn(16, 4)).sum())
e.step()
e.save_checkpoint(str(folder), tag=DS_TAG, client_state={"step": 1})
out = {"engine": type(e.checkpoint_engine).__name__, "files": sorted(p.name for p in (folder / DS_TAG).iterdir())}
path, client = engine().load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True)
out["clean"] = client["step"]
target = folder / DS_TAG / planted
sd = e.checkpoint_engine.load(str(target), map_location="cpu")
sd["extra"] = PLANTED
torch.save(sd, target)
try:
    engine().load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True)
    out["planted"] = "loaded"
except ArtifactError as err:
    out["planted"] = str(err)
out["marker"] = os.path.exists(marker)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_the_training_engine_refuses_a_checkpoint_holding_a_pickled_object(tmp_path, planted):
    """The engine training builds (``worker.make_engine``, ZeRO-2) loads its own checkpoint through
    the weights_only engine, and refuses one whose model states or optimizer partition hold a
    pickled object, without running it (DeepSpeed in a one-rank subprocess: no Ray, ~10 s)."""
    import subprocess
    import sys

    from pipelines.ray_env import free_port

    marker = tmp_path / "pwned"
    code = ("class Planted:\n    def __reduce__(self):\n        return (open, (sys.argv[2], 'w'))\n"
            "PLANTED = Planted()\n")
    script = ENGINE_SCRIPT.replace("e = engine()", code + "e = engine()", 1)
    env = {**__import__("os").environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ck"), str(marker), planted],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["engine"] == "SafeCheckpointEngine" and planted in out["files"] and out["clean"] == 1
    assert planted in out["planted"] and "weights_only=True" in out["planted"], out["planted"]
    assert out["marker"] is False and not marker.exists()
