"""The latents Parquet format: schema, encoding of the stored floats, and the reader stage 2 uses.

``RUN/latents/`` (written by ``pipelines/precompute.py``, layout in docs/LATENTS.md):

    manifest.json                 written last; lists every part file with rows, bytes and sha256
    _identity.json                what the output depends on (AE, tokenizer, K, dtype, corpus, ...)
    train/shard-00000/part-000000.parquet ...   one folder per shard of documents
    train/shard-00000.json        the shard's commit record (written after its files are complete)
    val/...

One row per K-token chunk, in corpus order: documents in the order ingest reads them, and the
chunks of a document in order (``position`` 0, 1, ...). Files sort in that order too, so reading
the part files of a split in name order gives the token stream back, and L consecutive rows of one
file are L consecutive chunks of text (documents follow each other, each ending with its
end-of-text chunk). Stage 2 takes training blocks of L consecutive rows of one file
(``latent_blocks``) and never needs a global shuffle of chunks.

Columns (explicit pyarrow schema; its metadata key ``calm.latents`` holds the JSON identity):

    doc_id      string                     sha1 of the document's normalised text
    position    int32                      chunk index within the document
    tokens      fixed_size_list<int32>[K]  the chunk's token ids (EOT / padding included)
    mu          fixed_size_list<T>[l]      posterior mean of the frozen encoder
    log_sigma   fixed_size_list<T>[l]      posterior log standard deviation

T is float32, float16 (Parquet FLOAT16), or bfloat16 stored as uint16 bit patterns (Parquet has
no bfloat16 type; ``decode_floats`` turns them back).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from calm_core.errors import ArtifactError
from pipelines.storage import RunDir

ARTIFACT = "latents"
SPLITS = ("train", "val")
META_KEY = b"calm.latents"
STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}
# Parquet encoding: dictionaries only where values repeat (ids), byte-stream-split + zstd for the
# floats (measured on TinyStories latents: 190 bytes/token for float32 against 265 with pyarrow's
# defaults, whose dictionary pages are wasted on unique floats)
PARQUET_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": ["doc_id", "position", "tokens.list.element"],
    "use_byte_stream_split": ["mu.list.element", "log_sigma.list.element"],
}
# what must agree between the latents and the AE a stage-2 run uses
MATCH_KEYS = ("ae_sha256", "tokenizer_sha256", "K", "latent_dim")


def latents_schema(K: int, latent_dim: int, dtype: str, meta: dict[str, Any] | None = None) -> pa.Schema:
    t = STORAGE_TYPES[dtype]
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("position", pa.int32()),
            ("tokens", pa.list_(pa.int32(), K)),
            ("mu", pa.list_(t, latent_dim)),
            ("log_sigma", pa.list_(t, latent_dim)),
        ],
        metadata={META_KEY: json.dumps(meta or {}, sort_keys=True).encode()},
    )


def encode_floats(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float tensor [N, l] -> the flat numpy array stored for ``dtype`` (float32 / float16 / uint16)."""
    x = x.detach().float().cpu()
    if dtype == "float32":
        return x.numpy().reshape(-1)
    if dtype == "float16":
        return x.half().numpy().reshape(-1)
    return x.bfloat16().view(torch.int16).numpy().view(np.uint16).reshape(-1)  # bfloat16 bit patterns


def decode_floats(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored numpy values (any shape) -> float32 tensor of the same shape."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(arr, dtype=np.uint16).view(np.int16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: Arrow buffers are read-only


def to_table(doc_id, position, tokens: np.ndarray, mu: torch.Tensor, log_sigma: torch.Tensor,
             schema: pa.Schema, dtype: str) -> pa.Table:
    """One batch of encoded chunks as a table of ``schema`` (tokens [N, K], mu / log_sigma [N, l])."""
    K, l = tokens.shape[1], mu.shape[1]
    t = STORAGE_TYPES[dtype]
    cols = [
        pa.array(np.asarray(doc_id, dtype=object), type=pa.string()),
        pa.array(np.asarray(position, dtype=np.int32), type=pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(tokens, dtype=np.int32).reshape(-1)), K),
        pa.FixedSizeListArray.from_arrays(pa.array(encode_floats(mu, dtype), type=t), l),
        pa.FixedSizeListArray.from_arrays(pa.array(encode_floats(log_sigma, dtype), type=t), l),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    """A fixed_size_list column -> numpy [rows, width] (no copy when possible)."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)


# ----------------------------------------------------------------------------- the reader


def latents_manifest(run: RunDir) -> dict[str, Any]:
    if not run.has_artifact(ARTIFACT):
        what = "is incomplete (no manifest: the precompute job did not finish)" if run.exists(ARTIFACT) \
            else "does not exist"
        raise ArtifactError(f"'{run.uri(ARTIFACT)}' {what}; run jobs/precompute_latents.py for this run")
    return run.read_json(ARTIFACT, "manifest.json")


def check_matches(manifest: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuse latents made by another AE, tokenizer, K or latent width than ``expected``."""
    made = manifest["identity"]
    diffs = [f"{k}: latents have {made.get(k)!r}, the AE has {expected.get(k)!r}"
             for k in MATCH_KEYS if made.get(k) != expected.get(k)]
    if diffs:
        raise ArtifactError(f"'{where}' was made with another autoencoder ({'; '.join(diffs)}); "
                            "rerun jobs/precompute_latents.py --overwrite with this AE, or use its own run")


def layout(manifest: dict[str, Any]) -> str:
    """The layout the latents were cut in (``calm_core.chunking``; latents made before the setting: document)."""
    return manifest["identity"].get("layout", "document")


def check_layout(manifest: dict[str, Any], wanted: str, where: str, who: str) -> None:
    """Refuse latents cut in another layout than ``wanted`` (``who``: the stage that reads them)."""
    made = layout(manifest)
    if made != wanted:
        raise ArtifactError(f"'{where}' holds latents of the {made} layout and {who} trains on the {wanted} layout "
                            f"(data.layout, from the run's AE when auto); rerun jobs/precompute_latents.py "
                            f"--overwrite data.layout={wanted}, or set data.layout={made}")


def part_files(run: RunDir, manifest: dict[str, Any], split: str, verify: bool = True) -> list[str]:
    """Paths (inside ``run.fs``) of the split's part files, in stream order; with ``verify`` each file's
    size and sha256 are checked against the manifest."""
    out = []
    for part in manifest["parts"][split]:
        path = run.path(ARTIFACT, part["path"])
        info = run.fs.get_file_info(path)
        if info.size is None or info.type.name != "File":
            raise ArtifactError(f"latents part '{run.uri(ARTIFACT, part['path'])}' is missing; "
                                "rerun jobs/precompute_latents.py --overwrite")
        if info.size != part["bytes"]:
            raise ArtifactError(f"latents part '{run.uri(ARTIFACT, part['path'])}' is truncated or changed "
                                f"({info.size} bytes, the manifest says {part['bytes']}); "
                                "rerun jobs/precompute_latents.py --overwrite")
        if verify:
            check_digest(run, part)
        out.append(path)
    return out


def check_digest(run: RunDir, part: dict[str, Any]) -> None:
    """Refuse a part file whose sha256 is not the manifest's (``part``: its manifest entry)."""
    digest = sha256_of(run, run.path(ARTIFACT, part["path"]))
    if digest != part["sha256"]:
        raise ArtifactError(f"latents part '{run.uri(ARTIFACT, part['path'])}' is corrupted (sha256 "
                            f"{digest[:12]}, the manifest says {part['sha256'][:12]}); "
                            "rerun jobs/precompute_latents.py --overwrite")


def sha256_of(run: RunDir, path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with run.fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_latents(run: RunDir, split: str = "train", expected: dict[str, Any] | None = None,
                 verify: bool = True, num_cpus: float | None = None):
    """RUN/latents/<split> as a Ray Dataset with a ``path`` column (the part file of each row; the rows
    of one file are in stream order, the order of files in the dataset is Ray Data's), after
    checking that the output is complete, that it was made by the ``expected`` AE
    (``calm_core.artifacts.AEArtifact.identity``), and (``verify``) that no part file is truncated
    or corrupted. ``num_cpus``: what each read task reserves (Ray's default: 1 CPU; the evaluation
    passes data.read_cpus so its reads fit beside its scoring actors; Ray Data's listing of the
    files still takes 1 CPU, see ``pipelines.eval.job.check_fits``). Returns (dataset, manifest)."""
    import ray.data

    if split not in SPLITS:
        raise ArtifactError(f"unknown latents split {split!r}; use one of {', '.join(SPLITS)}")
    manifest = latents_manifest(run)
    if expected is not None:
        check_matches(manifest, expected, run.uri(ARTIFACT))
    files = part_files(run, manifest, split, verify)
    if not files:
        raise ArtifactError(f"'{run.uri(ARTIFACT)}' holds no {split} rows (the {split} split of the corpus "
                            "was empty)")
    schema = latents_schema(manifest["identity"]["K"], manifest["identity"]["latent_dim"],
                            manifest["identity"]["dtype"])
    # with the file of every row: Ray Data may pack several part files into one block, in any order
    ds = ray.data.read_parquet(files, filesystem=run.fs, schema=schema, include_paths=True, num_cpus=num_cpus)
    return ds, manifest


class LatentBlocks:
    """map_batches UDF: rows of consecutive chunks -> training blocks of L consecutive chunks.

    Rows are grouped by the part file they came from (``path``; within a file they are in stream
    order) and each file's run is cut into blocks of L, so a block never joins two files that Ray
    Data happened to pack together. Out: {"tokens": int64 [n, L, K], "mu": float32 [n, L, l],
    "log_sigma": float32 [n, L, l], "key": int64 [n]}; the last (< L) rows of each file's run are
    dropped. A block's key (from its first chunk's document and position) names it wherever it is
    scored: the evaluation seeds the block's noise with it."""

    def __init__(self, L: int, dtype: str):
        self.L, self.dtype = L, dtype

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        paths = batch.column("path").to_numpy(zero_copy_only=False)
        edges = [0, *(np.flatnonzero(paths[1:] != paths[:-1]) + 1).tolist(), len(paths)]
        take = np.concatenate([np.arange(a, a + (b - a) // self.L * self.L) for a, b in zip(edges, edges[1:])]
                              + [np.zeros(0, dtype=np.int64)]).astype(np.int64)
        n = len(take) // self.L
        tok = column_matrix(batch, "tokens")[take].astype(np.int64)
        mu = decode_floats(column_matrix(batch, "mu")[take], self.dtype).numpy()
        ls = decode_floats(column_matrix(batch, "log_sigma")[take], self.dtype).numpy()
        firsts = take[:: self.L][:n]
        docs = batch.column("doc_id").to_numpy(zero_copy_only=False)[firsts] if "doc_id" in batch.column_names else []
        pos = batch.column("position").to_numpy()[firsts] if "position" in batch.column_names else []
        key = np.array([int(hashlib.sha1(f"{d}:{p}".encode()).hexdigest()[:15], 16) for d, p in zip(docs, pos)],
                       dtype=np.int64) if len(docs) else np.arange(n, dtype=np.int64)
        return {"tokens": tok.reshape(n, self.L, -1), "mu": mu.reshape(n, self.L, -1),
                "log_sigma": ls.reshape(n, self.L, -1), "key": key}


def latent_blocks(ds, manifest: dict[str, Any], L: int, num_cpus: float = 0.25):
    """Training blocks of L consecutive chunks from a ``read_latents`` dataset (plain Ray Data tasks,
    fractional CPUs: no actor stage to starve a small cluster)."""
    return ds.map_batches(LatentBlocks(L, manifest["identity"]["dtype"]), batch_size=None,
                          batch_format="pyarrow", num_cpus=num_cpus)


def first_blocks(run: RunDir, split: str, L: int, n: int, expected: dict[str, Any] | None = None,
                 manifest: dict[str, Any] | None = None, batch_rows: int = 65536) -> list[dict]:
    """The first ``n`` blocks of L consecutive chunks of RUN/latents/<split> in stream order (part
    files in manifest order, each cut as ``LatentBlocks`` cuts it), read here with pyarrow: a
    validation set of a few blocks is the same every run and costs no Ray Data execution (measured:
    5.8 s of a debug stage 2 on a 2-core machine went to running one for 4 blocks). Each file is
    read in record batches of ``batch_rows`` rows only as far as the blocks still wanted reach (a
    few blocks from a training part file do not read the whole file, and only the files read are
    hashed); ``manifest``: the latents manifest when the caller holds it already. Checks as
    ``read_latents`` does.
    -> [{"tokens", "mu", "log_sigma", "key"}, ...] (fewer if the split is short)."""
    import pyarrow.parquet as pq

    manifest = manifest if manifest is not None else latents_manifest(run)
    if expected is not None:
        check_matches(manifest, expected, run.uri(ARTIFACT))
    ident = manifest["identity"]
    schema = latents_schema(ident["K"], ident["latent_dim"], ident["dtype"])
    cut, out = LatentBlocks(L, ident["dtype"]), []
    # sizes of every part checked here, digests only of the parts read
    for part, path in zip(manifest["parts"][split], part_files(run, manifest, split, verify=False)):
        want = (n - len(out)) * L  # rows of this file that can still become blocks
        if want <= 0:
            break
        check_digest(run, part)
        batches, rows = [], 0
        with run.fs.open_input_file(path) as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=schema.names):
                batches.append(b)
                rows += b.num_rows
                if rows >= want:
                    break
        # blocks start at the file's first row, so the first `want` rows cut as the whole file would
        table = pa.Table.from_batches(batches).slice(0, want).cast(schema) if batches else schema.empty_table()
        got = cut(table.append_column("path", pa.array([path] * table.num_rows, pa.string())))
        out += [{k: v[i] for k, v in got.items()} for i in range(min(len(got["key"]), n - len(out)))]
    return out
