"""Progress lines for the user: one flushed line per event, the same on the driver and in workers."""

from __future__ import annotations

import sys


def progress(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()
