"""The official CALM checkpoint format (shaochenze/calm, the released ``cccczshao/CALM-*`` models),
read and written in plain PyTorch: names, configs and the few tensors whose layout differs.

Three official classes, told apart by ``architectures`` in config.json (``model_type`` is missing
from the CALM and AE configs):

    Autoencoder        -> RUN/ae        (calm_core.autoencoder.ChunkAutoencoder)
    EnergyTransformer  -> RUN/calm      (calm_core.calm_model.CALM, head.arch=paper; holds a copy of
                                         the AE under ``ae_model.``)
    LlamaForCausalLM   -> RUN/baseline  (calm_core.baseline.TokenLM with its own lm_head)

Every tensor maps by a ``Rule``: project names <- ``join`` (official tensors), and back by
``split``. Most rules are renames; the others are exact re-layouts, so official -> project ->
official is bit for bit:

    q_proj, k_proj, v_proj [Hq*h | Hkv*h | Hkv*h, d]  <->  attn.qkv      (rows concatenated)
    mlp_blocks.i.linears.0 [d, 2d] = [W_x | W_c]      <->  in_x (with the bias), in_c (no bias)
    mlp_generator.X == generative_head.X (one module, stored twice)  <->  head.X
    decoder.lm_head_weight == encoder.embed_tokens (tied; a safetensors copy drops it)  <->  embed

What the official code computes differently is configuration here (``official_config``): RMSNorm
and LayerNorm eps 1e-6, rotate-half RoPE (``model.rope_pairing=halves``), no clamp of the AE's
log sigma, the baseline's untied lm_head, uniform head noise, ``beta`` -> ``head.alpha``.
docs/OFFICIAL.md has the whole table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from calm_core.config import Config, config_from_dict
from calm_core.errors import ArtifactError

ARCHITECTURES = {"Autoencoder": "ae", "EnergyTransformer": "calm", "LlamaForCausalLM": "baseline"}
KIND_ARCH = {v: k for k, v in ARCHITECTURES.items()}
AE_PREFIX = "ae_model."  # the AE inside a CALM checkpoint
HEAD_PREFIXES = ("mlp_generator.", "generative_head.")  # one module, two attribute names
OFFICIAL_LN_EPS = 1e-6  # nn.LayerNorm(eps=1e-6) in embed_proj and the energy head
OFFICIAL_N_TARGETS = 100  # target draws per position, hard-coded in the official energy loss
CALM_BLOCK_CHUNKS = 2048  # official CALM training blocks: 8192 tokens = 2048 chunks of 4
BASELINE_BLOCK_TOKENS = 2048
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    project: tuple[str, ...]
    official: tuple[str, ...]
    join: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # official tensors -> project tensors
    split: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # project tensors -> official tensors
    optional: tuple[str, ...] = ()  # official names that may be absent (a dropped tie)


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [ts[0]]


def rename(project: str, official: str) -> Rule:
    return Rule((project,), (official,), _same, _same)


def tied(project: str, officials: tuple[str, ...], optional: tuple[str, ...] = ()) -> Rule:
    """One project tensor stored under several official names (shared storage): all must be equal."""

    def join(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        for name, t in zip(officials[1:], ts[1:]):
            if t.shape != ts[0].shape or not torch.equal(t, ts[0]):
                raise ArtifactError(f"'{name}' differs from '{officials[0]}' (the official model stores one tensor "
                                    "under both names); the checkpoint is not a consistent official one")
        return [ts[0]]

    return Rule((project,), officials, join, lambda ps: [ps[0]] * len(officials), optional)


def _mlp(project: str, official: str) -> list[Rule]:
    """A SwiGLU MLP: gate/up/down_proj <-> w1/w3/w2."""
    return [rename(f"{project}.w1.weight", f"{official}.gate_proj.weight"),
            rename(f"{project}.w3.weight", f"{official}.up_proj.weight"),
            rename(f"{project}.w2.weight", f"{official}.down_proj.weight")]


def _linear(project: str, official: str, bias: bool = True) -> list[Rule]:
    rules = [rename(f"{project}.weight", f"{official}.weight")]
    return rules + [rename(f"{project}.bias", f"{official}.bias")] if bias else rules


def ae_rules(cfg: Config, prefix: str = "") -> list[Rule]:
    """The official Autoencoder's names (under ``prefix``) for ChunkAutoencoder's tensors."""
    n = cfg.ae.token_blocks
    if cfg.ae.latent_blocks != n:
        raise ArtifactError(f"the official AE has as many per-token as per-chunk layers; ae.token_blocks {n} != "
                            f"ae.latent_blocks {cfg.ae.latent_blocks} cannot be exported")
    e, d = f"{prefix}encoder.", f"{prefix}decoder."
    rules = [tied("embed.weight", (f"{e}embed_tokens.weight", f"{d}lm_head_weight"), optional=(f"{d}lm_head_weight",))]
    for side, src, first, second in (("enc", e + "encoder_layers", "tok", "lat"), ("dec", d + "decoder_layers", "lat", "tok")):
        for i in range(2 * n):  # official layers 0..n-1 form the first stage, n..2n-1 the second
            stage, j = (first, i) if i < n else (second, i - n)
            rules += _mlp(f"{side}_{stage}.{j}.mlp", f"{src}.{i}.mlp")
            rules.append(rename(f"{side}_{stage}.{j}.norm.weight", f"{src}.{i}.layernorm.weight"))
    rules += _linear("enc_compress", e + "squeeze_layer") + [rename("enc_norm.weight", e + "norm.weight")]
    rules += _linear("enc_out", e + "hidden_to_latent") + _linear("dec_in", d + "latent_to_hidden")
    rules += _linear("dec_expand", d + "expand_layer") + [rename("dec_norm.weight", d + "norm.weight")]
    return rules


def _backbone_rules(cfg: Config, prefix: str) -> list[Rule]:
    """A Llama stack (``prefix`` "transformer." or "model.") for calm_core.transformer.Backbone."""
    m = cfg.model
    h = m.d_model // m.n_heads
    sizes = [m.n_heads * h, (m.n_kv_heads or m.n_heads) * h, (m.n_kv_heads or m.n_heads) * h]
    rules = []
    for i in range(m.n_layers):
        b, o = f"backbone.blocks.{i}.", f"{prefix}layers.{i}."
        qkv = tuple(f"{o}self_attn.{x}_proj.weight" for x in "qkv")
        rules.append(Rule((b + "attn.qkv.weight",), qkv, lambda ts: [torch.cat(ts, 0)],
                          lambda ps, s=sizes: [t.clone() for t in ps[0].split(s, 0)]))  # own storage each, as official
        rules.append(rename(b + "attn.out.weight", o + "self_attn.o_proj.weight"))
        rules += _mlp(b + "mlp", o + "mlp")
        rules += [rename(b + "attn_norm.weight", o + "input_layernorm.weight"),
                  rename(b + "mlp_norm.weight", o + "post_attention_layernorm.weight")]
    return rules + [rename("backbone.norm.weight", prefix + "norm.weight")]


def _head_rules(cfg: Config) -> list[Rule]:
    """The official MLPGenerator, stored under both of its names, for PaperEnergyHead."""
    d = cfg.model.d_model

    def both(project: str, official: str) -> Rule:  # a deduplicating save (safetensors) keeps one of the two
        names = tuple(p + official for p in HEAD_PREFIXES)
        return tied(project, names, optional=names)

    pairs = [("noise", "noise_embd"), ("cond", "hidden_embd"), ("noise_norm", "norm_noise"),
             ("cond_norm", "norm_hidden"), ("out_norm", "final_layer.in_ln"),
             ("out_hidden", "final_layer.linears.0"), ("out", "final_layer.linears.2")]
    for i in range(cfg.head.blocks):
        pairs += [(f"blocks.{i}.norm", f"mlp_blocks.{i}.in_ln"), (f"blocks.{i}.mid", f"mlp_blocks.{i}.linears.2"),
                  (f"blocks.{i}.out", f"mlp_blocks.{i}.linears.4"), (f"blocks.{i}.down", f"mlp_blocks.{i}.down_proj")]
    rules = [both(f"head.{p}.{w}", f"{o}.{w}") for p, o in pairs for w in ("weight", "bias")]
    for i in range(cfg.head.blocks):  # Linear(2d, d) on concat(LN(x), c): its columns [x half | c half]
        w = tuple(f"{p}mlp_blocks.{i}.linears.0.weight" for p in HEAD_PREFIXES)
        rules.append(Rule((f"head.blocks.{i}.in_x.weight", f"head.blocks.{i}.in_c.weight"), w,
                          lambda ts, w=w: list(tied("_", w).join(ts)[0].split(d, 1)),
                          lambda ps: [torch.cat(ps, 1)] * 2, optional=w))
        rules.append(both(f"head.blocks.{i}.in_x.bias", f"mlp_blocks.{i}.linears.0.bias"))
    return rules


def calm_rules(cfg: Config) -> list[Rule]:
    rules = [rename("token_in.embed.weight", "transformer.embed_tokens.weight")]
    rules += _linear("token_in.mlp.0", "embed_proj.0") + _linear("token_in.mlp.2", "embed_proj.2")
    rules += _linear("token_in.norm", "embed_proj.3")
    return rules + _backbone_rules(cfg, "transformer.") + _head_rules(cfg)


def baseline_rules(cfg: Config) -> list[Rule]:
    rules = [rename("embed.weight", "model.embed_tokens.weight")] + _backbone_rules(cfg, "model.")
    return rules + ([] if cfg.model.tie_embeddings else [rename("lm_head.weight", "lm_head.weight")])


def rules_for(kind: str, cfg: Config) -> list[Rule]:
    return {"ae": ae_rules, "calm": calm_rules, "baseline": baseline_rules}[kind](cfg)


# ----------------------------------------------------------------------------- configs


def _need(conf: dict, key: str, where: str):
    if key not in conf:
        raise ArtifactError(f"{where}: config.json lacks '{key}'; is this an official CALM checkpoint?")
    return conf[key]


def architecture(conf: dict, where: str) -> str:
    """config.json -> "ae" | "calm" | "baseline" (from ``architectures``: ``model_type`` is unreliable)."""
    archs = conf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ArtifactError(f"{where}: architectures {archs} is not one this project implements (supported: "
                            f"{', '.join(ARCHITECTURES)}; the official flow and diffusion heads are not)")
    return ARCHITECTURES[archs[0]]


def _check_plain(conf: dict, where: str) -> None:
    """Official settings the project's models do not express: refused by name, never ignored."""
    checks = {"hidden_act": "silu", "mlp_bias": False, "attention_bias": False, "rope_scaling": None,
              "pretraining_tp": 1}
    for key, want in checks.items():
        if key in conf and conf[key] != want:
            raise ArtifactError(f"{where}: config.json sets {key}={conf[key]!r}; only {want!r} is implemented")


