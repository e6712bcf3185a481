"""Starting or joining Ray the same way from every job, with the environment its processes need.

``ray_environment`` sets (unless already set) what every Ray process of a job needs, before the job
imports ``ray`` or starts it: ``RAY_AUTH_MODE=token`` (a job's own local Ray listens on every
interface; with a token, Ray makes ``~/.ray/auth_token`` and nobody else can submit to it; the test
suite sets ``disabled``), usage stats off (they would try to reach the network), Ray Train V2, and
Ray Serve's throughput-optimised mode (user code on the replica's main event loop, gRPC between
replicas: +22% tokens/s served at 32 concurrent requests on 2 CPUs, docs/BENCHMARKS.md) without its
direct ingress (which opens an HTTP port per ingress replica for an HAProxy front; here the one
proxy stays the entry point). These reach the Ray processes a job starts itself; a cluster started
with ``ray start`` sets them there (cluster/). Nothing sets them by being imported: a command that
never starts Ray (``jobs/official.py import``) leaves its environment alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from collections.abc import Iterator

from calm_core.config import RayConfig


RAY_ENVIRONMENT = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1",
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def ray_environment() -> None:
    """Set what every Ray process of a job needs (the module docstring), keeping values already set;
    call it before ``ray`` is imported."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a server started next: Serve's proxy, a test's Ray head)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a
    ``ray start`` cluster on this machine), or start a private local Ray with ``cfg.num_cpus`` CPUs."""
    ray_environment()
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # joining: resources belong to the cluster, never pass them
    else:
        start_local_ray(cfg.num_cpus or None, cfg.object_store_memory_mb * 1024 * 1024)
    quiet_ray_data()


def start_local_ray(num_cpus: int | None, object_store_memory: int, attempts: int = 3) -> None:
    """``ray.init(address="local")``: a private Ray on this machine, with its dashboard (the process
    that serves Ray's State API, which Ray Train polls) on a free port of 127.0.0.1, and every
    process of it told where that is (``state_api_at``).

    The port is chosen before Ray binds it, so something may take it in between: Ray's own processes
    bind ports the kernel hands out while it starts (once a job failed at its start, "Failed to bind
    to 127.0.0.1:44863 because it's already occupied", when a port chosen the same way was handed to
    one of them). So the port comes from outside the kernel's ephemeral range and Ray's worker ports
    (``dashboard_port``), and if it is taken all the same Ray is stopped and started again on another
    one (``attempts`` in all)."""
    ray_environment()
    import ray

    for attempt in range(1, attempts + 1):
        port = dashboard_port()
        try:
            with state_api_at(port):
                ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                         include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
            return
        except ValueError:
            taken = not is_free(port)
            ray.shutdown()
            if not taken or attempt == attempts:
                raise
            logging.getLogger(__name__).warning("port %d was taken while Ray started; starting it on another", port)


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


RAY_WORKER_PORTS = (10002, 19999)  # Ray's default min/max_worker_port


def dashboard_port(host: str = "127.0.0.1") -> int:
    """A free port that neither the kernel (its ephemeral range, which Ray's processes get their ports
    from) nor Ray (its worker ports) hands out: between the two, else any free port."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    for port in random.sample(range(RAY_WORKER_PORTS[1] + 1, low), k=min(64, max(0, low - RAY_WORKER_PORTS[1] - 1))):
        if is_free(port, host):
            return port
    return free_port(host)


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
