"""The chain as a submitted job on a real `ray start --head` cluster, as a cluster user runs it:

- `ray job submit --working-dir . -- python jobs/run_all.py --config debug ...` runs tokenizer ->
  stage 1 -> report -> latents -> CALM -> evaluation on the held-out documents -> a
  sample, while this test kills by PID a stage-1 training worker, an encoder actor of
  the latent precompute and a stage-2 training worker: the job still succeeds, each training stage
  says it resumed from its last checkpoint and ends at its full step count, and the latents equal a
  clean precompute, every chunk exactly once;
- a second submission of the same command skips every stage;
- `ray job stop` during stage 1 leaves every artifact complete or absent;
- a sweep (jobs/sweep.py) stopped mid-way continues when submitted again;
- on a head with token authentication (as every cluster of cluster/ runs), a job submitted with the
  token and cluster/runtime_env.yaml joins the cluster from inside, and a submission without the
  token, with a wrong one, or from a client left in disabled mode (it sends none) is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import assert_same_latent_rows, latent_rows, stop_group

from pipelines.ray_env import free_port
from pipelines.storage import RunDir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtual environment's ray and python
ARTIFACTS = ("tokenizer", "ae", "latents", "calm", "eval/heldout")
OVERRIDES = ["distributed.max_failures=1", "stage1.max_steps=15", "stage2.max_steps=15",
             "latents.shard_documents=50", "eval.sweep_every=1", "eval.temperatures=[1.0,0.5]"]
TRAIN_WORKER = "ray::RayTrainWorker"
ENCODER = "ray::MapWorker(MapBatches(EncodeChunks))"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` with a dashboard (the job server) on 2 CPUs; stopped at the end by
    signalling the blocking `ray start` (which takes down what it started, nothing else)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the shared test cluster; the next test that needs it starts it again
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log_path = tmp_path_factory.mktemp("head") / "ray-start.log"
    log = open(log_path, "w")  # noqa: SIM115 (the head's output for as long as the module runs)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--object-store-memory=1000000000", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", *_own_ports(), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while _job_cli(address, "list").returncode != 0:
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # its raylet takes ~30 s to leave after SIGTERM (measured): SIGKILL to the group after 10 s
        stop_group(proc, signal.SIGTERM, grace_s=10)
        log.close()


def _own_ports() -> list[str]:
    """`ray start` flags giving a head's agents free ports of their own: on Ray's default ports, a
    second Ray on the machine (a user's, or a job's private one) keeps this head's dashboard agent
    from starting, and every `ray job submit` then fails with "No available agent to submit job"
    (seen when a sweep ran beside the suite)."""
    return [f"--{flag}={free_port()}" for flag in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                    "dashboard-agent-grpc-port", "metrics-export-port",
                                                    "runtime-env-agent-port")]


def _job_cli(address: str, command: str, *args: str, timeout: float = 120, env: dict | None = None):
    """`ray job COMMAND --address ADDRESS ARGS...` (the address before any `-- entrypoint`)."""
    return subprocess.run([str(BIN / "ray"), "job", command, "--address", address, *args], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def token_head():
    """A `ray start --head --block` with RAY_AUTH_MODE=token, walled off from this machine's other
    Ray clusters (which run with auth disabled) and from the user's own token: HOME, the temp dir
    (short: it holds Unix sockets) and every port are its own, so `ray get-auth-token --generate`
    writes HOME/.ray/auth_token, Ray's default path, as cluster/local-2cpu.sh does. Stopped by
    signalling its process group, never `ray stop` (which stops every Ray of the user)."""
    root = Path(tempfile.mkdtemp(prefix="calm-auth-", dir="/tmp"))
    home, no_token_home = root / "home", root / "no-token-home"
    home.mkdir()
    no_token_home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    env = {**base, "RAY_AUTH_MODE": "token"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=120)
    gcs, dash = free_port(), free_port()
    ports = _own_ports()
    log_path = root / "ray-start.log"
    log = open(log_path, "w")  # noqa: SIM115 (the head's output for as long as the test runs)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
         "--object-store-memory=100000000", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", *ports, f"--temp-dir={root / 'ray'}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while _job_cli(address, "list", env=env).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        yield {"address": address, "env": env, "base_env": base, "no_token_home": str(no_token_home),
               "token": (home / ".ray" / "auth_token").read_text()}
    finally:
        # its raylet takes ~30 s to leave after SIGTERM (measured); all it started is in the group,
        # and its files are in root
        stop_group(proc, signal.SIGTERM, grace_s=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_token_head_runs_a_job_with_its_token_and_refuses_one_without(token_head):
    from ray.job_submission import JobSubmissionClient

    address = token_head["address"]
    join = ("import os; from pipelines.ray_env import ray_environment; ray_environment(); import ray; ray.init(); "
            "print('joined', os.environ['RAY_AUTH_MODE'], ray.get(ray.remote(lambda: 42).remote()))")
    ok = _job_cli(address, "submit", "--submission-id", "with-token", "--runtime-env", "cluster/runtime_env.yaml",
                  "--", "python", "-c", join, env=token_head["env"])
    # the driver inherits the cluster's mode and token, and its task runs on a worker that authenticated
    assert ok.returncode == 0 and "joined token 42" in ok.stdout, (ok.stdout + ok.stderr)[-3000:]

    refused = {
        "no token": {**token_head["base_env"], "RAY_AUTH_MODE": "token", "HOME": token_head["no_token_home"]},
        "a wrong token": {**token_head["env"], "RAY_AUTH_TOKEN": "0" * 32},
        "a client in disabled mode": {**token_head["env"], "RAY_AUTH_MODE": "disabled"},  # sends no token
    }
    for i, (what, env) in enumerate(refused.items()):
        r = _job_cli(address, "submit", "--submission-id", f"refused-{i}", "--", "python", "-c", "print(1)", env=env)
        assert r.returncode != 0 and "AuthenticationError" in r.stderr, (what, (r.stdout + r.stderr)[-2000:])
    with pytest.raises(urllib.error.HTTPError) as raw:  # the HTTP API itself, no Ray client in between
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
    assert raw.value.code == 401

    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token_head['token']}"})
    assert [j.submission_id for j in client.list_jobs()] == ["with-token"]  # nothing refused ever ran


def _submit(head, job_id: str, run: Path, corpus: Path, *extra: str, wait: bool = True):
    """`ray job submit --working-dir . -- python jobs/run_all.py ...` from the repository root."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", job_id,
           "--working-dir", ".", *([] if wait else ["--no-wait"]), "--",
           "python", "jobs/run_all.py", "--config", "debug", "--corpus", str(corpus), "--run", str(run),
           *OVERRIDES, *extra]  # the baseline's part of the chain: tests/test_packaging.py
    return subprocess.run(cmd, check=False, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=1500)