def ae_settings(conf: dict, where: str) -> dict:
    """The ``ae`` config section of an official Autoencoder config."""
    _check_plain(conf, where)
    n_enc, n_dec = int(_need(conf, "num_encoder_layers", where)), int(_need(conf, "num_decoder_layers", where))
    if n_enc % 2 or n_dec != n_enc:
        raise ArtifactError(f"{where}: num_encoder_layers {n_enc} / num_decoder_layers {n_dec}: only equal, even "
                            "counts are implemented (the official code ignores the last layer of an odd count)")
    return {"K": int(_need(conf, "patch_size", where)), "latent_dim": int(_need(conf, "latent_size", where)),
            "d_model": int(_need(conf, "hidden_size", where)), "ffn_dim": int(_need(conf, "intermediate_size", where)),
            "token_blocks": n_enc // 2, "latent_blocks": n_enc // 2, "beta": float(conf.get("kl_weight", 1e-3)),
            "kl_clip": float(conf.get("kl_clamp", 0.5)), "mask_prob": 0.15,
            "latent_dropout": float(conf.get("ae_dropout", 0.15)), "norm_eps": float(conf.get("rms_norm_eps", 1e-6)),
            "clamp_log_sigma": False}


def ae_settings_from_shapes(shapes: dict[str, tuple[int, ...]], calm_conf: dict, where: str) -> dict:
    """The AE section from the ``ae_model.*`` tensor shapes inside a CALM checkpoint (its config
    does not hold them; rms eps then is the official default 1e-6)."""
    try:
        V, d = shapes[AE_PREFIX + "encoder.embed_tokens.weight"]
        ffn = shapes[AE_PREFIX + "encoder.encoder_layers.0.mlp.gate_proj.weight"][0]
        two_l = shapes[AE_PREFIX + "encoder.hidden_to_latent.weight"][0]
    except KeyError as e:
        raise ArtifactError(f"{where}: no --ae given and the CALM checkpoint holds no AE copy ({e.args[0]} missing); "
                            "pass the autoencoder's directory with --ae") from None
    n = len({k.split(".")[3] for k in shapes if k.startswith(AE_PREFIX + "encoder.encoder_layers.")})
    K = int(_need(calm_conf, "patch_size", where))
    return ae_settings({"num_encoder_layers": n, "num_decoder_layers": n, "patch_size": K, "latent_size": two_l // 2,
                        "hidden_size": d, "intermediate_size": ffn, "vocab_size": V}, where)


