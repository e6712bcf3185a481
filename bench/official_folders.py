"""Random models in the official CALM checkpoint format and a tokenizer of the official vocabulary
layout: what the benchmarks import (bench_official.py, bench_released.py) where the released
weights are not at hand.

    llama_style_tokenizer(path, vocab, texts)   a real byte-level BPE, then Llama-3's layout scaled to
                                                ``vocab``: <|begin_of_text|> at vocab - 257,
                                                <|end_of_text|> next, 254 reserved specials, [PAD] last
    SCALES["released"]                          CALM-M, its AE and the Transformer baseline as released
    SCALES["tiny"]                              the same three a few MB large (vocabulary 1,025)
    write_models(scale, out)                    out/ae, out/calm, out/baseline: config.json + safetensors
                                                shards + model.safetensors.index.json, as on the Hub

The configs are written by ``calm_core.official.export_config`` and read back by the importer; the
weights are the project's modules, randomly initialised, renamed by ``calm_core.official``'s rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

SPECIALS = 257  # Llama-3's 256 special tokens from id 128,000 on, then the official "[PAD]"
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "[PAD]"


def special_ids(vocab: int) -> dict[str, int]:
    """The official ids in a vocabulary of ``vocab``: 128000 / 128001 / 128256 at 128,257."""
    return {"bos": vocab - SPECIALS, "eos": vocab - SPECIALS + 1, "pad": vocab - 1}


def sample_texts(n: int = 400) -> list[str]:
    """English-like filler text for a tokenizer when no corpus is given (seconds to train on)."""
    import random

    rnd = random.Random(0)
    words = ["the", "king", "queen", "said", "and", "to", "of", "a", "in", "that", "is", "was", "he", "she", "it",
             "with", "for", "as", "his", "her", "on", "be", "at", "by", "this", "had", "not", "but", "from", "or"]
    return [" ".join(rnd.choice(words) + rnd.choice(["", "s", "ed", "ing", "ly", "er"]) for _ in range(50))
            for _ in range(n)]


def llama_style_tokenizer(path: Path, vocab: int, texts: Iterable[str] | None = None, merges: int = 8000) -> Path:
    """A byte-level BPE of up to 256 + ``merges`` tokens trained on ``texts``, filled with ordinary
    tokens no merge produces up to ``vocab - 257``, then the official specials (``special_ids``).

    The filler is ordinary vocabulary, as Llama-3's ids below 128,000 are. As 120k added special
    tokens instead, encoding WikiText-103's test set took 4.3 s instead of 0.77 s (measured), and a
    random model's completions decoded to almost nothing (decoding skips special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab - SPECIALS < 256:
        raise ValueError(f"vocabulary {vocab} leaves no room for the 256 byte tokens and {SPECIALS} specials")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    size = min(256 + merges, vocab - SPECIALS)
    tok.train_from_iterator(texts if texts is not None else sample_texts(),
                            trainers.BpeTrainer(vocab_size=size, min_frequency=2, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())
    words = data["model"]["vocab"]
    words.update({f"<|filler_{i}|>": i for i in range(len(words), vocab - SPECIALS)})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([BOS, EOS, *(f"<|reserved_special_token_{i}|>" for i in range(SPECIALS - 3)), PAD])
    ids = special_ids(vocab)
    got = {"bos": tok.token_to_id(BOS), "eos": tok.token_to_id(EOS), "pad": tok.token_to_id(PAD)}
    if tok.get_vocab_size() != vocab or got != ids:  # the layout the checkpoints' configs name
        raise AssertionError(f"tokenizer layout {tok.get_vocab_size()} {got}, wanted {vocab} {ids}")
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------- the three models


@dataclass(frozen=True)
class Scale:
    """One size of the released trio, as the project's config sections the importer derives."""

    vocab: int
    merges: int  # BPE merges of the tokenizer (the rest up to vocab - 257 is filler)
    ae: dict
    calm: dict  # the `model` section of CALM
    head: dict
    baseline: dict  # the `model` section of the Transformer baseline
    shard_bytes: int  # largest safetensors shard (save_pretrained's max_shard_size)
    published: dict = field(default_factory=dict)  # kind -> (millions of parameters, decimals published)


_AE = {"K": 4, "latent_dim": 128, "d_model": 512, "ffn_dim": 1280, "token_blocks": 1, "latent_blocks": 1,
       "clamp_log_sigma": False}  # num_encoder_layers 2: one per-token + one per-chunk layer each side
_LLAMA = {"rope_pairing": "halves", "layernorm_eps": 1e-6}
_HEAD = {"arch": "paper", "init": "normal", "noise_dim": 64, "layernorm_eps": 1e-6}

SCALES = {
    "released": Scale(
        vocab=128257, merges=8000, ae=_AE,
        calm={"d_model": 1024, "n_layers": 16, "n_heads": 16, "ffn_dim": 2752, **_LLAMA},
        head={**_HEAD, "blocks": 4},
        baseline={"d_model": 768, "n_layers": 12, "n_heads": 16, "ffn_dim": 2048, "tie_embeddings": False, **_LLAMA},
        shard_bytes=500_000_000,
        published={"calm": (371.7, 1), "ae": (75.8, 1), "baseline": (282, 0)}),
    "tiny": Scale(
        vocab=1025, merges=256, ae={**_AE, "latent_dim": 16, "d_model": 32, "ffn_dim": 80},
        calm={"d_model": 64, "n_layers": 4, "n_heads": 4, "ffn_dim": 176, **_LLAMA},
        head={**_HEAD, "noise_dim": 16, "blocks": 1},
        baseline={"d_model": 48, "n_layers": 3, "n_heads": 4, "ffn_dim": 128, "tie_embeddings": False, **_LLAMA},
        shard_bytes=250_000),
}


def scale_configs(scale: Scale):
    """kind -> the project Config each model imports as (calm_core.official.official_config)."""
    from calm_core import official as O
    from calm_core.config import load_config

    base = load_config("demo")
    return {"ae": O.official_config(base, scale.ae),
            "calm": O.official_config(base, scale.ae, {"model": scale.calm, "head": scale.head}),
            "baseline": O.official_config(base, scale.ae, {"model": scale.baseline})}


def build(kind: str, cfg, vocab: int) -> torch.nn.Module:
    """The project's module of ``kind`` (random weights; on the meta device inside ``torch.device("meta")``)."""
    from calm_core.artifacts import build_model
    from calm_core.autoencoder import ChunkAutoencoder

    if kind == "ae":
        return ChunkAutoencoder(cfg.ae, vocab, 0, special_ids(vocab)["pad"])  # mask id 0: the official AE's
    return build_model(kind, cfg, vocab)


def parameter_counts(scale: Scale) -> dict[str, int]:
    """kind -> parameters, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: sum(p.numel() for p in build(k, cfg, scale.vocab).parameters())
                for k, cfg in scale_configs(scale).items()}


def check_published(scale: Scale, counts: dict[str, int]) -> list[str]:
    """The models whose parameter count, rounded as published, is not the published one."""
    return [f"{k}: {counts[k] / 1e6:.{d}f}M, published {m}M" for k, (m, d) in scale.published.items()
            if round(counts[k] / 1e6, d) != m]


def official_state(kind: str, cfg, vocab: int, ae_state: dict | None = None) -> dict[str, torch.Tensor]:
    """A random ``kind`` model under its official names; a CALM carries ``ae_state`` (official AE
    names) under ``ae_model.``, as the official EnergyTransformer does."""
    from calm_core import official as O

    rules = O.ae_rules(cfg) if kind == "ae" else O.rules_for(kind, cfg)
    state = O.to_official(build(kind, cfg, vocab).state_dict(), rules)
    return {**{O.AE_PREFIX + k: v for k, v in (ae_state or {}).items()}, **state}


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage, the first (safetensors cannot hold shared tensors; save_pretrained drops
    the tied copies: here the head's second name and the AE's lm_head_weight, both optional on import)."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def write_folder(out: Path, state: dict[str, torch.Tensor], conf: dict, fmt: str = "safetensors",
                 shards: int = 0, shard_bytes: int = 0, dedupe: bool = True) -> int:
    """config.json and the weights: one file, or ``shards`` files (else cuts at ``shard_bytes``) with
    their ``*.index.json`` as save_pretrained writes them. Returns the weight files' bytes."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    if fmt == "safetensors" and dedupe:
        state = _dedupe(state)
    names = list(state)
    if shards:
        per = -(-len(names) // shards)
        groups = [names[i:i + per] for i in range(0, len(names), per)]
    else:
        groups, size = [[]], 0
        for k in names:
            nbytes = state[k].numel() * state[k].element_size()
            if groups[-1] and shard_bytes and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += nbytes
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}"
        part = {k: state[k] for k in group}
        if fmt == "bin":
            torch.save(part, out / fname)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().clone() for k, v in part.items()}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    total = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".bin", ".safetensors"))
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_models(scale: Scale, out: Path, seed: int = 0) -> dict[str, Path]:
    """out/ae, out/calm (with its AE copy), out/baseline as the Hub holds them, one model in memory at
    a time. The baseline's config keeps Llama's bos/eos 1/2, as the official training script left them."""
    from calm_core import official as O

    cfgs, V, ids = scale_configs(scale), scale.vocab, special_ids(scale.vocab)
    torch.manual_seed(seed)
    ae = official_state("ae", cfgs["ae"], V)
    folders = {k: out / k for k in ("ae", "calm", "baseline")}
    write_folder(folders["ae"], ae, O.export_config("ae", cfgs["ae"], V, ids), shard_bytes=scale.shard_bytes)
    write_folder(folders["calm"], official_state("calm", cfgs["calm"], V, ae),
                 O.export_config("calm", cfgs["calm"], V, ids, "../ae"), shard_bytes=scale.shard_bytes)
    del ae
    write_folder(folders["baseline"], official_state("baseline", cfgs["baseline"], V),
                 O.export_config("baseline", cfgs["baseline"], V, {"bos": 1, "eos": 2}), shard_bytes=scale.shard_bytes)
    return folders
