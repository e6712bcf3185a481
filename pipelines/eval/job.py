"""The evaluation job: every model of a run scored on any corpus -> RUN/eval/NAME/.

    corpus --Ray Data: read, tokenise, chunk in the models' layout (packed under the paper protocol),
        encode (the training code: precompute_latents)--> RUN/eval/_corpora/NAME/latents
    per context L (each model's trained one, or eval.block_chunks): blocks of L chunks (LatentBlocks,
        each with a key) --Ray Data actors (Scorer: the models of that context loaded once per actor;
        pipelines.eval.scores)--> per-block sums --driver--> report (pipelines.eval.report)

RUN/eval/NAME holds report.json, report.md and PNG plots, published with a manifest whose identity
(the models' and the AE's file hashes, the corpus latents' identity, the evaluation settings) makes
a rerun with the same inputs a no-op and a changed model or corpus a fresh evaluation.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from calm_core.artifacts import MODEL_KINDS
from calm_core.chunking import layout_of
from calm_core.config import Config, config_from_yaml, eval_protocol
from calm_core.tokenizer import CalmTokenizer
from calm_core.errors import ArtifactError, ConfigError, DataError
from pipelines.claim import Spot, claim
from pipelines.data import latents as LT
from pipelines.progress import progress
from pipelines.storage import RunDir

RESERVED = ("_corpora", "ae_reconstruction")


class Scorer:
    """Ray Data actor: loads the AE and the models once, scores batches of blocks."""

    def __init__(self, run: str, kinds: list[str], band: bytes, ev: dict, device: str, threads: int, ae: bool = True):
        import torch

        from calm_core.config import EvalConfig
        from pipelines.eval.scores import Models

        torch.set_num_threads(max(1, threads))
        rd = RunDir(run)
        self.models = Models.load({k: rd.local_artifact(k) for k in ("ae", *kinds)}, unpack_bands(band), device)
        self.ev, self.ae = EvalConfig(**ev), ae

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.eval.scores import score_blocks

        return score_blocks(self.models, batch, self.ev, self.ae)


def run_models(run: RunDir) -> tuple[list[str], list[str]]:
    """(models this run holds, models it lacks) among CALM and the baseline; the AE is required."""
    kinds = [k for k in MODEL_KINDS if run.has_artifact(k)]
    if not kinds:
        raise ArtifactError(f"'{run.uri()}' holds no trained model to evaluate (neither calm/ nor baseline/); "
                            "run jobs/stage2.py or jobs/baseline.py first")
    if not run.has_artifact("ae"):
        raise ArtifactError(f"'{run.uri('ae')}' is missing: the evaluation chunks and encodes the corpus with the "
                            "run's autoencoder; run jobs/stage1.py first")
    return kinds, [k for k in MODEL_KINDS if k not in kinds]


def model_config(run: RunDir, kind: str) -> Config:
    return config_from_yaml(run.read_text(kind, "config.yaml"), kind)


def contexts(run: RunDir, kinds: list[str], cfg: Config) -> dict[str, int]:
    """Each model's context in chunks: eval.block_chunks for every model, else its own trained
    model.block_chunks (the released CALMs 2,048 chunks = 8,192 tokens, the baseline 2,048 tokens)."""
    return {k: cfg.eval.block_chunks or model_config(run, k).model.block_chunks for k in kinds}


def eval_layout(run: RunDir, kinds: list[str], cfg: Config) -> str:
    """The layout the corpus is cut in (``calm_core.chunking``): data.layout when set, else packed for
    the paper's protocol (the official evaluation), else the layout the models were trained on."""
    if cfg.data.layout != "auto":
        return cfg.data.layout
    if cfg.eval.protocol == "paper":
        return "packed"
    trained = {k: layout_of(model_config(run, k).data.layout) for k in kinds}
    if len(set(trained.values())) > 1:
        raise ConfigError(f"the run's models were trained on different layouts ({trained}); set data.layout to the "
                          "one to evaluate on")
    return next(iter(trained.values()))


