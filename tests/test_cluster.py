"""The cluster files: every launcher YAML validates against the schema that ships inside the ray
package; the KubeRay manifests parse and carry what KubeRay requires; the RayService's Serve config
validates against Ray Serve's deploy schema; what they run exists in the project. And Ray's own door
is locked: token authentication wherever Ray starts, the dashboard (which runs submitted jobs) on
loopback unless an operator needs it, no secret in a runtime_env (tests/test_cluster_jobs.py checks
a token head for real)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted((ROOT / "cluster").glob("cluster-*.yaml"))
KUBERAY = ROOT / "cluster" / "kuberay"
CLUSTER_FILES = sorted(p for p in (ROOT / "cluster").rglob("*") if p.is_file())
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


# what each of Ray's node providers reads from ``provider`` beyond the schema (which requires only
# "type"): ray/autoscaler/_private/aws/node_provider.py (region), gcp/node_provider.py (project_id,
# availability_zone), local/config.py (head_ip, worker_ips)
PROVIDER_KEYS = {"aws": {"region"}, "gcp": {"region", "project_id", "availability_zone"},
                 "local": {"head_ip", "worker_ips"}}
# GPUs of the machine types the launchers name, from the clouds' own specifications
MACHINE_GPUS = {"m6i.2xlarge": 0, "g5.12xlarge": 4, "n2-standard-8": 0, "a2-highgpu-1g": 1}
# the environment every node's `ray start` needs: what the jobs give a Ray they start themselves
# (pipelines.ray_env), for the settings that live in the Ray processes rather than in the driver
NODE_ENV = ("RAY_AUTH_MODE", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS")


def test_the_launchers_for_aws_gcp_and_on_prem_carry_what_their_provider_and_the_jobs_need():
    """One launcher per provider, each with the provider keys its node provider reads; every node type
    declares the GPUs its machine type has; workers join the head on the port the head starts on; every
    `ray start` sets the node environment the jobs set for their own Ray; and the GPU launchers install
    the CUDA build of the torch that pyproject.toml pins before the project (docs/CLUSTER.md)."""
    from pipelines.ray_env import RAY_ENVIRONMENT

    launchers = {yaml.safe_load(p.read_text())["provider"]["type"]: yaml.safe_load(p.read_text()) for p in LAUNCHERS}
    assert sorted(launchers) == ["aws", "gcp", "local"] and len(LAUNCHERS) == 3
    torch_pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    for kind, cfg in launchers.items():
        assert PROVIDER_KEYS[kind] <= set(cfg["provider"]), (kind, PROVIDER_KEYS[kind] - set(cfg["provider"]))
        nodes = cfg.get("available_node_types", {})
        for name, node in nodes.items():
            conf = node["node_config"]
            machine = conf.get("InstanceType") or conf.get("machineType")
            assert node["resources"].get("GPU", 0) == MACHINE_GPUS[machine], (kind, name, machine)
            assert node.get("min_workers", 0) <= node.get("max_workers", cfg["max_workers"]) <= cfg["max_workers"]
        if nodes:
            assert nodes[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0, kind  # no training on the head
        if kind == "local":
            assert 1 <= cfg["max_workers"] <= len(cfg["provider"]["worker_ips"])  # Ray caps it at the hosts listed
        (head,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
        (worker,) = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
        port = re.search(r"--port=(\d+)", head).group(1)
        assert re.search(r"--address=\$RAY_HEAD_IP:(\d+)", worker).group(1) == port, kind
        for cmd in (head, worker):
            env = dict(w.split("=", 1) for w in shlex.split(cmd.split("ray start")[0]) if "=" in w)
            assert {k: env.get(k) for k in NODE_ENV} == {k: RAY_ENVIRONMENT[k] for k in NODE_ENV}, (kind, cmd)
        if any(n["resources"].get("GPU") for n in nodes.values()):
            setup = cfg["setup_commands"]
            cuda = [i for i, c in enumerate(setup) if f"pip install {torch_pin} --index-url" in c and "/whl/cu" in c]
            project = [i for i, c in enumerate(setup) if "pip install -e ~/calm-on-ray" in c]
            assert cuda and project and cuda[0] < project[0], (kind, setup)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path):
    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, ray_schema())
    setup = " ".join(cfg.get("setup_commands", []))
    assert "pip install" in setup and "-e ~/calm-on-ray" in setup  # the project and its pins, not a hand list
    assert cfg["file_mounts"]["~/calm-on-ray"] == "."
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), starts
    (head,) = [c for c in starts if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head.split(), head  # reached through `ray dashboard` (SSH)
    # the token: one file from the machine that runs `ray up`, synced to the head and, by the head's
    # autoscaler, to every worker before its start command; Ray's own default path on each node
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in cfg["setup_commands"]
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
    # the operator makes the token and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN in every Ray container,
    # unless a container sets them itself
    assert spec["authOptions"] == {"mode": "token"}
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
        env = {e["name"] for c in pod["template"]["spec"]["containers"] for e in c.get("env", [])}
        assert not env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, env


def test_kuberay_manifests_carry_the_required_fields():
    (rc,) = _docs("raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(rc["spec"])
    (job,) = _docs("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[0] == "python" and (ROOT / entry[1]).is_file()  # a job script of this project
    assert "RAY_AUTH_MODE" not in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]  # the cluster's mode
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
    env = " ".join(line for line in text.replace("\\\n", " ").splitlines() if line.startswith("ENV "))
    assert "RAY_AUTH_MODE=token" in env.split(), env


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: str(p.relative_to(ROOT / "cluster")))
def test_no_cluster_file_turns_authentication_off(path):
    """Every way Ray starts here (launchers, KubeRay, the image, the local script) uses token mode;
    the word is banned outright so that no comment offers the insecure setting either."""
    text = path.read_text()
    assert "disabled" not in text
    assert set(re.findall(r"RAY_AUTH_MODE[=:]\s*(\w+)", text)) <= {"token"}


def test_the_dashboard_listens_on_loopback_unless_an_operator_needs_it():
    """Port 8265 runs whatever is submitted to it. Launchers and the local script: loopback (SSH
    tunnel, `kubectl port-forward`). RayJob and RayService: the KubeRay operator (and the RayJob's
    submitter pod) reach it through the head Service, so the pod's address, with the token required."""
    hosts = {}
    for path in [*LAUNCHERS, ROOT / "cluster" / "local-2cpu.sh"]:
        hosts[path.name] = re.findall(r"--dashboard-host[= ](\S+)", path.read_text())
    hosts["raycluster.yaml"] = [_docs("raycluster.yaml")[0]["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"]]
    for name, hs in hosts.items():
        assert hs == ["127.0.0.1"], (name, hs)
    (job,), (svc,) = _docs("rayjob.yaml"), _docs("rayservice.yaml")
    for spec in (job["spec"]["rayClusterSpec"], svc["spec"]["rayClusterConfig"]):
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        assert spec["authOptions"]["mode"] == "token"  # the only condition on which it may listen there


