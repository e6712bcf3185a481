"""Official CALM checkpoints in and out of a run directory (jobs/official.py), over calm_core.official.

    import_official   official AE / CALM / baseline folders + a tokenizer -> RUN/tokenizer, RUN/ae,
                      RUN/calm, RUN/baseline, each with its manifest, as if trained here
    export_official   RUN/ae, RUN/calm, RUN/baseline -> OUT/ae, OUT/calm, OUT/baseline in the official
                      format (pytorch_model.bin + config.json), loadable by the official code, with a
                      model card (README.md) for the Hub
    (parity: pipelines/parity.py)

Folders may be local paths, URIs (``pipelines.storage.fetch_dir``) or Hub repos ``hf://ORG/NAME[@REVISION]``
(``pipelines.hub``, whose resolved commit each manifest records). Weights keep their dtype
(float32 or bfloat16) on the way in and out, so official -> import -> export is bit for bit.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from calm_core import official as O
from calm_core.artifacts import load_ae, load_model, model_inputs, write_trained, flops_breakdown
from calm_core.autoencoder import ChunkAutoencoder, encoder_flops_per_token
from calm_core.calm_model import CALM
from calm_core.baseline import TokenLM
from calm_core.checkpoint import load_weights, sha256_file, write_manifest
from calm_core.config import Config, config_from_yaml
from calm_core.errors import ArtifactError
from calm_core.tokenizer import CalmTokenizer
from pipelines.progress import progress
from pipelines.hub import fetch_source, model_card
from pipelines.storage import RunDir

KINDS = ("ae", "calm", "baseline")


@dataclass
class Source:
    """One official checkpoint folder, read."""

    kind: str
    spec: str  # as the user gave it
    path: Path  # local
    conf: dict
    hub: dict | None = None  # hf:// specs: {repo, revision, commit}

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape (headers / memory maps; read once)."""
        return O.tensor_shapes(self.path)

    @property
    def where(self) -> str:
        return f"{self.spec} ({O.KIND_ARCH[self.kind]})"


def open_source(spec: str, kind: str) -> Source:
    path, hub = fetch_source(spec, kind)
    conf = O.read_config(path)
    found = O.architecture(conf, spec)
    if found != kind:
        raise ArtifactError(f"'{spec}' holds {O.KIND_ARCH[found]}, but was given as the {kind} "
                            f"(--{kind} expects {O.KIND_ARCH[kind]})")
    return Source(kind, spec, path, conf, hub)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta(kind: str, cfg: Config, tok: CalmTokenizer) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only
        if kind == "ae":
            return ChunkAutoencoder(cfg.ae, tok.vocab_size, tok.mask_id, tok.pad_id)
        if kind == "calm":
            return CALM(cfg.model, cfg.head, cfg.ae, tok.vocab_size)
        return TokenLM(cfg.model, tok.vocab_size, cfg.ae.K)


def check_tokenizer(tok: CalmTokenizer, src: Source) -> None:
    """The tokenizer must have the vocabulary and special ids the checkpoint was made with (the
    baseline's config keeps Llama's default bos/eos ids, so only its vocabulary size is checked)."""
    vocab = src.conf.get("vocab_size")
    if vocab != tok.vocab_size:
        raise ArtifactError(f"the tokenizer has {tok.vocab_size} tokens, {src.where} was made for vocab_size {vocab}; "
                            "pass the tokenizer it was trained with (the official one: Llama-3 plus '[PAD]', 128,257)")
    if src.kind == "baseline":
        return
    for key, ours in (("eos_token_id", tok.eot_id), ("pad_token_id", tok.pad_id), ("bos_token_id", tok.bos_id)):
        theirs = src.conf.get(key)
        if theirs is not None and theirs != ours:
            raise ArtifactError(f"{src.where} has {key}={theirs}, the tokenizer's is {ours}; pass the tokenizer it "
                                "was trained with")


