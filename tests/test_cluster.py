"""The cluster files: every launcher YAML validates against the schema that ships inside the ray
package; the KubeRay manifests parse and carry what KubeRay requires; the RayService's Serve config
validates against Ray Serve's deploy schema; what they run exists in the project."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted((ROOT / "cluster").glob("cluster-*.yaml"))
KUBERAY = ROOT / "cluster" / "kuberay"


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_there_are_launchers_for_aws_gcp_and_on_prem():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHERS}
    assert providers == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path):
    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, ray_schema())
    setup = " ".join(cfg.get("setup_commands", []))
    assert "pip install" in setup and "-e ~/calm-on-ray" in setup  # the project and its pins, not a hand list
    assert cfg["file_mounts"]["~/calm-on-ray"] == "."
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=disabled" in c for c in starts if "ray start" in c)
    for node in cfg.get("available_node_types", {}).values():
        if node["resources"].get("GPU"):
            assert node.get("max_workers", 0) >= 1


def test_a_launcher_missing_node_resources_is_caught_by_the_check():
    cfg = yaml.safe_load(LAUNCHERS[0].read_text())
    del next(iter(cfg["available_node_types"].values()))["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(cfg, ray_schema())


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    workers = spec["workerGroupSpecs"]
    assert workers and all({"groupName", "rayStartParams", "template"} <= set(w) for w in workers)
    assert all(w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)
    gpu = [w for w in workers if "nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "a GPU worker group"
    for pod in [head, *workers]:
        mounts = {m["mountPath"] for c in pod["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/shared" in mounts  # the run directory every pod writes


def test_kuberay_manifests_carry_the_required_fields():
    (rc,) = _docs("raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(rc["spec"])
    (job,) = _docs("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[0] == "python" and (ROOT / entry[1]).is_file()  # a job script of this project
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["RAY_AUTH_MODE"] == "disabled"
    (svc,) = _docs("rayservice.yaml")
    assert svc["kind"] == "RayService"
    _check_cluster_spec(svc["spec"]["rayClusterConfig"])
    (pvc,) = _docs("shared-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


def test_the_rayservice_serve_config_validates_and_names_the_app_builder():
    from ray.serve.schema import ServeDeploySchema

    from calm_core.config import load_config

    (svc,) = _docs("rayservice.yaml")
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(cfg)
    (app,) = cfg["applications"]
    assert app["import_path"] == "pipelines.serve.app:build_app"
    args = dict(app["args"])
    run, config = args.pop("run"), args.pop("config")
    assert run.startswith("/shared/")
    load_config(config, [f"{k}={v}" for k, v in args.items()])  # every serve.* override is a real, valid key


def test_the_image_installs_the_project():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "pip install --no-cache-dir -e ." in text
    for part in ("calm_core", "pipelines", "jobs", "pyproject.toml"):
        assert part in text