def model_settings(conf: dict, where: str, kind: str, K: int) -> dict:
    """The ``model`` section (and ``head`` for CALM) of an official CALM or Llama config."""
    _check_plain(conf, where)
    heads, kv = int(_need(conf, "num_attention_heads", where)), int(conf.get("num_key_value_heads") or 0)
    m = {"d_model": int(_need(conf, "hidden_size", where)), "n_layers": int(_need(conf, "num_hidden_layers", where)),
         "n_heads": heads, "n_kv_heads": 0 if kv in (0, heads) else kv,
         "ffn_dim": int(_need(conf, "intermediate_size", where)), "rope_theta": float(conf.get("rope_theta", 10000.0)),
         "norm_eps": float(conf.get("rms_norm_eps", 1e-6)), "layernorm_eps": OFFICIAL_LN_EPS, "rope_pairing": "halves",
         "input_mode": "tokens",
         "block_chunks": CALM_BLOCK_CHUNKS if kind == "calm" else max(1, BASELINE_BLOCK_TOKENS // K),
         "tie_embeddings": bool(conf.get("tie_word_embeddings", False))}
    out = {"model": m}
    if kind == "calm":
        out["head"] = {"kind": "energy", "arch": "paper", "init": "normal", "noise": "uniform",
                       "noise_dim": int(_need(conf, "noise_size", where)), "blocks": int(_need(conf, "num_mlp_layers", where)),
                       "n_samples": int(conf.get("num_samples", 8)), "n_targets": OFFICIAL_N_TARGETS,
                       "alpha": float(conf.get("beta", 1.0)), "layernorm_eps": OFFICIAL_LN_EPS}
    return out


def official_config(base: Config, ae: dict, model: dict | None = None) -> Config:
    """``base`` with its ae / model / head sections replaced by official settings (validated), and
    the official packed layout unless ``base`` names a layout itself."""
    d = base.to_dict()
    d["ae"] = {**d["ae"], **ae}
    if d["data"]["layout"] == "auto":
        d["data"]["layout"] = "packed"  # the official code's tokenize_function + group_texts
    for section, values in (model or {}).items():
        d[section] = {**d[section], **values}
    return config_from_dict(d, "official config")


def export_config(kind: str, cfg: Config, vocab: int, ids: dict[str, int | None], ae_path: str = "") -> dict:
    """The official config.json of a project model (the fields the official classes read)."""
    a, m, h = cfg.ae, cfg.model, cfg.head
    common = {"architectures": [KIND_ARCH[kind]], "hidden_act": "silu", "initializer_range": 0.02,
              "max_position_embeddings": 2048, "mlp_bias": False, "pretraining_tp": 1, "torch_dtype": "float32",
              "vocab_size": vocab, "tie_word_embeddings": False}
    special = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad")}
    if kind == "ae":
        return {**common, **special, "ae_dropout": a.latent_dropout, "hidden_size": a.d_model,
                "intermediate_size": a.ffn_dim, "kl_clamp": a.kl_clip, "kl_weight": a.beta, "latent_size": a.latent_dim,
                "num_decoder_layers": 2 * a.token_blocks, "num_encoder_layers": 2 * a.token_blocks, "patch_size": a.K,
                "rms_norm_eps": a.norm_eps}
    llama = {"attention_bias": False, "attention_dropout": 0.0, "hidden_size": m.d_model,
             "intermediate_size": m.ffn_dim, "num_attention_heads": m.n_heads,
             "num_hidden_layers": m.n_layers, "num_key_value_heads": m.n_kv_heads or m.n_heads, "rms_norm_eps": m.norm_eps,
             "rope_scaling": None, "rope_theta": m.rope_theta, "use_cache": True}
    if kind == "calm":
        return {**common, **special, **llama, "ae_path": ae_path, "beta": h.alpha, "latent_size": a.latent_dim,
                "noise_size": h.noise_dim, "num_mlp_layers": h.blocks, "num_samples": h.n_samples, "patch_size": a.K}
    return {**common, **special, **llama, "model_type": "llama", "tie_word_embeddings": m.tie_embeddings}


def check_exportable(kind: str, cfg: Config) -> None:
    """Models whose computation the official classes cannot reproduce are refused, by setting."""
    m, h = cfg.model, cfg.head
    bad = []
    if kind == "ae" and cfg.ae.clamp_log_sigma:
        bad.append("ae.clamp_log_sigma=true (the official AE has no clamp)")
    if kind in ("calm", "baseline") and m.rope_pairing != "halves":
        bad.append(f"model.rope_pairing={m.rope_pairing} (official: halves)")
    if kind == "calm":
        if h.kind != "energy" or h.arch != "paper":
            bad.append(f"head {h.kind}/{h.arch} (official: energy/paper)")
        if h.noise != "uniform":
            bad.append(f"head.noise={h.noise} (official: uniform)")
        if h.width_ratio != 1.0:
            bad.append(f"head.width_ratio={h.width_ratio} (official: the head is as wide as the backbone)")
        if m.input_mode != "tokens":
            bad.append(f"model.input_mode={m.input_mode} (official: tokens)")
        if m.layernorm_eps != h.layernorm_eps:
            bad.append("model.layernorm_eps != head.layernorm_eps (official: one eps)")
    if kind == "baseline" and m.tie_embeddings:
        bad.append("model.tie_embeddings=true (official baselines have their own lm_head)")
    if bad:
        raise ArtifactError(f"the {kind} model cannot be written in the official format: {'; '.join(bad)}")


# ----------------------------------------------------------------------------- reading weights


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"'{path}' is not readable JSON ({str(e)[:100]})") from None


