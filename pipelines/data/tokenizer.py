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
from pipelines.claim import Spot, claim
from pipelines.storage import RunDir
from pipelines.progress import progress


def load_run_tokenizer(run: RunDir) -> CalmTokenizer:
    d = run.local_artifact("tokenizer")
    manifest = read_manifest(d, kind="tokenizer")
    tok = CalmTokenizer.from_file(Path(d) / "tokenizer.json")
    if tok.sha256 != manifest["sha256"]:
        raise ArtifactError(f"'{run.uri('tokenizer')}' does not match its manifest hash; rerun with --overwrite")
    return tok


def tokenizer_identity(cfg: Config) -> dict:
    t = cfg.tokenizer
    return {"tokenizer.path": t.path, "tokenizer.vocab_size": t.vocab_size, "tokenizer.min_frequency": t.min_frequency,
            "tokenizer.max_train_documents": t.max_train_documents}


def ensure_tokenizer(cfg: Config, run: RunDir, train_docs=None, corpus_info: dict | None = None) -> CalmTokenizer:
    """Load RUN/tokenizer, or make it (from ``cfg.tokenizer.path`` or by training on ``train_docs``);
    one made with other tokenizer settings is refused (``pipelines.claim``)."""
    tcfg = cfg.tokenizer
    identity = tokenizer_identity(cfg)
    spot = Spot(run, "tokenizer", record=None, label="tokenizer", what="a tokenizer", remedy="use a new --run directory")
    if claim(spot, identity, lambda m: f"vocab {m['metrics']['vocab_size']}, sha256 {m['sha256'][:12]}",
             hint="every stage of this run uses it") is not None:
        return load_run_tokenizer(run)

    t0 = time.perf_counter()
    if tcfg.path:
        tok = CalmTokenizer.from_file(tcfg.path).with_bos()
        source = f"file:{tcfg.path}"
    else:
        if train_docs is None:
            raise ArtifactError("no tokenizer in the run directory and no corpus to train one on")
        from pipelines.data.ingest import iter_texts

        progress(f"[tokenizer] training byte-level BPE, vocab {tcfg.vocab_size}, "
                 f"on up to {tcfg.max_train_documents} training documents")
        tok = CalmTokenizer.train(iter_texts(train_docs, tcfg.max_train_documents), tcfg.vocab_size, tcfg.min_frequency)
        source = "trained"
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        write_manifest(
            tmp,
            "tokenizer",
            inputs={"source": source, "corpus": corpus_info or {}, "tokenizer_config": {
                "path": tcfg.path, "vocab_size": tcfg.vocab_size, "min_frequency": tcfg.min_frequency,
                "max_train_documents": tcfg.max_train_documents}},
            metrics={"vocab_size": tok.vocab_size},
            extra={"sha256": tok.sha256, "special_tokens": {"eot": tok.eot_id, "pad": tok.pad_id, "mask": tok.mask_id,
                                                          "bos": tok.bos_id},
                   "identity": identity},
        )
        uri = run.publish_artifact(tmp, "tokenizer")
    progress(f"[tokenizer] wrote {uri} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}) "
             f"in {time.perf_counter() - t0:.1f}s")
    return tok
