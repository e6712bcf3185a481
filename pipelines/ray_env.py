"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import logging
import os
import socket

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
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus or None,
            object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
            # the dashboard process serves Ray's State API, which Ray Train's controller polls
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )
    quiet_ray_data()


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