def read_config(directory: Path) -> dict:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise ArtifactError(f"'{directory}' has no config.json; point at an official checkpoint directory")
    return _read_json(p)


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in order: one file, or the shards an index lists."""
    d = Path(directory)
    for name in WEIGHT_FILES:
        index = d / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise ArtifactError(f"'{index}' lists no shards")
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise ArtifactError(f"'{index}' lists shard '{missing[0]}', which is not in '{d}'")
            return [d / s for s in shards]
        if (d / name).is_file():
            return [d / name]
    raise ArtifactError(f"'{d}' holds no weights (none of {', '.join(WEIGHT_FILES)} or their .index.json)")


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """One weights file -> {name: tensor}. A .bin is read with ``torch.load(weights_only=True)``, which
    refuses anything but tensors and plain containers (never a plain unpickle)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"'{path}' is not a readable safetensors file ({str(e)[:100]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle's UnpicklingError, zip errors, ...
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        why = next((x for x in lines if "Unsupported global" in x or "Unsupported operand" in x), lines[0] if lines else "")
        raise ArtifactError(f"'{path}' is not a plain state dict: torch.load(weights_only=True) refuses it "
                            f"({why[:160]}); objects in a checkpoint are never unpickled here") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ArtifactError(f"'{path}' does not hold a flat {{name: tensor}} state dict")
    return state


