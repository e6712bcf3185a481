"""Artifact I/O: consolidated safetensors weights, resolved config and a manifest, in one folder.

An artifact directory (``RUN/tokenizer``, ``RUN/ae``, ...) holds

    manifest.json   what it is, what it was made from (input hashes), code version, metrics,
                    and the sha256 of every other file in the folder (written last: an artifact
                    without a manifest is incomplete)
    config.yaml     the resolved config that produced it
    *.safetensors   weights that load with plain PyTorch (no Ray, no DeepSpeed)

``read_manifest`` verifies the file hashes, so a truncated or edited file is an error, not a
silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from calm_core.errors import ArtifactError

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """git commit of the code (with '+dirty' when the tree has changes), or 'unknown'.

    Only a checkout of this project counts: the folder holding calm_core/ must be the root of the
    enclosing git repository. Code copied into some other repository (vendored, unpacked inside
    another checkout) would otherwise record that repository's commit."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return "unknown"
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata or {})


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"weights file '{path}' cannot be read ({str(e)[:100]}); the artifact is damaged") from None


def write_manifest(directory: str | Path, kind: str, inputs: dict[str, Any], metrics: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file in ``directory`` and write manifest.json (last, so it marks completion)."""
    d = Path(directory)
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "artifact": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "inputs": inputs,
        "metrics": metrics,
        "files": files,
        **(extra or {}),
    }
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Read and check an artifact's manifest: right kind, every listed file present and intact."""
    d = Path(directory)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"'{d}' is not a complete artifact (no {MANIFEST}); rerun the stage that makes it")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"'{mpath}' is not valid JSON; the artifact is damaged") from None
    if kind is not None and manifest.get("artifact") != kind:
        raise ArtifactError(f"'{d}' holds a '{manifest.get('artifact')}' artifact, expected '{kind}'")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            p = d / name
            if not p.is_file():
                raise ArtifactError(f"artifact '{d}' lacks its file '{name}'; rerun the stage that makes it")
            if sha256_file(p) != digest:
                raise ArtifactError(f"artifact file '{p}' does not match its manifest hash (damaged or edited)")
    return manifest
