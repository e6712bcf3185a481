"""Stage 1 and the latent precompute on a two-node Ray cluster started on this machine
(ray.cluster_utils.Cluster): the two Ray Train workers cannot fit on one node, so the DeepSpeed
process group really spans nodes; nor can the two encoder actors, so the precompute places one on
each node, and its rows are those of the same precompute on one node."""

import shutil

import pytest
from conftest import _start_ray, assert_same_latent_rows, latent_rows
from ray.util.state import list_actors

from calm_core.autoencoder import load_autoencoder_dir
from calm_core.config import load_config
from pipelines.data.precompute import precompute_latents
from pipelines.ray_env import free_port, state_api_at
from pipelines.storage import RunDir
from pipelines.train.stage1 import run_stage1

pytestmark = pytest.mark.slow


@pytest.fixture
def corpus(tmp_path, tiny_corpus_text):
    """Ten times the tiny corpus (600 documents)."""
    p = tmp_path / "corpus.txt"
    p.write_text(tiny_corpus_text * 10)
    return p


def test_stage1_and_the_latents_spread_over_two_nodes(corpus, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared test cluster; the next test that needs it starts it again
    # the dashboard serves the State API, which says on which node each encoder actor ran
    port = free_port()
    cluster = Cluster()
    try:
        with state_api_at(port):  # both nodes' processes poll the State API of this cluster (pipelines.ray_env)
            cluster.add_node(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # 0.75 CPU per worker on 1-CPU nodes: one worker per node; 0.25 left on each for Ray Data
        cfg = load_config("debug", ["distributed.cpus_per_worker=0.75", "stage1.max_steps=3"])
        m = run_stage1(cfg, str(corpus), RunDir(str(tmp_path / "run")))
        assert m["metrics"]["num_workers"] == 2 and m["metrics"]["num_nodes"] == 2
        assert m["metrics"]["step"] == 3
        load_autoencoder_dir(tmp_path / "run" / "ae")

        # 0.75 CPU per encoder actor: one per node; the tokenising tasks take the 0.25 left
        lat = load_config("debug", ["latents.num_actors=2", "latents.cpus_per_actor=0.75", "latents.batch_size=32"])
        spread = precompute_latents(lat, str(corpus), RunDir(str(tmp_path / "run")))
        encoders = list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(EncodeChunks))")], detail=True)
        assert len({a.node_id for a in encoders}) == 2, [(a.node_id, a.state) for a in encoders]
        # which of them encodes is Ray Data's choice: a small corpus is a block or two, and in both
        # full-suite runs one actor took them all (the precompute does not repartition)
    finally:
        ray.shutdown()
        cluster.shutdown()
    # the same precompute on one node (the shared test cluster) gives the same rows
    one = tmp_path / "one"
    one.mkdir()
    for a in ("tokenizer", "ae"):
        shutil.copytree(tmp_path / "run" / a, one / a)
    _start_ray()
    alone = precompute_latents(lat, str(corpus), RunDir(str(one)))
    assert alone["metrics"]["rows"] == spread["metrics"]["rows"]
    assert_same_latent_rows(latent_rows(RunDir(str(tmp_path / "run")), spread), latent_rows(RunDir(str(one)), alone))
