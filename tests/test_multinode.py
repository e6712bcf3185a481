"""Stage 1 on a two-node Ray cluster started on this machine (ray.cluster_utils.Cluster): the two
Ray Train workers cannot fit on one node, so the DeepSpeed process group really spans nodes."""

import pytest

from calm_core.autoencoder import load_autoencoder_dir
from calm_core.config import load_config
from pipelines.train.stage1 import run_stage1
from pipelines.storage import RunDir

pytestmark = pytest.mark.slow


def test_stage1_spreads_over_two_nodes(tiny_corpus, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared test cluster; the next test that needs it starts it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # 0.75 CPU per worker on 1-CPU nodes: one worker per node; 0.25 left on each for Ray Data
        cfg = load_config("debug", ["distributed.cpus_per_worker=0.75", "stage1.max_steps=3"])
        m = run_stage1(cfg, str(tiny_corpus), RunDir(str(tmp_path / "run")))
        assert m["metrics"]["num_workers"] == 2 and m["metrics"]["num_nodes"] == 2
        assert m["metrics"]["step"] == 3
        load_autoencoder_dir(tmp_path / "run" / "ae")
    finally:
        ray.shutdown()
        cluster.shutdown()
