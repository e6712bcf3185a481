"""How the jobs start a local Ray (pipelines.ray_env), on the shared test cluster, which is started the
same way: every worker finds the State API of its own cluster (Ray Train's PlacementGroupCleaner
polls it; guessing, it would follow /tmp/ray/ray_current_cluster to the last `ray start` on the
machine), and the driver's environment is left as it was."""

import os


def test_workers_find_the_state_api_of_their_own_cluster(ray_session):
    import ray

    from pipelines.ray_env import state_api_at

    @ray.remote(num_cpus=0)
    class Marker:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    def from_a_worker() -> tuple[str, list[str]]:
        from ray.util.state import list_actors

        mine = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], timeout=30)]
        return os.environ.get("RAY_API_SERVER_ADDRESS", ""), mine

    from ray.util.state import list_nodes

    marker = Marker.remote()
    assert ray.get(marker.ping.remote()) == 1
    address, alive = ray.get(from_a_worker.remote())
    assert address.startswith("http://127.0.0.1:"), address
    # the address names this cluster's State API (its nodes, by id), and it is what the worker's calls reach
    assert {n.node_id for n in list_nodes(address=address, timeout=30)} == {n["NodeID"] for n in ray.nodes()}
    assert any(name.endswith(".Marker") for name in alive), alive
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the driver's environment as it was
    ray.kill(marker)

    os.environ["RAY_API_SERVER_ADDRESS"] = "http://elsewhere:1"  # a user's own setting survives
    try:
        with state_api_at(1234):
            assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1234"
        assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://elsewhere:1"
    finally:
        del os.environ["RAY_API_SERVER_ADDRESS"]


def test_importing_the_package_leaves_the_environment_alone():
    """Ray's environment is set where a job starts Ray (pipelines.ray_env), not by an import: a command
    that never starts Ray (jobs/official.py import) runs with the environment it was given."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DS_"))}
    code = ("import json, os; before = dict(os.environ); import pipelines, pipelines.official, pipelines.ray_env; "
            "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {}


def test_a_dashboard_port_taken_before_ray_binds_it_does_not_fail_the_start():
    """The port chosen for a job's private Ray is taken by someone else before Ray binds it (what Ray's
    own processes once did to a job): Ray starts all the same, on another port. Chosen ports lie
    outside the kernel's ephemeral range and Ray's worker ports."""
    import subprocess
    import sys
    from pathlib import Path

    from pipelines.ray_env import RAY_WORKER_PORTS, dashboard_port

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert all(RAY_WORKER_PORTS[1] < dashboard_port() < low for _ in range(20))
    code = """
import socket
import ray
import pipelines.ray_env as R
held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
first = held.getsockname()[1]
chosen, ports = R.dashboard_port, []
def taken_first(host="127.0.0.1"):  # the first port offered is the one someone holds
    ports.append(first if not ports else chosen(host))
    return ports[-1]
R.dashboard_port = taken_first
R.start_local_ray(1, 80 * 2**20)
from ray.util.state import list_nodes
there = {n.node_id for n in list_nodes(address=f"http://127.0.0.1:{ports[-1]}", timeout=30)}
print("started", len(ports), ports[-1] != first, there == {n["NodeID"] for n in ray.nodes()})
ray.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "started 2 True True"  # on a second port, where its State API answers
