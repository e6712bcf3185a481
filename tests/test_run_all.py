"""The chained job as a user runs it (a subprocess joining the test session's Ray): tokenizer ->
stage 1 -> report -> latents -> CALM -> baseline -> evaluation on the held-out documents -> a
sample; a second run skips every stage."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run_all(args: list[str]) -> subprocess.CompletedProcess:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "run_all.py"), "--config", "debug", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)


def test_the_chain_runs_end_to_end_and_a_second_run_skips_every_stage(ray_module, tmp_path):
    rng = random.Random(1)
    words = "the a cat dog sat ran on mat big small red blue happy sad and then it was".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))).capitalize() + "." for _ in range(400)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    run = tmp_path / "run"
    args = ["--corpus", str(corpus), "--run", str(run), "--baseline", "eval.sweep_every=1", "eval.temperatures=[1.0,0.5]"]
    first = _run_all(args)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    for artifact in ("tokenizer", "ae", "latents", "calm", "baseline", "eval/heldout"):
        assert (run / artifact / "manifest.json").is_file(), artifact
    assert "[run_all] evaluation on the held-out documents" in out and "BrierLM" in out
    table = out.split("[run_all] evaluation on the held-out documents", 1)[1]
    assert "calm" in table and "baseline" in table
    assert "[run_all] a sample (temperature 0.5" in out
    assert (run / "eval" / "heldout" / "temperature.png").is_file()
    second = _run_all(args)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    for what in ("ae", "latents", "calm", "baseline", "eval/heldout"):
        assert f"{run / what} is complete" in log, what
    assert "step 3/" not in log  # nothing trained again
