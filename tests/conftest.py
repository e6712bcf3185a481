"""Shared test fixtures. Ray is started once per pytest session, with 2 CPUs, like CI's machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Environment for every Ray process; set before anything imports ray (see docs/FIELD-NOTES in
# shared design notes: Ray 2.60 needs RAY_AUTH_MODE set explicitly).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


def _start_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=int(1e9), log_to_driver=True)
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


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A small text corpus with <|endoftext|> separators, made by the test itself."""
    import random

    rng = random.Random(0)
    words = "the a cat dog sat ran on mat big small red blue happy sad and then it was".split()
    docs = []
    for i in range(60):
        n = rng.randint(5, 40)
        docs.append(" ".join(rng.choice(words) for _ in range(n)).capitalize() + ".")
    p = tmp_path / "corpus.txt"
    p.write_text("\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n")
    return p
