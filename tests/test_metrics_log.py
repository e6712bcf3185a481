"""Rank 0's metrics log: the live JSONL file and the TensorBoard events (tensorboardX, the
`tensorboard` extra), read back with the event file's own record format."""

import json
import struct

import pytest

from pipelines.train.metrics import MetricsLog


def read_scalars(path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event file: records of
    [u64 length][u32 crc][event proto][u32 crc], the event a tensorboardX protobuf."""
    from tensorboardX.proto import event_pb2

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        out += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value]
    return out


def test_jsonl_and_tensorboard_events_hold_every_number(tmp_path):
    pytest.importorskip("tensorboardX")
    log = MetricsLog([{"step": 0, "loss": 9.0}], str(tmp_path / "stage1.metrics.jsonl"), str(tmp_path / "tb"))
    log.log({"step": 1, "loss": 2.5, "lr": 1e-3, "note": "text is not a scalar"})
    log.log({"step": 2, "loss": 2.25})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "stage1.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2] and lines[1]["note"] == "text is not a scalar"
    (events,) = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    got = sorted((t, s, round(v, 6)) for t, s, v in read_scalars(events))
    assert got == [("loss", 1, 2.5), ("loss", 2, 2.25), ("lr", 1, 0.001)]  # the records logged here, not step 0's


def test_without_tensorboardx_the_log_says_so_and_keeps_the_jsonl(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_tbx(name, *a, **k):
        if name.startswith("tensorboardX"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tbx)
    log = MetricsLog([], str(tmp_path / "m.jsonl"), str(tmp_path / "tb"))
    log.log({"step": 1, "loss": 1.0})
    log.close()
    assert "calm-on-ray[tensorboard]" in capsys.readouterr().out
    assert not (tmp_path / "tb").exists() and (tmp_path / "m.jsonl").read_text().count("\n") == 1