def _runtime_envs() -> list[tuple[str, dict]]:
    """Every runtime_env the cluster files give Ray: the job one, the RayJob's, and those of the
    Serve configs' applications and deployments."""
    envs = [("runtime_env.yaml", yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text()))]
    (job,) = _docs("rayjob.yaml")
    envs.append(("rayjob.yaml", yaml.safe_load(job["spec"]["runtimeEnvYAML"])))
    (svc,) = _docs("rayservice.yaml")
    serve_configs = [("rayservice.yaml", yaml.safe_load(svc["spec"]["serveConfigV2"])),
                     ("serve.yaml", yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text()))]
    for name, cfg in serve_configs:
        for app in cfg["applications"]:
            envs.append((name, app.get("runtime_env") or {}))
            for d in app.get("deployments", []):
                envs.append((name, d.get("ray_actor_options", {}).get("runtime_env") or {}))
    return envs


def test_no_secret_travels_in_a_runtime_env():
    """The Jobs and Serve REST APIs return runtime_envs to whoever reads them: no API key, token or
    password among their env_vars (the serving key comes from a file, serve.api_key_file)."""
    envs = _runtime_envs()
    assert len(envs) >= 4
    for name, env in envs:
        names = set((env or {}).get("env_vars", {}))
        assert not {n for n in names if SECRET_NAME.search(n)}, (name, names)
    for path in CLUSTER_FILES:
        assert "CALM_API_KEY" not in path.read_text(), path  # nor as a container's env


def test_the_rayservice_reads_its_api_key_from_a_mounted_secret_on_every_pod():
    (svc,) = _docs("rayservice.yaml")
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    key_file = Path(app["args"]["serve.api_key_file"])
    spec = svc["spec"]["rayClusterConfig"]
    for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # an ingress replica may run on any
        volumes = {v["name"]: v for v in pod["template"]["spec"]["volumes"]}
        (mount,) = [m for c in pod["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])
                    if m["mountPath"] == str(key_file.parent)]
        assert mount.get("readOnly") is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] and not secret.get("optional")  # no Secret, no pod: never an open API
        assert [i["path"] for i in secret["items"]] == [key_file.name]


def test_the_local_script_starts_ray_with_a_token_made_once_and_private(tmp_path):
    """`cluster/local-2cpu.sh start` with a stand-in `ray start` (this machine's real Ray clusters
    stay untouched): token mode even when the caller exported disabled, the token made at
    ~/.ray/auth_token by Ray's own `ray get-auth-token --generate`, readable by its owner only, and
    the same token kept on a second start."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    real_ray = Path(sys.executable).parent / "ray"
    (bin_dir / "ray").write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == start ]]; then echo "$RAY_AUTH_MODE $*" >> "{tmp_path}/starts"; exit 0; fi\n'
        f'exec "{real_ray}" "$@"\n')
    (bin_dir / "ray").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="disabled")
    tokens = []
    for _ in range(2):
        subprocess.run(["bash", str(ROOT / "cluster" / "local-2cpu.sh"), "start"], env=env, check=True, timeout=120)
        token_file = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        tokens.append(token_file.read_text())
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 32
    starts = (tmp_path / "starts").read_text().splitlines()
    assert len(starts) == 2 and all(s.startswith("token start --head ") for s in starts), starts
    # its dashboard agent on a port of its own, not Ray's default that another Ray may hold
    ports = [re.search(r"--dashboard-agent-listen-port=(\d+)", s) for s in starts]
    assert all(ports) and all(0 < int(p.group(1)) < 65536 for p in ports), starts
