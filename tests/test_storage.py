"""Run directory and artifact I/O: publish is atomic locally, manifests catch damaged files."""

import json

import pytest
import torch

from calm_core.checkpoint import load_weights, read_manifest, save_weights, write_manifest
from calm_core.errors import ArtifactError
from pipelines.storage import RunDir


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
