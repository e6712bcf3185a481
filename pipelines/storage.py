"""The run directory: a local path or a URI (s3://, gs://, file://) opened with pyarrow.fs.

All artifacts of one run live under it (``RUN/tokenizer``, ``RUN/ae``, ...); Ray Train keeps its
checkpoints in ``RUN/_train``. Artifacts are built in a local folder and then published:
locally by an atomic rename, remotely by uploading every file and the manifest last (an
artifact without a manifest counts as absent).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from calm_core.checkpoint import MANIFEST
from calm_core.errors import ArtifactError


class RunDir:
    def __init__(self, spec: str):
        if not spec:
            raise ArtifactError("--run is empty: name a directory or URI for this run's artifacts")
        self.spec = spec
        if "://" in spec and not spec.startswith("file://"):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(spec)
            except Exception as e:
                raise ArtifactError(f"run directory '{spec}' cannot be opened ({str(e)[:120]})") from None
            self.local_root: Path | None = None
            self.scheme = spec.split("://", 1)[0]
        else:
            local = spec[len("file://"):] if spec.startswith("file://") else spec
            self.local_root = Path(local).expanduser().resolve()
            if self.local_root.exists() and not self.local_root.is_dir():
                raise ArtifactError(f"run directory '{spec}' exists and is not a directory")
            self.fs, self.root = pafs.LocalFileSystem(), str(self.local_root)
            self.scheme = "file"

    # ------------------------------------------------------------------ paths
    @property
    def is_local(self) -> bool:
        return self.local_root is not None

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri(self, *parts: str) -> str:
        """What Ray Train's storage_path and users should be given."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.scheme}://{p}"

    def __str__(self) -> str:
        return self.spec

    # ------------------------------------------------------------------ queries
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def has_artifact(self, *name: str) -> bool:
        return self.exists(*name, MANIFEST)

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode("utf-8")

    def read_json(self, *parts: str):
        return json.loads(self.read_text(*parts))

    def write_text(self, text: str, *parts: str) -> None:
        """Write a small file atomically: a reader sees the old content or the new, never a part
        (locally a rename; an object store's single PUT is atomic by itself)."""
        self.fs.create_dir(self.path(*parts[:-1]), recursive=True)
        if self.is_local:
            final = Path(self.path(*parts))
            tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, final)
            return
        with self.fs.open_output_stream(self.path(*parts)) as f:
            f.write(text.encode("utf-8"))

    def list_files(self, *parts: str) -> list[tuple[str, int]]:
        """(name, size in bytes) of the files directly inside RUN/parts, sorted by name."""
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True, recursive=False)
        infos = [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        return sorted((i.base_name, i.size) for i in infos)

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(*parts))

    # ------------------------------------------------------------------ artifacts
    def local_artifact(self, name: str) -> Path:
        """A local folder holding artifact ``name`` (the folder itself when the run is local)."""
        if not self.has_artifact(*name.split("/")):
            raise ArtifactError(f"'{self.uri(name)}' does not exist or is incomplete; run the stage that makes it first")
        if self.is_local:
            return Path(self.path(name))
        dest = Path(tempfile.mkdtemp(prefix=f"calm-{name}-"))
        pafs.copy_files(self.path(name), str(dest), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return dest

    def publish_artifact(self, local_dir: str | Path, name: str) -> str:
        """Replace ``RUN/name`` with the contents of ``local_dir`` (which must hold a manifest)."""
        src = Path(local_dir)
        if not (src / MANIFEST).is_file():
            raise ArtifactError(f"refusing to publish '{src}' without {MANIFEST}")
        if self.is_local:
            final = self.local_root / name
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copytree(src, tmp)
            old = None
            if final.exists():
                old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            self.delete(name)
            self.fs.create_dir(self.path(name), recursive=True)
            local = pafs.LocalFileSystem()
            for p in sorted(src.iterdir()):
                if p.is_file() and p.name != MANIFEST:
                    pafs.copy_files(str(p), self.path(name, p.name), source_filesystem=local,
                                    destination_filesystem=self.fs)
            pafs.copy_files(str(src / MANIFEST), self.path(name, MANIFEST), source_filesystem=local,
                            destination_filesystem=self.fs)
        return self.uri(name)


def fetch_dir(spec: str, file_ok: bool = False) -> Path:
    """A local path for a folder (or, with ``file_ok``, a file) given as a path or a URI: a local one
    as it is, a remote one copied into a temporary folder first. Missing -> ArtifactError."""
    if "://" not in spec or spec.startswith("file://"):
        p = Path(spec[len("file://"):] if spec.startswith("file://") else spec).expanduser()
        if not p.is_dir() and not (file_ok and p.is_file()):
            raise ArtifactError(f"'{spec}' does not exist" + ("" if file_ok else " or is not a directory"))
        return p
    try:
        fs, root = pafs.FileSystem.from_uri(spec)
        info = fs.get_file_info(root)
    except Exception as e:
        raise ArtifactError(f"'{spec}' cannot be opened ({str(e)[:120]})") from None
    if info.type == pafs.FileType.NotFound or (info.type == pafs.FileType.File and not file_ok):
        raise ArtifactError(f"'{spec}' does not exist" + ("" if file_ok else " or is not a directory"))
    dest = Path(tempfile.mkdtemp(prefix="calm-fetch-"))
    if info.type == pafs.FileType.File:
        target = dest / info.base_name
        pafs.copy_files(root, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return target
    pafs.copy_files(root, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest
