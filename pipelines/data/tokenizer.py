"""RUN/tokenizer: a byte-level BPE trained on the corpus's training split, or an existing file.

The artifact holds tokenizer.json, the resolved config and a manifest with the tokenizer's sha256.
Every later stage reads it from the run directory, so the whole run shares one tokenizer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from calm_core.checkpoint import read_manifest, write_manifest
from calm_core.config import Config
from calm_core.errors import ArtifactError
from calm_core.tokenizer import CalmTokenizer
from pipelines.storage import RunDir
from pipelines.progress import progress


def load_run_tokenizer(run: RunDir) -> CalmTokenizer:
    d = run.local_artifact("tokenizer")
    manifest = read_manifest(d, kind="tokenizer")
    tok = CalmTokenizer.from_file(Path(d) / "tokenizer.json")
    if tok.sha256 != manifest["sha256"]:
        raise ArtifactError(f"'{run.uri('tokenizer')}' does not match its manifest hash; rerun with --overwrite")
    return tok


def ensure_tokenizer(cfg: Config, run: RunDir, train_docs=None, corpus_info: dict | None = None) -> CalmTokenizer:
    """Load RUN/tokenizer, or make it (from ``cfg.tokenizer.path`` or by training on ``train_docs``)."""
    tc = cfg.tokenizer
    if run.has_artifact("tokenizer"):
        tok = load_run_tokenizer(run)
        made_with = read_manifest(run.local_artifact("tokenizer"), verify=False)["inputs"].get("tokenizer_config", {})
        wanted = {"path": tc.path, "vocab_size": tc.vocab_size, "min_frequency": tc.min_frequency,
                  "max_train_documents": tc.max_train_documents}
        if made_with and made_with != wanted:
            changed = ", ".join(f"tokenizer.{k}: {made_with.get(k)!r} -> {v!r}" for k, v in wanted.items()
                                if made_with.get(k) != v)
            raise ArtifactError(f"'{run.uri('tokenizer')}' was made with other settings ({changed}); "
                                "use a new --run directory")
        progress(f"[tokenizer] using {run.uri('tokenizer')} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
        return tok

    t0 = time.perf_counter()
    if tc.path:
        tok = CalmTokenizer.from_file(tc.path)
        source = f"file:{tc.path}"
    else:
        if train_docs is None:
            raise ArtifactError("no tokenizer in the run directory and no corpus to train one on")
        from pipelines.data.ingest import iter_texts

        progress(f"[tokenizer] training byte-level BPE, vocab {tc.vocab_size}, "
                 f"on up to {tc.max_train_documents} training documents")
        tok = CalmTokenizer.train(iter_texts(train_docs, tc.max_train_documents), tc.vocab_size, tc.min_frequency)
        source = "trained"
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        write_manifest(
            tmp,
            "tokenizer",
            inputs={"source": source, "corpus": corpus_info or {}, "tokenizer_config": {
                "path": tc.path, "vocab_size": tc.vocab_size, "min_frequency": tc.min_frequency,
                "max_train_documents": tc.max_train_documents}},
            metrics={"vocab_size": tok.vocab_size},
            extra={"sha256": tok.sha256, "special_tokens": {"eot": tok.eot_id, "pad": tok.pad_id, "mask": tok.mask_id}},
        )
        uri = run.publish_artifact(tmp, "tokenizer")
    progress(f"[tokenizer] wrote {uri} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}) "
             f"in {time.perf_counter() - t0:.1f}s")
    return tok