def _status(head, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(head["address"]).get_job_status(job_id).value)


def _corpus(tmp_path: Path, n_docs: int = 400) -> Path:
    import random

    rng = random.Random(1)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "big", "small", "red", "blue", "happy", "sad", "and", "then", "it", "was"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))).capitalize() + "." for _ in range(n_docs)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return corpus


def _titled(title: str):
    """The processes running now whose title (first word of the command line) starts with ``title``."""
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [""])[0].startswith(title):
            yield p


class Killer(threading.Thread):
    """Kills, one after the other, a process whose title starts with ``title`` once ``ready()``
    holds: [(what, ready, title), ...]. ``killed`` lists (what, pid) in order."""

    def __init__(self, plan):
        super().__init__(daemon=True)
        self.plan, self.killed, self.stop = list(plan), [], threading.Event()

    def run(self):
        for what, ready, title in self.plan:
            while not self.stop.is_set():
                pid = ready() and next((p.pid for p in _titled(title)), None)
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append((what, pid))
                        break
                    except ProcessLookupError:
                        pass  # it ended between the listing and the kill: take the next one
                time.sleep(0.05)


def _checkpointed(run: Path, section: str):
    """True once Ray Train has registered a checkpoint of the stage (its snapshot lists one): a worker
    killed before that restarts from step 0, since a report counts only when every rank has made it."""
    def ready() -> bool:
        try:
            snap = json.loads((run / "_train" / section / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):  # not there yet, or being written
            return False
        return bool(snap.get("checkpoint_results"))
    return ready


def _freeze(title: str) -> list:
    """SIGSTOP every process whose title starts with ``title`` (a training worker): a stop sent next
    then lands part-way whatever the machine's speed (a debug step takes milliseconds, `ray job stop`
    seconds). Ray Train waits 10 minutes on a worker that does not answer its health check, so no
    new worker takes over in the meantime. -> the frozen processes ([] if none is running)."""
    frozen = []
    for p in _titled(title):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.suspend()
            frozen.append(p)
    return frozen


@contextlib.contextmanager
def _killed_after(frozen: list):
    """Whatever happens inside, SIGKILL the frozen processes at the end: never SIGCONT, a resumed
    worker would go on training after its job stopped."""
    try:
        yield
    finally:
        for p in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _assert_complete_or_absent(run: Path):
    for name in ARTIFACTS:
        a = run / name
        assert not a.exists() or (a / "manifest.json").is_file() or name == "latents", f"{a} is half-written"
    # latents in progress are committed shards without a manifest: readers refuse them until complete
    leftovers = [p.name for p in run.rglob(".*tmp-*")]
    assert not leftovers, leftovers


def test_submitted_chain_survives_killed_workers_and_a_resubmission_skips(head, tmp_path):
    corpus, run = _corpus(tmp_path), tmp_path / "run"
    killer = Killer([
        ("stage-1 worker", _checkpointed(run, "stage1"), TRAIN_WORKER),
        ("encoder actor", lambda: (run / "latents" / "train" / "shard-00000.json").is_file(), ENCODER),
        ("stage-2 worker", _checkpointed(run, "stage2"), TRAIN_WORKER),
    ])
    killer.start()
    try:
        first = _submit(head, "chain-1", run, corpus)
    finally:
        killer.stop.set()
    out = first.stdout + first.stderr
    (tmp_path.parent / "chain-1.log").write_text(out)  # for a failing run's reader
    assert first.returncode == 0 and _status(head, "chain-1") == "SUCCEEDED", out[-4000:]
    assert [w for w, _ in killer.killed] == ["stage-1 worker", "encoder actor", "stage-2 worker"], killer.killed

    # each training stage came back from a checkpoint after its worker died, and finished its steps
    for kind, label in (("stage1", "ae"), ("calm", "calm")):
        resumed = [int(s) for s in re.findall(rf"\[{kind}\] resumed from step (\d+)", out)]
        assert len(resumed) == 1 and 0 < resumed[0] < 15, (kind, resumed, out[-4000:])
        m = RunDir(str(run)).read_json(label, "manifest.json")
        assert m["metrics"]["step"] == 15, m["metrics"]
        steps = [json.loads(line)["step"] for line in (run / label / "metrics.jsonl").read_text().splitlines()]
        assert steps == [3, 6, 9, 12, 15], steps  # the log continues from the checkpoint: no step twice
    for artifact in ARTIFACTS:
        assert (run / artifact / "manifest.json").is_file(), artifact
    assert "[run_all] evaluation on the held-out documents" in out and "BrierLM" in out
    table = out.split("[run_all] evaluation on the held-out documents", 1)[1]
    assert "calm" in table
    assert (run / "eval" / "heldout" / "temperature.png").is_file()
    assert "[run_all] a sample (temperature 0.5" in out

    # the latents equal a clean precompute with the same AE: every chunk exactly once
    import ray

    from calm_core.config import load_config
    from pipelines.data.precompute import precompute_latents

    clean = tmp_path / "clean"
    clean.mkdir()
    for a in ("tokenizer", "ae"):
        shutil.copytree(run / a, clean / a)
    ray.init(address=head["gcs"])
    try:
        precompute_latents(load_config("debug", OVERRIDES), str(corpus), RunDir(str(clean)))
    finally:
        ray.shutdown()
    assert_same_latent_rows(latent_rows(RunDir(str(run))), latent_rows(RunDir(str(clean))))

    second = _submit(head, "chain-2", run, corpus)
    log = second.stdout + second.stderr
    assert second.returncode == 0 and _status(head, "chain-2") == "SUCCEEDED", log[-4000:]
    for what in ("ae", "latents", "calm", "eval/heldout"):
        assert f"{run / what} is complete" in log, what
    assert "step 3/" not in log  # nothing trained again


def test_job_stop_leaves_every_artifact_complete_or_absent(head, tmp_path):
    corpus, run = _corpus(tmp_path, 200), tmp_path / "run"
    sub = _submit(head, "stopped", run, corpus, "stage1.max_steps=300", wait=False)  # stopped long before its end
    assert sub.returncode == 0, sub.stderr[-3000:]
    deadline, frozen = time.time() + 600, []
    while not frozen:  # stage 1 is training and checkpointing: its workers are held there
        assert time.time() < deadline and _status(head, "stopped") in ("PENDING", "RUNNING"), \
            _job_cli(head["address"], "logs", "stopped").stdout[-3000:]
        frozen = _checkpointed(run, "stage1")() and _freeze(TRAIN_WORKER)
        time.sleep(0.05)
    with _killed_after(frozen):
        stop = _job_cli(head["address"], "stop", "stopped")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        while _status(head, "stopped") not in ("STOPPED", "FAILED", "SUCCEEDED"):
            assert time.time() < deadline
            time.sleep(0.5)
    assert _status(head, "stopped") == "STOPPED"
    assert (run / "tokenizer" / "manifest.json").is_file()
    assert not (run / "ae").exists()
    _assert_complete_or_absent(run)


def test_a_submitted_sweep_shares_one_ae_and_continues_after_a_stop(head, tmp_path):
    """jobs/sweep.py as `ray job submit` runs it: a two-trial grid on the debug config; `ray job stop`
    once the first trial has finished and the second has a checkpoint; a second submission of the
    same command continues (the finished trial is not rerun, the other resumes from its checkpoint);
    both trials share one AE and one latent set; each trial's validations reached Tune while it
    trained; results.parquet, results.md and curves.png are written.

    The stop must land while the second trial is part-way, and a debug step takes milliseconds
    (on CI the second trial once finished between its first checkpoint and the stop): so the
    grid's second trial is the longer one (16 steps, a checkpoint every 4), and its training worker is
    frozen (SIGSTOP) the moment its checkpoint is seen, then killed once the job has stopped."""
    import pyarrow.parquet as pq
    import yaml

    spec = {"name": "two-lr", "config": "debug",
            # validations every 2 steps, a checkpoint every 4: the reports at 2, 6, ... are metrics only
            "overrides": ["distributed.num_workers=1", "stage1.max_steps=3", "stage2.log_every=2",
                          "stage2.checkpoint_every=4"],
            "grid": {"stage2.max_steps": [8, 16]},
            "paper": "no paper row: the harness's test"}
    spec_path, run, corpus = tmp_path / "two.yaml", tmp_path / "run", _corpus(tmp_path, 120)
    spec_path.write_text(yaml.safe_dump(spec))
    first, second = run / "trials" / "stage2.max_steps=8", run / "trials" / "stage2.max_steps=16"

    def submit(job_id: str, wait: bool):
        cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"],
               "--submission-id", job_id, "--working-dir", ".", *([] if wait else ["--no-wait"]), "--",
               "python", "jobs/sweep.py", "--spec", str(spec_path), "--corpus", str(corpus), "--run", str(run)]
        return subprocess.run(cmd, check=False, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=1500)

    assert submit("sweep-1", wait=False).returncode == 0
    deadline, frozen = time.time() + 900, []
    while not frozen:  # one trial at a time: the workers frozen are the second trial's
        assert time.time() < deadline and _status(head, "sweep-1") in ("PENDING", "RUNNING"), \
            _job_cli(head["address"], "logs", "sweep-1").stdout[-4000:]
        frozen = ((first / "calm" / "manifest.json").is_file() and _checkpointed(second, "stage2")()
                  and _freeze(TRAIN_WORKER))
        time.sleep(0.05)
    with _killed_after(frozen):
        assert _job_cli(head["address"], "stop", "sweep-1").returncode == 0
        while _status(head, "sweep-1") not in ("STOPPED", "FAILED", "SUCCEEDED"):
            time.sleep(0.5)
    assert _status(head, "sweep-1") == "STOPPED"  # stopped with the second trial part-way
    assert not (second / "calm").exists()
    finished = (first / "calm" / "manifest.json").stat().st_mtime_ns

    again = submit("sweep-2", wait=True)
    log = again.stdout + again.stderr
    (tmp_path.parent / "sweep-2.log").write_text(log)  # for a failing run's reader
    assert again.returncode == 0 and _status(head, "sweep-2") == "SUCCEEDED", log[-4000:]
    assert "[sweep] continuing" in log
    assert "[sweep] trial stage2.max_steps=8:" not in log  # the finished trial is not rerun ...
    assert (first / "calm" / "manifest.json").stat().st_mtime_ns == finished
    assert "[calm] resumed from step" in log  # ... the stopped one resumes from its checkpoint
    assert json.loads((second / "calm" / "manifest.json").read_text())["metrics"]["step"] == 16

    # one AE and one latent set for both trials, used by both
    shared = [p.name for p in (run / "shared").iterdir()]
    assert len(shared) == 1 and (run / "shared" / shared[0] / "latents" / "manifest.json").is_file()
    ae_sha = json.loads((run / "shared" / shared[0] / "ae" / "manifest.json").read_text())["files"]["model.safetensors"]
    for t in (first, second):
        assert json.loads((t / "calm" / "manifest.json").read_text())["identity"]["ae_sha256"] == ae_sha

    # the results, and Tune saw each trial's validation while it trained (not only its last report)
    table = pq.read_table(run / "sweep" / "results.parquet").to_pylist()
    assert [(r["trial"], r["status"], r["step"]) for r in table] == [("stage2.max_steps=8", "done", 8),
                                                                       ("stage2.max_steps=16", "done", 16)]
    assert all(math.isfinite(r["val_loss"]) for r in table)
    # the loss's scale (references, partial credit, context shuffled) and the generation-speed probe, per trial
    assert all(math.isfinite(r[k]) for r in table for k in ("val_gap_closed", "val_gap_prefix3", "val_loss_shuffled"))
    assert all(r["gen_tokens_per_s"] > 0 for r in table)
    assert [len(json.loads(r["curve"])) for r in table] == [4, 8]  # a validation every 2 steps
    md = (run / "sweep" / "results.md").read_text()
    assert "| stage2.max_steps=8 | calm |" in md and "| stage2.max_steps=16 | calm |" in md
    assert (run / "sweep" / "curves.png").stat().st_size > 0
    reports = [json.loads(x) for x in (run / "sweep" / "tune" / "stage2.max_steps=8" / "result.json")
               .read_text().splitlines()]
    assert [r["step"] for r in reports if not r.get("done")] == [2, 4, 6, 8]
