"""The trained artifacts in plain PyTorch: RUN/ae, RUN/calm and RUN/baseline, written and read.

A trained artifact is one folder (``calm_core.checkpoint`` says what a manifest holds):

    model.safetensors   consolidated weights (loads without Ray or DeepSpeed)
    config.yaml         the resolved config that trained it
    tokenizer.json      the run's tokenizer
    metrics.jsonl       one record per validation step
    manifest.json       written last; file hashes, inputs, metrics, ``identity``

Every consumer (training's publish step, the latent precompute, generation, serving, evaluation)
reads these with the functions here, so none of them imports training code. An AE is named by the
sha256 of its weights; latents and the stage-2 models record that name and are refused with
another AE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from calm_core.autoencoder import ChunkAutoencoder, load_autoencoder_dir
from calm_core.baseline import TokenLM, baseline_train_flops_per_token
from calm_core.calm_model import CALM, calm_train_flops_per_token
from calm_core.checkpoint import load_weights, read_manifest, save_weights, sha256_file, write_manifest
from calm_core.config import Config, config_from_yaml
from calm_core.errors import ArtifactError
from calm_core.tokenizer import CalmTokenizer

MODEL_KINDS = ("calm", "baseline")  # the stage-2 models; each artifact is RUN/<kind>


# ----------------------------------------------------------------------------- the stage-2 models


def build_model(kind: str, cfg: Config, vocab_size: int) -> torch.nn.Module:
    """A fresh CALM (backbone + energy head) or the same-backbone token baseline."""
    if kind == "calm":
        return CALM(cfg.model, cfg.head, cfg.ae, vocab_size)
    if kind == "baseline":
        return TokenLM(cfg.model, vocab_size, cfg.ae.K)
    raise ValueError(f"unknown model kind {kind!r} (one of {MODEL_KINDS})")


def flops_breakdown(kind: str, model: torch.nn.Module) -> dict[str, float]:
    """Training FLOPs per token by part; "total" sums them (formulas in calm_model.py, baseline.py)."""
    return calm_train_flops_per_token(model) if kind == "calm" else baseline_train_flops_per_token(model)


# ----------------------------------------------------------------------------- the autoencoder


@dataclass(frozen=True)
class AEArtifact:
    """RUN/ae, loaded: the frozen autoencoder and what names it."""

    path: Path
    model: ChunkAutoencoder
    cfg: Config
    tok: CalmTokenizer
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        """The AE's name: the sha256 of its weights file."""
        return self.manifest.get("files", {}).get("model.safetensors") or sha256_file(self.path / "model.safetensors")

    @property
    def identity(self) -> dict[str, Any]:
        """What latents made by this AE record about it, and what a reader of them compares."""
        return {"ae_sha256": self.sha256, "tokenizer_sha256": self.tok.sha256,
                "K": self.cfg.ae.K, "latent_dim": self.cfg.ae.latent_dim}


def load_ae(directory: str | Path, verify: bool = True) -> AEArtifact:
    """An ``ae`` artifact folder -> AEArtifact (file hashes checked with ``verify``)."""
    model, cfg, tok, manifest = load_autoencoder_dir(directory, verify=verify)
    return AEArtifact(Path(directory), model, cfg, tok, manifest)


# ----------------------------------------------------------------------------- CALM and the baseline


@dataclass(frozen=True)
class ModelArtifact:
    """RUN/calm or RUN/baseline, loaded (model in eval mode)."""

    kind: str
    path: Path
    model: torch.nn.Module
    cfg: Config
    tok: CalmTokenizer
    manifest: dict[str, Any]


def loaded_model(kind: str, cfg: Config, vocab: int, weights: str | Path) -> torch.nn.Module:
    """The model of ``cfg`` holding the weights of a safetensors file: built on the meta device and
    handed the loaded tensors (at the model's dtypes), so the weights are in memory once and nothing
    is initialised at random first (a CALM-M built then loaded held two copies, 3 GB, at its peak)."""
    with torch.device("meta"):
        model = build_model(kind, cfg, vocab)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in load_weights(weights).items()}
    model.load_state_dict(state, assign=True)  # strict: a missing or unknown name is an error
    return model


def load_model(directory: str | Path, kind: str, verify: bool = True,
               expected_ae_sha256: str | None = None, weights: bool = True) -> ModelArtifact:
    """RUN/calm or RUN/baseline -> ModelArtifact; refuses an artifact trained on the latents of
    another AE than ``expected_ae_sha256``. ``weights=False``: the model on the meta device (its
    config, shapes and parameter count, no memory)."""
    d = Path(directory)
    manifest = read_manifest(d, kind=kind) if verify else {}
    made_with = manifest.get("inputs", {}).get("ae_sha256", "?")
    if expected_ae_sha256 and made_with != expected_ae_sha256:
        raise ArtifactError(f"'{d}' was trained on latents of another autoencoder "
                            f"({made_with[:12]}, expected {expected_ae_sha256[:12]})")
    cfg = config_from_yaml((d / "config.yaml").read_text(), str(d / "config.yaml"))
    tok = CalmTokenizer.from_file(d / "tokenizer.json")
    if weights:
        model = loaded_model(kind, cfg, tok.vocab_size, d / "model.safetensors")
    else:
        with torch.device("meta"):
            model = build_model(kind, cfg, tok.vocab_size)
    return ModelArtifact(kind, d, model.eval(), cfg, tok, manifest)


# ----------------------------------------------------------------------------- the one writer


def write_trained(out: str | Path, kind: str, state: dict[str, torch.Tensor] | Path, cfg: Config,
                  tok: CalmTokenizer, records: list[dict], final: dict[str, Any], inputs: dict[str, Any],
                  extra: dict[str, Any], load: Callable[[Path], torch.nn.Module]) -> dict[str, Any]:
    """Write a trained artifact into the empty folder ``out``: the weights (a state dict, or the path
    of a safetensors file to copy), config.yaml, tokenizer.json, metrics.jsonl, then the manifest
    (metrics ``final``). ``load(out)`` must load the weights with plain PyTorch: it proves they do,
    and gives the parameter count."""
    out = Path(out)
    if isinstance(state, Path):
        (out / "model.safetensors").write_bytes(state.read_bytes())
    else:
        save_weights(state, out / "model.safetensors", {"format": "pt"})
    (out / "config.yaml").write_text(cfg.to_yaml())
    tok.save(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = load(out)
    return write_manifest(out, kind, inputs=inputs, metrics=final,
                          extra={"parameters": sum(p.numel() for p in model.parameters()), **extra})


def ae_inputs(cfg: Config, tok: CalmTokenizer, corpus: dict[str, Any]) -> dict[str, Any]:
    """The ``inputs`` of an AE manifest."""
    return {"tokenizer_sha256": tok.sha256, "corpus": corpus, "config_sha256": cfg.section_hash()}


def model_inputs(cfg: Config, tok: CalmTokenizer, ae_sha256: str) -> dict[str, Any]:
    """The ``inputs`` of a CALM or baseline manifest (the AE named by hash)."""
    return {"ae_sha256": ae_sha256, "tokenizer_sha256": tok.sha256, "config_sha256": cfg.section_hash()}
