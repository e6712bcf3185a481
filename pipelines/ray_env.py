"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from calm_core.config import RayConfig


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a server started next: Serve's proxy, a test's Ray head)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a
    ``ray start`` cluster on this machine), or start a private local Ray with ``cfg.num_cpus`` CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # joining: resources belong to the cluster, never pass them
    else:
        start_local_ray(cfg.num_cpus or None, cfg.object_store_memory_mb * 1024 * 1024)
    quiet_ray_data()


def start_local_ray(num_cpus: int | None, object_store_memory: int) -> None:
    """``ray.init(address="local")``: a private Ray on this machine, with its dashboard (the process
    that serves Ray's State API, which Ray Train polls) on a free port of 127.0.0.1, and every
    process of it told where that is (``state_api_at``)."""
    import ray

    port = free_port()
    with state_api_at(port):
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)


@contextlib.contextmanager
def state_api_at(dashboard_port: int) -> Iterator[None]:
    """Ray processes started inside (a raylet, and so every worker it starts later) look up Ray's
    State API at this machine's ``dashboard_port``, not at the cluster Ray would guess.

    Ray Train's PlacementGroupCleaner actor (every ``TorchTrainer.fit``) polls the State API, which
    without an address finds the cluster named in /tmp/ray/ray_current_cluster: the last
    ``ray start`` on the machine, not a private ``ray.init`` Ray, and maybe long gone. Each poll
    then waits 40 s for that GCS, and each training run ends 12 s late, after logging a
    GetTimeoutError traceback (measured: a 6-step debug stage 1 on 2 workers took 40 s, 32 s with this).
    The driver's own environment is left as it was."""
    key = "RAY_API_SERVER_ADDRESS"
    before = os.environ.get(key)
    os.environ[key] = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def quiet_ray_data() -> None:
    """Ray Data without progress bars in this process (the driver's, or a sweep trial's actor)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the jobs print their own progress lines
    ctx.print_on_execution_start = False
    # ... and Ray Data says once per process, at WARNING, that the bars are off and how to turn them
    # on: not a problem to warn about here (the same line from Ray Train's SplitCoordinator actor
    # remains; docs/INSTALL.md "Messages from Ray")
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
