"""Rank 0's metrics log (memory, a live JSONL file, TensorBoard when tensorboardX is installed) and
the clock of a run (tokens seen, tokens/s, elapsed time)."""

from __future__ import annotations

import json
import time
from pathlib import Path


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
            except ImportError:
                print("[metrics] no TensorBoard events: tensorboardX is not installed "
                      "(pip install 'calm-on-ray[tensorboard]'); the JSONL log is written", flush=True)
            else:
                self.tb = SummaryWriter(tb_dir)

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


class Clock:
    """Tokens seen (continued across a resume), tokens/s since the last record, time since the start."""

    def __init__(self, tokens_seen: int = 0):
        self.t_start = self.t_mark = time.perf_counter()
        self.tokens_seen, self.since_mark = tokens_seen, 0

    def add(self, tokens: int) -> None:
        self.tokens_seen += tokens
        self.since_mark += tokens

    def record(self, flops_per_token: float) -> dict[str, float]:
        """The clock's fields of a metrics record; starts the next tokens/s interval."""
        now = time.perf_counter()
        dt = now - self.t_mark
        rec = {"tokens_per_s": self.since_mark / dt if dt > 0 else 0.0, "tokens_seen": self.tokens_seen,
               "train_flops": self.tokens_seen * flops_per_token, "elapsed_s": now - self.t_start}
        self.t_mark, self.since_mark = now, 0
        return rec
