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

    marker = Marker.remote()
    assert ray.get(marker.ping.remote()) == 1
    address, alive = ray.get(from_a_worker.remote())
    assert address == "http://" + ray._private.worker.get_dashboard_url()
    assert any(name.endswith(".Marker") for name in alive), alive  # the State API a worker reaches is this cluster's
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the driver's environment as it was
    ray.kill(marker)

    os.environ["RAY_API_SERVER_ADDRESS"] = "http://elsewhere:1"  # a user's own setting survives
    try:
        with state_api_at(1234):
            assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1234"
        assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://elsewhere:1"
    finally:
        del os.environ["RAY_API_SERVER_ADDRESS"]