def _convert(src: Source, kind: str, cfg: Config, tok: CalmTokenizer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The project state dict of ``kind`` from ``src`` (``prefix`` "ae_model.": the AE inside a CALM)."""
    rules = O.ae_rules(cfg, prefix) if kind == "ae" else O.rules_for(kind, cfg)
    shapes = _shapes(_meta(kind, cfg, tok))
    if kind == "calm":
        skip = lambda n: n.startswith(O.AE_PREFIX)  # noqa: E731 (the AE is its own artifact)
    elif prefix:
        skip = lambda n: not n.startswith(prefix)  # noqa: E731
    else:
        skip = lambda n: False  # noqa: E731
    state = O.to_project(O.iter_official(src.path), rules, shapes, src.where, skip)
    if set(state) != set(shapes):
        raise ArtifactError(f"{src.where}: the conversion left {sorted(set(shapes) - set(state))[:3]} unset")
    return state


def _load_check(kind: str):
    """What write_trained calls to prove the written artifact loads: its config and tokenizer build the
    model (on the meta device: a CALM-XL is not built twice in memory) and the safetensors header
    holds exactly that model's names and shapes."""
    from safetensors import safe_open

    def check(d: Path) -> torch.nn.Module:
        cfg = config_from_yaml((Path(d) / "config.yaml").read_text(), "config.yaml")
        model = _meta(kind, cfg, CalmTokenizer.from_file(Path(d) / "tokenizer.json"))
        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if stored != _shapes(model):
            raise ArtifactError(f"the written {kind} weights do not fit their config ({sorted(set(stored) ^ set(_shapes(model)))[:3]})")
        return model

    return check


def _publish(run: RunDir, kind: str, state, cfg: Config, tok: CalmTokenizer, inputs: dict, src: Source,
             extra: dict | None = None) -> dict:
    source = {"format": "official", "dir": src.spec, "architectures": src.conf.get("architectures"),
              "config": src.conf, "files": {p.name: sha256_file(p) for p in O.weight_files(src.path)},
              **({"hub": src.hub} if src.hub else {})}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_trained(tmp, kind, state, cfg, tok, [], {"step": 0, "imported": True}, inputs,
                                 {"source": source, "identity": {"official": source["files"]}, "K": cfg.ae.K,
                                  "latent_dim": cfg.ae.latent_dim, **(extra or {})}, _load_check(kind))
        uri = run.publish_artifact(tmp, kind)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    progress(f"[official] {kind}: {src.spec} -> {uri} ({manifest['parameters']:,} parameters, {'/'.join(dtypes)})")
    return manifest


def _publish_tokenizer(run: RunDir, tok: CalmTokenizer, cfg: Config, spec: str, hub: dict | None) -> None:
    source = {"source": spec, "hub": hub} if hub else {"source": f"file:{spec}"}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        write_manifest(tmp, "tokenizer", inputs={**source, "corpus": {}},
                       metrics={"vocab_size": tok.vocab_size},
                       extra={"sha256": tok.sha256, "identity": {"official_tokenizer": tok.sha256},
                              "special_tokens": {"eot": tok.eot_id, "pad": tok.pad_id, "mask": tok.mask_id, "bos": tok.bos_id}})
        run.publish_artifact(tmp, "tokenizer")


def _ae_section(srcs: dict[str, Source]) -> dict:
    """The AE's settings: from --ae's config, else from the shapes of the CALM's ae_model.* copy."""
    if "ae" in srcs:
        return O.ae_settings(srcs["ae"].conf, srcs["ae"].where)
    if "calm" in srcs:
        c = srcs["calm"]
        return O.ae_settings_from_shapes(c.shapes, c.conf, c.where)
    raise ArtifactError("the baseline needs an AE for its chunk size K and for the run's latents: give --ae or --calm")


def import_official(base: Config, run: RunDir, tokenizer: str, calm: str | None = None, ae: str | None = None,
                    baseline: str | None = None, overwrite: bool = False) -> dict[str, dict]:
    """Official folders -> RUN/tokenizer, RUN/ae, RUN/calm, RUN/baseline (those given; the AE from
    ``ae`` or else from the copy inside the CALM checkpoint). Nothing is written unless every given
    folder converts."""
    if not (calm or ae or baseline):
        raise ArtifactError("nothing to import: give --calm, --ae and/or --baseline")
    existing = [k for k in ("tokenizer", *KINDS) if run.has_artifact(k)]
    if existing and not overwrite:
        raise ArtifactError(f"'{run.uri()}' already holds {', '.join(existing)}; use a new --run or --overwrite")
    tok_path, tok_hub = fetch_source(tokenizer, "tokenizer")
    tok = CalmTokenizer.from_file(tok_path)
    srcs = {k: open_source(s, k) for k, s in (("calm", calm), ("ae", ae), ("baseline", baseline)) if s}
    for s in srcs.values():
        check_tokenizer(tok, s)
    ae_section = _ae_section(srcs)
    cfg_ae = O.official_config(base, ae_section)
    states: dict[str, dict] = {}
    cfgs: dict[str, Config] = {"ae": cfg_ae}
    if "ae" in srcs:
        states["ae"] = _convert(srcs["ae"], "ae", cfg_ae, tok)
    if "calm" in srcs:
        c = srcs["calm"]
        cfgs["calm"] = O.official_config(base, ae_section, O.model_settings(c.conf, c.where, "calm", cfg_ae.ae.K))
        if any(k.startswith(O.AE_PREFIX) for k in c.shapes):  # the AE the CALM model was trained with: it overrides --ae in the official loader
            inner = _convert(c, "ae", cfg_ae, tok, prefix=O.AE_PREFIX)
            if "ae" in states and any(not torch.equal(inner[k], states["ae"][k].to(inner[k].dtype)) for k in inner):
                raise ArtifactError(f"the AE in --ae ({srcs['ae'].spec}) is not the one inside the CALM checkpoint "
                                    f"({c.spec}, ae_model.*), which CALM was trained with; leave out --ae to use that one")
            states.setdefault("ae", inner)
            srcs.setdefault("ae", c)
        elif "ae" not in states:
            raise ArtifactError(f"{c.where} holds no AE copy (ae_model.*); pass the autoencoder with --ae")
        states["calm"] = _convert(c, "calm", cfgs["calm"], tok)
    if "baseline" in srcs:
        b = srcs["baseline"]
        cfgs["baseline"] = O.official_config(base, ae_section, O.model_settings(b.conf, b.where, "baseline", cfg_ae.ae.K))
        states["baseline"] = _convert(b, "baseline", cfgs["baseline"], tok)
    if "ae" not in states:
        raise ArtifactError("no AE to import: give --ae (the baseline alone has no chunk autoencoder)")

    for k in ("tokenizer", *KINDS):  # --overwrite: the run's old models go with the old tokenizer
        run.delete(k)
    _publish_tokenizer(run, tok, cfg_ae, tokenizer, tok_hub)
    manifests = {"ae": _publish(run, "ae", states.pop("ae"), cfg_ae, tok,
                                {"tokenizer_sha256": tok.sha256, "corpus": {}, "config_sha256": cfg_ae.section_hash()},
                                srcs["ae"])}
    ae_sha = manifests["ae"]["files"]["model.safetensors"]
    for kind in ("calm", "baseline"):
        if kind in states:
            cfg = cfgs[kind]
            flops = flops_breakdown(kind, _meta(kind, cfg, tok))
            if kind == "calm":
                flops["encoder_forward_once"] = encoder_flops_per_token(_meta("ae", cfg_ae, tok))
            manifests[kind] = _publish(run, kind, states.pop(kind), cfg, tok, model_inputs(cfg, tok, ae_sha), srcs[kind],
                                       {"flops_per_token": flops["total"], "flops_per_token_by_part": flops})
    return manifests


# ----------------------------------------------------------------------------- export


def _save_official(out: Path, state: dict[str, torch.Tensor], conf: dict, tok: CalmTokenizer, manifest: dict) -> None:
    """OUT/<kind>: the official files and a model card, a folder to upload to the Hub as it is."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "pytorch_model.bin")
    conf = {**conf, "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    tok.save(out)
    (out / "README.md").write_text(model_card(out.name, conf, manifest))


def export_official(run: RunDir, out: str | Path, overwrite: bool = False) -> list[Path]:
    """RUN's models -> OUT/ae, OUT/calm (with its AE under ae_model.), OUT/baseline."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"'{out}' is not empty; choose another --out or pass --overwrite")
    ae = load_ae(run.local_artifact("ae"))
    O.check_exportable("ae", ae.cfg)
    ids = {"eos": ae.tok.eot_id, "pad": ae.tok.pad_id, "bos": ae.tok.bos_id}
    ae_state = load_weights(ae.path / "model.safetensors")  # as stored: the dtype kept
    ae_official = O.to_official(ae_state, O.ae_rules(ae.cfg))
    written = []
    _save_official(out / "ae", ae_official, O.export_config("ae", ae.cfg, ae.tok.vocab_size, ids), ae.tok, ae.manifest)
    written.append(out / "ae")
    for kind in ("calm", "baseline"):
        if not run.has_artifact(kind):
            continue
        art = load_model(run.local_artifact(kind), kind, expected_ae_sha256=ae.sha256 if kind == "calm" else None)
        O.check_exportable(kind, art.cfg)
        state = O.to_official(load_weights(art.path / "model.safetensors"), O.rules_for(kind, art.cfg))
        if kind == "calm":  # the official CALM carries its frozen AE
            state = {**{O.AE_PREFIX + k: v for k, v in O.to_official(ae_state, O.ae_rules(ae.cfg)).items()}, **state}
        conf = O.export_config(kind, art.cfg, art.tok.vocab_size, ids, str((out / "ae").resolve()))
        _save_official(out / kind, state, conf, art.tok, art.manifest)
        written.append(out / kind)
    for p in written:
        progress(f"[official] wrote {p} ({O.KIND_ARCH[p.name]})")
    return written