def token_counts(run: RunDir, vocab: int, cpus: float) -> np.ndarray | None:
    """Token counts [V] over the training split of RUN/latents (what the models were trained on), or
    None when the run has no latents."""
    if not run.has_artifact(LT.ARTIFACT):
        return None
    ds, _ = LT.read_latents(run, "train")

    def count(batch):
        tok = LT.column_matrix(batch, "tokens").astype(np.int64).ravel()
        return {"counts": np.bincount(tok, minlength=vocab)[None, :vocab]}

    parts = ds.select_columns(["tokens"]).map_batches(count, batch_format="pyarrow", num_cpus=cpus).take_all()
    return np.sum([p["counts"] for p in parts], axis=0) if parts else np.zeros(vocab, dtype=np.int64)


def bands_of(counts: np.ndarray | None, vocab: int, edges: list[int]) -> tuple[np.ndarray, str]:
    import torch

    from calm_core.agreement import frequency_bands

    if counts is None:  # the BPE's id order stands in (merges are learnt most frequent first)
        counts, source = np.arange(vocab, 0, -1, dtype=np.int64), "token id order (the run has no training latents)"
    else:
        source = "token counts of the training split (RUN/latents)"
    return frequency_bands(torch.as_tensor(counts), tuple(edges)).numpy(), source


def pack_bands(band: np.ndarray) -> bytes:
    """The band of every token id [V] as a few compressed bytes: the scoring actors' constructor
    argument stays small enough to travel inline with the actor's creation (a large one would sit
    in the object store, and an actor restarted after it is gone could not be rebuilt)."""
    return zlib.compress(np.asarray(band, dtype=np.int8).tobytes())  # bands: len(band_edges) + 1 < 128


def unpack_bands(blob: bytes) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=np.int8).astype(np.int64)  # a writable copy


# A scoring actor of the demo run (CALM 9.3M parameters, V = 4,096, L = 64, 8 samples) peaked at 512 / 795 /
# 1,063 MB RSS at 2 / 8 / 16 blocks per call alone, 1.5 GiB as a Ray Data actor at 8 blocks. CALM's decoding
# holds DECODE_BYTES of logits at most; the baseline's teacher-forced pass 3 x L*K x V x 4 bytes per block
# (logits, log-probabilities, probabilities: 3.2 GB at the released vocabulary); docs/EVALUATION.md "Memory".
SCORER_BASE_MB = 1600  # Ray Data's high-memory check asks for 1.25x the peak: 1,867 MiB for the demo


def scorer_memory_mb(ev, weights_bytes: int, L: int, K: int, vocab: int, baseline: bool = True) -> int:
    """What a scoring actor reserves (eval.actor_memory_mb, or when 0: the base process, the weights twice,
    CALM's decoding slices twice, and when it scores the baseline its teacher-forced pass over the batch)."""
    from calm_core.autoencoder import DECODE_BYTES

    if ev.actor_memory_mb:
        return int(ev.actor_memory_mb)
    teacher = ev.batch_blocks * L * K * vocab * 4 * 3 if baseline else 0
    return int(SCORER_BASE_MB + (2 * weights_bytes + 2 * DECODE_BYTES + teacher) / 2**20)


def tokens_per_char(lman: dict, split: str) -> float:
    chars = lman["inputs"]["corpus"]["characters"].get(split, 0)
    return lman["metrics"]["rows_per_split"].get(split, 0) * lman["identity"]["K"] / max(chars, 1)


def check_vocabulary(run: RunDir, lman: dict, corpus: str) -> None:
    """A corpus the run's tokenizer can only spell byte by byte (another script or vocabulary) is
    refused: over 3x the tokens per character of the training text (chunk padding included)."""
    if not run.has_artifact(LT.ARTIFACT):
        return
    seen, here = tokens_per_char(run.read_json(LT.ARTIFACT, "manifest.json"), "train"), tokens_per_char(lman, "val")
    if seen and here > 3 * seen:
        raise DataError(f"the run's tokenizer spells '{corpus}' with {here:.2f} tokens per character against "
                        f"{seen:.2f} on its training text: mostly bytes it never merged (another language or "
                        "vocabulary); evaluate on text like the training corpus")


