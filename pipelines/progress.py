"""Progress lines for the user: one flushed line per event, the same on the driver and in workers;
and ``timed``, the one wall-clock measure the benchmarks and the sweep's speed probe share."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable


def progress(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """The median wall time in seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
