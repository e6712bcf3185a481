"""Shared test fixtures. Ray is started once per pytest session, with 2 CPUs, like CI's machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Environment for every Ray process, set before anything imports ray: what the jobs set for
# users' Ray (pipelines.ray_env: no usage stats, Train V2, Serve's throughput mode), plus CPU-only DeepSpeed and no
# progress bars for the tests. Token auth is off here unless asked for (scripts/test.sh sets the
# same): the tests' throwaway clusters are on this machine, and tests/test_cluster_jobs.py starts a
# token-auth head of its own; users' jobs default to token mode.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from pipelines.ray_env import ray_environment  # noqa: E402

ray_environment()

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Ray Train's controller polls its workers every 2 s (Ray's default): a tiny training run then waits
# up to that long at each phase (measured: the ZeRO-3 test 52/47 s at 2 s, 44/42 s at 0.2 s); the
# suite's many short runs poll faster. Users' runs keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402


_RAY_SUSPECT = []  # set when a test timed out or a module left CPUs held: the shared Ray is restarted


def _start_ray():
    import ray

    if _RAY_SUSPECT and ray.is_initialized():
        # a hung run's actors may still hold the CPUs: the next run would wait for them without end
        ray.shutdown()
    _RAY_SUSPECT.clear()
    if not ray.is_initialized():
        from pipelines.ray_env import start_local_ray

        # as users' local jobs start it: always a fresh instance, never a `ray start` cluster found on
        # this machine (tests/test_cluster_jobs.py starts and stops one), its State API found by its processes
        start_local_ray(2, int(1e9))
    return ray


@pytest.fixture(scope="session")
def _ray_teardown():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_session(_ray_teardown):
    """A real local Ray cluster with 2 logical CPUs (the size of the CI machine), started once and
    shared; started again if a test (the multi-node one) had to shut it down."""
    return _start_ray()


@pytest.fixture(scope="module")
def ray_module(_ray_teardown):
    """``ray_session`` for a module-scoped fixture (one expensive set-up shared by a module's tests)."""
    return _start_ray()


@pytest.fixture(scope="session")
def tiny_corpus_text() -> str:
    """The text of ``tiny_corpus`` (the same every time), for fixtures wider than one test."""
    import random

    rng = random.Random(0)
    words = "the a cat dog sat ran on mat big small red blue happy sad and then it was".split()
    docs = []
    for i in range(60):
        n = rng.randint(5, 40)
        docs.append(" ".join(rng.choice(words) for _ in range(n)).capitalize() + ".")
    return "\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n"


@pytest.fixture
def tiny_corpus(tmp_path: Path, tiny_corpus_text: str) -> Path:
    """A small text corpus with <|endoftext|> separators, made by the test itself."""
    p = tmp_path / "corpus.txt"
    p.write_text(tiny_corpus_text)
    return p


def wake(model, std: float = 0.5) -> None:
    """Random weights for every all-zero matrix of ``model`` (layers that start at zero, e.g. the
    head's last one), so an untrained model's outputs depend on its inputs and noise."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, std)


def write_random_ae(directory, corpus_text: str, seed: int = 0, latent_dim: int = 16, for_text: bool = False):
    """RUN/ae of a tiny randomly initialised autoencoder, written by the project's own artifact
    writer (``calm_core.artifacts.write_trained``, as training publishes it) -> (model in eval mode,
    tokenizer). The tokenizer is trained on the documents of ``corpus_text``. ``suppress_eot``
    zeroes the end-of-text row of the tied output matrix (logit 0 among random ones: the decoder
    practically never ends a text, which tests of serving need)."""
    import torch

    from calm_core.artifacts import ae_inputs, write_trained
    from calm_core.autoencoder import ChunkAutoencoder, load_autoencoder_dir
    from calm_core.config import load_config
    from calm_core.tokenizer import CalmTokenizer

    cfg = load_config("debug", [f"ae.latent_dim={latent_dim}"])
    docs = [d for d in corpus_text.split("<|endoftext|>") if d.strip()]
    tok = CalmTokenizer.train(docs, vocab_size=cfg.tokenizer.vocab_size, min_frequency=1)
    torch.manual_seed(seed)
    model = ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
    if for_text:
        wake(model)
        with torch.no_grad():
            model.embed.weight[tok.eot_id] = 0.0
    directory = Path(directory)
    directory.mkdir(parents=True)  # write_trained writes into an existing folder
    write_trained(directory, "ae", model.state_dict(), cfg, tok, records=[], final={"step": 0},
                  inputs=ae_inputs(cfg, tok, {}), extra={"K": cfg.ae.K, "latent_dim": cfg.ae.latent_dim},
                  load=lambda d: load_autoencoder_dir(d, verify=False)[0])
    return model.eval(), tok


@pytest.fixture(scope="session")
def make_ae():
    """``make_ae(directory, corpus_text, seed=0, latent_dim=16) -> (model, tok)``: writes a random
    tiny AE artifact (``write_random_ae``); session-scoped, so wider fixtures can use it too."""
    return write_random_ae


def write_random_model(run, kind: str, tok, seed: int = 0, overrides: tuple[str, ...] = ()) -> None:
    """A random tiny CALM or baseline artifact in RUN/KIND on RUN/ae (debug config and ``overrides``),
    for serving and evaluation tests."""
    import dataclasses

    import torch

    from calm_core.artifacts import build_model, load_ae, load_model, model_inputs, write_trained
    from calm_core.config import load_config

    ae = load_ae(run / "ae")
    cfg = dataclasses.replace(load_config("debug", list(overrides)), ae=ae.cfg.ae)
    torch.manual_seed(seed)
    model = build_model(kind, cfg, tok.vocab_size)
    wake(model)  # the head's zero-initialised last layer: samples that differ with the noise
    if kind == "baseline":  # as the AE: end-of-text gets logit 0 among random logits (texts rarely end)
        with torch.no_grad():
            model.embed.weight[tok.eot_id] = 0.0
    (run / kind).mkdir()
    write_trained(run / kind, kind, model.state_dict(), cfg, tok, [], {"step": 0}, model_inputs(cfg, tok, ae.sha256),
                  {}, load=lambda d: load_model(d, kind, verify=False).model)


def one_line_error(proc, *needles: str) -> str:
    """A job that refused its input as users should see it: exit status 2, one 'error: ' line on
    stderr holding every needle, no traceback. Returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def latent_rows(run, manifest: dict | None = None) -> dict:
    """Every split's latent rows in stream order, whatever part files and encoder batches Ray Data cut
    them into (those may change between runs; the rows and their order may not):
    {split: (keys [(doc_id, position)], tokens [N, K], mu [N, l], log_sigma [N, l])}."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.data import latents as LT

    manifest = manifest or LT.latents_manifest(run)
    out = {}
    for split in LT.SPLITS:
        tables = [pq.read_table(f) for f in LT.part_files(run, manifest, split)]
        keys = [k for t in tables for k in zip(t.column("doc_id").to_pylist(), t.column("position").to_pylist())]
        out[split] = (keys, *(np.concatenate([LT.column_matrix(t, c) for t in tables]) if tables else np.zeros(0)
                              for c in ("tokens", "mu", "log_sigma")))
    return out


def assert_same_latent_rows(got: dict, want: dict, atol: float = 1e-6) -> None:
    """The same rows in the same order (so none lost or written twice): keys and tokens exactly, the
    encoder's floats to ``atol`` (batch shapes may differ between runs)."""
    import numpy as np

    assert got.keys() == want.keys()
    for split, (keys, tokens, mu, log_sigma) in want.items():
        g = got[split]
        assert g[0] == keys, split
        np.testing.assert_array_equal(g[1], tokens)
        np.testing.assert_allclose(g[2], mu, atol=atol)
        np.testing.assert_allclose(g[3], log_sigma, atol=atol)


def stop_group(proc, sig: int, grace_s: float = 60) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started: ``sig`` to
    its process group, then SIGKILL if it has not ended within ``grace_s``."""
    import signal
    import subprocess

    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _held_resources(wait_s: float = 15.0) -> dict:
    """What of the shared Ray's CPUs is still held after a module's tests (and its fixtures) have
    finished, waiting up to ``wait_s`` for asynchronous teardown -> {} if none, else the held CPUs,
    the live actors and the placement groups not removed."""
    import time

    import ray

    deadline = time.monotonic() + wait_s
    while True:
        total, free = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
        if free >= total or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if free >= total:
        return {}
    from ray.util import placement_group_table
    from ray.util.state import list_actors

    actors = [(a.class_name, a.name, a.actor_id, a.pid) for a in list_actors(filters=[("state", "=", "ALIVE")])]
    groups = [(k, v["state"], v["bundles"]) for k, v in placement_group_table().items() if v["state"] != "REMOVED"]
    return {"cpus_held": total - free, "actors": actors, "placement_groups": groups}


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_ray_free(request):
    """After each module: the shared Ray's CPUs all free again. A module whose runs left actors or
    placement groups holding CPUs makes the NEXT module's runs wait for resources forever (Ray Train
    waits for its workers' placement group without a limit): report it, on the terminal at once, and
    restart the shared Ray before the next test that uses it."""
    yield
    import ray

    if not ray.is_initialized():
        return
    held = _held_resources()
    if held:
        sys.__stderr__.write(f"\n[conftest] {request.module.__name__} left Ray resources held: {held}; "
                             "the shared Ray is restarted\n")
        sys.__stderr__.flush()
        _RAY_SUSPECT.append(request.module.__name__)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test stopped by pytest-timeout (a hung run) leaves its Ray actors holding the CPUs: the
    next test restarts the shared Ray rather than wait behind them until the suite's hard limit."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and "Timeout" in str(rep.longrepr)[-20000:]:
        _RAY_SUSPECT.append(item.nodeid)