def scored_documents(cfg: Config, run: RunDir, layout: str) -> Config:
    """The config whose "val" split is what gets scored, cut in ``layout``: every document
    (eval.split=all), or those the run's own split rule held out of training (eval.split=heldout:
    the run's data.val_fraction and data.split_salt, from the CALM or baseline config it was trained
    with)."""
    if cfg.eval.split == "all":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=1.0, layout=layout))
    kind = next(k for k in MODEL_KINDS if run.has_artifact(k))
    trained = model_config(run, kind).data
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=trained.val_fraction,
                                                             split_salt=trained.split_salt, layout=layout))


def identity(run: RunDir, kinds: list[str], lman: dict, cfg: Config, Ls: dict[str, int]) -> dict[str, Any]:
    ev = dataclasses.asdict(cfg.eval)
    for k in ("actors", "cpus_per_actor", "threads_per_actor", "use_gpu", "batch_blocks",
              "actor_memory_mb"):  # where, not what
        ev.pop(k)
    return {"models": {k: run.read_json(k, "manifest.json").get("files") for k in ("ae", *kinds)},
            "corpus_latents": lman["identity"], "context_chunks": Ls, "eval": ev}


@dataclasses.dataclass
class Pass:
    """The models scored together on blocks of one context: their per-block rows."""

    kinds: list[str]
    L: int
    rows: list[dict]
    seconds: float


def evaluate(cfg: Config, run: RunDir, corpus: str, name: str, overwrite: bool = False) -> dict[str, Any]:
    """Score every model of RUN on CORPUS; returns the report (RUN/eval/NAME/report.json)."""
    from pipelines.data.precompute import precompute_latents
    from pipelines.eval.report import build_report, publish

    if not name or "/" in name or name.startswith(".") or name in RESERVED:
        raise ArtifactError(f"--name '{name}' cannot name an evaluation (a plain folder name, not {RESERVED})")
    cfg = dataclasses.replace(cfg, eval=eval_protocol(cfg.eval))
    kinds, missing = run_models(run)
    progress(f"[eval] models: {', '.join(kinds)}" + (f"; not in this run: {', '.join(missing)}" if missing else ""))
    Ls, layout = contexts(run, kinds, cfg), eval_layout(run, kinds, cfg)
    which = "eval.block_chunks" if cfg.eval.block_chunks else "each model's trained context"
    progress(f"[eval] contexts ({which}): " + ", ".join(f"{k} {L:,} chunks" for k, L in Ls.items())
             + f"; the {layout} layout")
    if cfg.eval.protocol == "paper":
        progress(f"[eval] the paper's protocol: {cfg.eval.samples} samples per position, the baseline's official "
                 "estimator at every token position, BrierLM also with the official clamp of the product")
    data = RunDir(run.uri("eval", "_corpora", name))
    lman = precompute_latents(scored_documents(cfg, run, layout), corpus, data, ae_path=str(run.local_artifact("ae")),
                              overwrite=overwrite, replace_stale=True, splits=("val",))
    chunks = lman["metrics"]["rows_per_split"].get("val", 0)
    for k, L in Ls.items():
        if chunks < L:
            which = "held-out documents make" if cfg.eval.split == "heldout" else "makes"
            raise DataError(f"'{corpus}' {which} {chunks} chunks; scoring {k} needs blocks of {L} (eval.block_chunks, "
                            "or a longer corpus)")
    check_vocabulary(run, lman, corpus)
    ident = identity(run, kinds, lman, cfg, Ls)
    spot = Spot(run, f"eval/{name}", record=None, label="eval", what="an evaluation",
                remedy="pass --overwrite to redo it, or use another --name")
    done = claim(spot, ident, lambda m: "report.json" if m.get("identity") == ident else None, overwrite=overwrite,
                 replace_stale=True, hint="--overwrite redoes it")
    if done is not None:
        return run.read_json("eval", name, "report.json")
    vocab = CalmTokenizer.from_str(run.read_text("ae", "tokenizer.json")).vocab_size
    band, source = bands_of(token_counts(run, vocab, cfg.data.read_cpus), vocab, cfg.eval.band_edges)
    passes = []
    for L in sorted(set(Ls.values()), reverse=True):  # the models of one context in one pass; the AE's once
        group = [k for k in kinds if Ls[k] == L]
        rows, seconds = score(cfg, run, data, lman, group, L, band, source, vocab, ae=not passes)
        passes.append(Pass(group, L, rows, seconds))
    report = build_report(passes, cfg, run, corpus, lman, kinds, missing, source, layout)
    with tempfile.TemporaryDirectory() as tmp:
        uri = publish(report, run, Path(tmp), f"eval/{name}", ident)
    progress(f"[eval] wrote {uri} (report.json, report.md, plots)")
    return report


