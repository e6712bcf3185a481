"""Run directory and artifact I/O: publish is atomic locally, manifests catch damaged files."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from calm_core.checkpoint import code_version, load_weights, read_manifest, save_weights, write_manifest
from calm_core.errors import ArtifactError
from pipelines.storage import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _artifact(tmp_path, name="a"):
    src = tmp_path / f"src-{name}"
    src.mkdir()
    save_weights({"w": torch.arange(6.0).reshape(2, 3)}, src / "model.safetensors")
    (src / "config.yaml").write_text("x: 1\n")
    write_manifest(src, "thing", inputs={"i": 1}, metrics={"m": 2.0})
    return src


def test_publish_and_read(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert not run.has_artifact("thing")
    run.publish_artifact(_artifact(tmp_path), "thing")
    assert run.has_artifact("thing")
    d = run.local_artifact("thing")
    m = read_manifest(d, kind="thing")
    assert m["metrics"] == {"m": 2.0} and set(m["files"]) == {"model.safetensors", "config.yaml"}
    assert torch.equal(load_weights(d / "model.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    # publishing again replaces it whole, nothing left behind
    run.publish_artifact(_artifact(tmp_path, "b"), "thing")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["thing"]


def test_file_uri_and_nested_names(tmp_path):
    run = RunDir(f"file://{tmp_path}/run2")
    run.publish_artifact(_artifact(tmp_path), "eval/x")
    assert run.has_artifact("eval", "x") and (tmp_path / "run2" / "eval" / "x" / "manifest.json").is_file()


def test_damaged_artifact_detected(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.publish_artifact(_artifact(tmp_path), "thing")
    d = run.local_artifact("thing")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        read_manifest(d)
    with pytest.raises(ArtifactError, match="cannot be read"):
        load_weights(w)
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(d)


def test_missing_and_wrong_kind(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(ArtifactError, match="does not exist or is incomplete"):
        run.local_artifact("ae")
    run.publish_artifact(_artifact(tmp_path), "thing")
    with pytest.raises(ArtifactError, match="expected 'ae'"):
        read_manifest(run.local_artifact("thing"), kind="ae")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        RunDir(str(tmp_path / "afile"))


def test_publish_requires_manifest(tmp_path):
    src = tmp_path / "incomplete"
    src.mkdir()
    (src / "x").write_text(json.dumps({}))
    with pytest.raises(ArtifactError, match="without manifest"):
        RunDir(str(tmp_path / "run")).publish_artifact(src, "thing")


def test_code_version_names_a_commit_only_for_this_checkout(tmp_path):
    """The commit recorded in manifests is this project's: in its checkout a 40-hex commit (+dirty
    with uncommitted changes); the same code copied into a folder of another git repository (one
    commit) says 'unknown' rather than that repository's commit."""
    if (ROOT / ".git").exists():  # CI runs on a clean checkout
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", code_version()), code_version()

    repo, vendored = tmp_path / "other", tmp_path / "other" / "vendor"
    shutil.copytree(ROOT / "calm_core", vendored / "calm_core", ignore=shutil.ignore_patterns("__pycache__"))

    def git(*args, cwd=repo):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                               *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "one commit")
    # what git answers from the copy's folder: the commit the copy must not claim
    assert re.fullmatch(r"[0-9a-f]{40}", git("rev-parse", "HEAD", cwd=vendored))

    # the copy's own module (it locates the code by its __file__), run in this interpreter: a new one
    # would only add a second torch import to the suite's time
    spec = importlib.util.spec_from_file_location("copied_checkpoint", vendored / "calm_core" / "checkpoint.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    assert Path(copied.__file__) == vendored / "calm_core" / "checkpoint.py"
    assert copied.code_version() == "unknown"