def iter_official(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of a checkpoint, one shard in memory at a time."""
    for path in weight_files(directory):
        yield from read_shard(path).items()


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes without keeping the tensors (safetensors headers; a .bin is memory-mapped)."""
    out: dict[str, tuple[int, ...]] = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            out.update({k: tuple(v.shape) for k, v in read_shard(path).items()})
    return out


# ----------------------------------------------------------------------------- conversion


def expected_official(rules: list[Rule], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The official names and shapes a project model of these (project) ``shapes`` has."""
    out = {}
    for r in rules:
        metas = [torch.empty(shapes[p], device="meta") for p in r.project]
        out.update({o: tuple(t.shape) for o, t in zip(r.official, r.split(metas))})
    return out


def to_project(items: Iterator[tuple[str, torch.Tensor]], rules: list[Rule], shapes: dict[str, tuple[int, ...]],
               where: str, skip: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
    """Official (name, tensor) pairs -> the project's state dict. Names are checked as they come (an
    unknown one is refused by name, a wrong shape with both shapes), and each rule is applied as soon
    as its tensors are all there, so a sharded checkpoint is converted shard by shard."""
    want = expected_official(rules, shapes)
    owner = {o: r for r in rules for o in r.official}
    pending: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}

    def apply(r: Rule) -> None:  # an absent optional name: another copy of the same tensor stands in
        present = next(pending[o] for o in r.official if o in pending)
        ts = [pending.get(o, present) for o in r.official]
        out.update(zip(r.project, r.join(ts)))
        for o in r.official:
            pending.pop(o, None)

    for name, t in items:
        if skip(name):
            continue
        if name not in want:
            raise ArtifactError(f"{where}: unexpected key '{name}' (not part of the model its config.json describes)")
        if tuple(t.shape) != want[name]:
            raise ArtifactError(f"{where}: '{name}' has shape {tuple(t.shape)}, the config needs {want[name]}")
        if not t.is_floating_point():
            raise ArtifactError(f"{where}: '{name}' is {t.dtype}, not a floating-point weight")
        pending[name] = t
        r = owner[name]
        if all(o in pending for o in r.official):
            apply(r)
    for r in rules:
        if any(p in out for p in r.project):
            continue
        missing = [o for o in r.official if o not in pending and o not in r.optional]
        if missing or not any(o in pending for o in r.official):
            missing = missing or list(r.official)
            raise ArtifactError(f"{where}: missing key '{missing[0]}'")
        apply(r)  # only optional names were absent (the dropped AE tie: its embedding stands in)
    return out


def to_official(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The project's state dict -> official names (tensors under two names share storage)."""
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        out.update(zip(r.official, r.split([state[p] for p in r.project])))
    return out