def check_fits(ev) -> None:
    """Refuse scoring actors that would hold the CPUs Ray Data needs to read the blocks: its file
    listing task takes 1 CPU, and it waits for ever behind actors that hold all but less than 1."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = 0.0 if ev.use_gpu else ev.actors * ev.cpus_per_actor
    if held > total - 1:
        raise ConfigError(f"eval.actors x eval.cpus_per_actor = {ev.actors} x {ev.cpus_per_actor} CPUs leaves "
                          f"{max(0.0, total - held):g} of the cluster's {total:g} CPUs, and reading the blocks needs "
                          f"1: lower eval.cpus_per_actor to {max(0.0, (total - 1) / ev.actors):g} or less (torch "
                          "threads per actor: eval.threads_per_actor)")


def score(cfg: Config, run: RunDir, data: RunDir, lman: dict, kinds: list[str], L: int, band: np.ndarray,
          source: str, vocab: int, ae: bool = True) -> tuple[list[dict], float]:
    """Per-block rows of every block of L chunks (up to eval.max_blocks) scored by ``kinds`` (and,
    with ``ae``, the AE) in eval.actors actors, and the seconds it took."""
    import ray

    ev = cfg.eval
    ds, _ = LT.read_latents(data, "val", num_cpus=cfg.data.read_cpus)
    blocks = LT.latent_blocks(ds, lman, L, num_cpus=cfg.data.read_cpus)
    if ev.max_blocks:
        blocks = blocks.limit(ev.max_blocks)
    if ev.actors > 1:  # enough Ray blocks for every actor to get work (a small corpus is one block)
        blocks = blocks.repartition(4 * ev.actors)
    check_fits(ev)
    device = "cuda" if ev.use_gpu else "cpu"
    weights = sum(size for k in ("ae", *kinds) for name, size in run.list_files(k) if name.endswith(".safetensors"))
    mem_mb = scorer_memory_mb(ev, weights, L, lman["identity"]["K"], vocab, "baseline" in kinds)
    progress(f"[eval] scoring {' and '.join(kinds)} on blocks of {L:,} chunks in {ev.actors} actor(s) x "
             f"{'1 GPU' if ev.use_gpu else f'{ev.cpus_per_actor} CPU'}, {mem_mb:,} MB each "
             f"({'eval.actor_memory_mb' if ev.actor_memory_mb else 'estimated; eval.actor_memory_mb sets it'}); "
             f"frequency bands from {source}")
    t0 = time.perf_counter()
    scored = blocks.map_batches(
        Scorer, fn_constructor_kwargs={"run": run.uri(), "kinds": kinds, "band": pack_bands(band),
                                       "ev": dataclasses.asdict(ev), "device": device,
                                       "threads": ev.threads_per_actor or max(1, round(ev.cpus_per_actor)), "ae": ae},
        batch_size=ev.batch_blocks, compute=ray.data.ActorPoolStrategy(size=ev.actors), num_cpus=ev.cpus_per_actor,
        num_gpus=1 if ev.use_gpu else 0, memory=mem_mb * 2**20)
    rows: list[dict] = []
    last = t0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["key"])
        rows += [{k: v[i] for k, v in batch.items()} for i in range(n)]
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            progress(f"[eval] {len(rows):,} blocks scored{f' of at most {ev.max_blocks:,}' if ev.max_blocks else ''} "
                     f"({len(rows) * L * lman['identity']['K'] / (last - t0):,.0f} tokens/s)")
    seconds = time.perf_counter() - t0
    progress(f"[eval] scored {len(rows):,} blocks ({len(rows) * L * lman['identity']['K']:,} tokens) in {seconds:.1f}s")
    return rows, seconds
