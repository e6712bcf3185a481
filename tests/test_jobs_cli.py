"""The jobs as a user runs them (a subprocess): bad input ends in one line `error: ...`, exit 2,
never a traceback. Jobs that need Ray join the test session's cluster through RAY_ADDRESS."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]


def _job(args, ray_address=None, timeout=300, script="stage1.py"):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_explains_options_and_overrides():
    p = _job(["--help"])
    assert p.returncode == 0
    for word in ("--config", "--corpus", "--run", "--overwrite", "key=value", "debug", "paper"):
        assert word in p.stdout, word


def test_config_typo_names_the_key(tmp_path):
    p = _job(["--config", "debug", "--run", str(tmp_path / "r"), "ae.latnt_dim=8"])
    one_line_error(p, "ae.latnt_dim", "did you mean 'ae.latent_dim'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  batch_size: many\n")
    p = _job(["--config", str(bad), "--run", str(tmp_path / "r")])
    one_line_error(p, "stage1.batch_size", "bad.yaml", "integer")


def test_missing_corpus_and_run_that_is_a_file(tmp_path):
    p = _job(["--config", "debug", "--corpus", str(tmp_path / "nope.txt"), "--run", str(tmp_path / "r")])
    one_line_error(p, "nope.txt")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    p = _job(["--config", "debug", "--corpus", str(a_file), "--run", str(a_file)])
    one_line_error(p, "not a directory")


@pytest.mark.slow
def test_empty_and_binary_corpora_are_clear_errors(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    p = _job(["--config", "debug", "--corpus", str(empty), "--run", str(tmp_path / "r1")], address)
    one_line_error(p, "no usable documents", "empty")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    p = _job(["--config", "debug", "--corpus", str(binary), "--run", str(tmp_path / "r2")], address)
    one_line_error(p, "no usable documents", "undecodable")
    assert not (tmp_path / "r1" / "ae").exists() and not (tmp_path / "r2" / "ae").exists()


def test_precompute_needs_an_autoencoder(tmp_path, tiny_corpus):
    p = _job(["--config", "debug", "--corpus", str(tiny_corpus), "--run", str(tmp_path / "r")],
             script="precompute_latents.py")
    one_line_error(p, "ae", "does not exist")
    p = _job(["--config", "debug", "--corpus", str(tiny_corpus), "--run", str(tmp_path / "r"),
              "--ae", str(tmp_path / "nowhere")], script="precompute_latents.py")
    one_line_error(p, "nowhere", "does not exist")
    p = _job(["--help"], script="precompute_latents.py")
    assert p.returncode == 0 and "--ae" in p.stdout


def test_generate_bad_inputs_are_one_line_errors(tmp_path):
    one_line_error(_job(["--run", str(tmp_path / "none")], script="generate.py"), "does not exist", "ae")
    one_line_error(_job(["--run", str(tmp_path), "--temperature", "2"], script="generate.py"), "--temperature")
    one_line_error(_job(["--run", str(tmp_path), "--chunks", "0"], script="generate.py"), "--chunks")
    one_line_error(_job(["--run", str(tmp_path), "--device", "warp9"], script="generate.py"), "--device")
    if not torch.cuda.is_available():
        one_line_error(_job(["--run", str(tmp_path), "--device", "cuda"], script="generate.py"), "no CUDA GPU")
