"""Typed configuration: dataclasses loaded from YAML, unknown keys and wrong types rejected.

A config file is a nested mapping whose sections match the dataclasses below. Every job takes
``--config FILE_OR_NAME`` (a path, or one of the built-in names ``debug``, ``small``, ``paper``
that live in ``calm_core/configs/``) and ``a.b=value`` overrides; the values of overrides are parsed as
YAML scalars (``ae.K=8``, ``stage1.lr=1e-3``, ``distributed.use_gpu=true``).

The resolved config (file + overrides) is saved next to every artifact as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from calm_core.errors import ConfigError

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: installed with calm_core


@dataclass
class DataConfig:
    """How a corpus is read and split."""

    format: str = "auto"  # auto | text | jsonl | parquet (auto: by file extension)
    separator: str = "auto"  # text only: auto | eot_line | blank_line | line | file
    eot_marker: str = "<|endoftext|>"  # the line that ends a document when separator=eot_line
    text_field: str = "text"  # JSONL field / Parquet column holding the text
    val_fraction: float = 0.02  # share of documents (by hash of their text) held out
    split_salt: str = "calm"  # salt of that hash: change it to draw another split
    max_documents: int = 0  # 0 = all; otherwise keep the first N good documents per file
    read_cpus: float = 0.25  # CPUs reserved by each Ray Data read/tokenize task
    section_chars: int = 20000  # when no whole document is held out (one long text), documents are cut at line
    #                             ends into sections of about this many characters and sections are held out (0: never)
    layout: str = "auto"  # how documents become chunks (calm_core.chunking): document (EOT + padding per document) |
    #                       packed (the official code: BOS per document, concatenated, cut across documents) |
    #                       auto (stage 1: document; later stages: the layout of the run's AE)
    pack_documents: int = 1000  # packed: documents concatenated together (the official code's group of 1,000);
    #                             each group's last < K tokens are dropped, and its blocks are cut inside it


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the training split, or an existing tokenizer.json."""

    path: str = ""  # an existing tokenizer.json to use instead of training one
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_documents: int = 100_000  # documents fed to the BPE trainer (the first N)


@dataclass
class AEConfig:
    """The chunk autoencoder (CALM.md section 1). Paper: K=4, l=128, d=512, FFN 1280, 2+2 blocks."""

    K: int = 4  # tokens per chunk
    latent_dim: int = 128  # l
    d_model: int = 512  # d
    ffn_dim: int = 1280
    token_blocks: int = 1  # residual MLP blocks applied per token (encoder) / per position (decoder)
    latent_blocks: int = 1  # residual MLP blocks on the compressed vector (each side)
    beta: float = 1e-3  # KL weight
    kl_clip: float = 0.5  # lambda_KL: per-dimension floor of the KL term
    mask_prob: float = 0.15  # training-only input token masking
    latent_dropout: float = 0.15  # training-only dropout on the sampled z
    eval_noise_std: float = 0.3  # std of the noise added to mu in the robustness metric
    norm_eps: float = 1e-6  # RMSNorm eps (the official AE's rms_norm_eps)
    clamp_log_sigma: bool = True  # clamp log sigma to [-10, 5] (straight-through); the official AE does not


@dataclass
class TrainConfig:
    """One training stage's loop (stage 1 now; stage 2 and the baseline reuse the shape)."""

    batch_size: int = 256  # chunks per worker per step
    max_steps: int = 2000
    max_minutes: float = 0.0  # wall-clock budget for this invocation (0 = none); stops early
    lr: float = 1e-3
    schedule: str = "cosine"  # after the warm-up: cosine (decay to lr * min_lr_ratio) | constant (the official code)
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step (tokens per step x grad_accum)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 50  # progress line + validation metrics every N steps
    checkpoint_every: int = 500  # checkpoint through ray.train.report every N steps
    val_max_chunks: int = 4096  # validation chunks (in all, over every worker)
    brier_samples: int = 2  # stage 2 / baseline: samples per position for the held-out BrierLM (>= 2)
    shuffle_buffer: int = 8192  # local shuffle buffer of the streamed training chunks
    shuffle: str = "buffer"  # stage2 / baseline: buffer (blocks in corpus order through the buffer) | corpus (one
    #                          seeded random order of every training block first, then the buffer)
    seed: int = 0
    init_from: str = ""  # stage2 / baseline: a CALM or baseline artifact (RUN/calm of any run, a path or URI) whose
    #                      weights and architecture (model, head) this training starts from: fine-tuning


@dataclass
class DistributedConfig:
    """Ray Train + DeepSpeed layout: config, not code."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    compile: bool = False  # torch.compile the training step (for GPUs; validation stays eager)
    max_failures: int = 0  # worker-group restarts Ray Train may do from the last checkpoint
    num_to_keep: int = 2  # checkpoints kept in RUN/_train


@dataclass
class ModelConfig:
    """The stage-2 Transformer backbone, shared by CALM (over chunks) and the token baseline (over
    tokens). Paper ablation size: 12 layers, 768 wide."""

    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 2048
    rope_theta: float = 10000.0
    block_chunks: int = 512  # L: chunks per training block (the baseline sees L*K tokens)
    input_mode: str = "tokens"  # tokens | latents | both: what CALM feeds back at each position
    n_kv_heads: int = 0  # key/value heads (grouped-query attention when < n_heads); 0 = n_heads
    norm_eps: float = 1e-6  # RMSNorm eps of the backbone (the official rms_norm_eps)
    layernorm_eps: float = 1e-5  # LayerNorm eps of CALM's token input path (official: 1e-6)
    rope_pairing: str = "adjacent"  # adjacent: rotate (2i, 2i+1) | halves: rotate (i, i + h/2) (Llama, official)
    tie_embeddings: bool = True  # baseline: logits through the input embedding (official: its own lm_head)


@dataclass
class HeadConfig:
    """CALM's next-vector head and its loss (CALM.md section 2; paper defaults)."""

    kind: str = "energy"  # energy | quadratic (the seed's ablation)
    arch: str = "adanorm"  # energy head: paper (the official MLPGenerator) | adanorm (docs/BENCHMARKS.md: head A/Bs)
    init: str = "torch"  # energy head weights: normal (N(0, 0.02^2), the official code) | torch (PyTorch default)
    noise_dim: int = 64  # width of the head's noise
    noise: str = "uniform"  # head noise distribution: uniform (U(-0.5, 0.5), the official code) | gaussian (N(0, 1))
    layernorm_eps: float = 1e-5  # LayerNorm eps of the paper head (official: 1e-6)
    blocks: int = 0  # residual blocks; 0 = one per four backbone layers (paper)
    width_ratio: float = 1.0  # energy head's width / model.d_model (paper: 1, the head as wide as the backbone)
    n_samples: int = 8  # N head samples per position
    n_targets: int = 100  # M targets drawn from the posterior per position, fresh every step
    alpha: float = 1.0  # energy-score exponent, in (0, 2): strictly proper; 2 (the paper's ablation) only sees the mean
    margin: float = 0.0  # quadratic head: hinge margin against negatives from other positions (0 = off)
    input_noise_std: float = 0.0  # regulariser: Gaussian noise on latent inputs (input_mode latents/both)
    prior_weight: float = 0.0  # regulariser: weight of 0.5 * ||mean head sample||^2 (a pull to the N(0, I) prior)


@dataclass
class LatentsConfig:
    """Offline latent precomputation (jobs/precompute_latents.py): the frozen encoder over the corpus."""

    dtype: str = "float32"  # how mu and log_sigma are stored: float32 | float16 | bfloat16
    batch_size: int = 1024  # chunks per encoder call
    num_actors: int = 1  # encoder actors in the Ray Data actor pool
    cpus_per_actor: float = 0.5  # CPUs each encoder actor reserves (torch threads = max(1, int(this)))
    use_gpu: bool = False  # one GPU per encoder actor
    shard_documents: int = 20000  # documents per shard: the unit that is committed once and skipped on rerun
    actor_memory_mb: int = 0  # memory each encoder actor declares to Ray (0 = estimated from the AE and batch size)


@dataclass
class EvalConfig:
    """The evaluation job (jobs/evaluate.py): every model of a run scored on a corpus."""

    split: str = "all"  # all: every document of the corpus | heldout: only those data.val_fraction holds out (a training corpus)
    block_chunks: int = 0  # context: blocks of this many chunks for every model (0 = each model's trained model.block_chunks)
    max_blocks: int = 2000  # blocks scored at most (0 = every block of the corpus)
    batch_blocks: int = 8  # blocks per scoring call
    samples: int = 8  # samples per position for BrierLM (CALM: head samples; baseline: continuations)
    seed: int = 0  # the blocks' noise seeds (the same estimator and seeds as training's validation)
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.5, 0.33])
    sweep_every: int = 8  # the temperature sweep on blocks whose key is a multiple of this (CALM's picks below
    #                       T = 1 cost 2 x candidates decodes per position: the evaluation's largest cost)
    candidates: int = 32  # CALM below temperature 1: head samples per pick (batch approximation)
    band_edges: list[int] = field(default_factory=lambda: [100, 1000, 10000])  # token frequency-rank bands
    noise_std: float = 0.3  # AE robustness: decoding mu + N(0, noise_std^2)
    actors: int = 1  # scoring actors (each loads the models once)
    cpus_per_actor: float = 1.0  # CPUs each scoring actor reserves; with the actors, at most the cluster's less 1
    threads_per_actor: int = 0  # torch threads per scoring actor; 0: max(1, round(cpus_per_actor))
    use_gpu: bool = False  # one GPU per scoring actor
    actor_memory_mb: int = 0  # memory each scoring actor reserves; 0: estimated from the models and batch_blocks
    bootstrap: int = 1000  # resamples of blocks for BrierLM's confidence interval
    protocol: str = "project"  # project | paper: the official evaluation (the packed layout, 2 samples, the baseline
    #                            scored at every token position, BrierLM also with the official clamp of the product)


PAPER_EVAL_SAMPLES = 2  # the official Brier terms compare two decoded head samples


def eval_protocol(ev: EvalConfig) -> EvalConfig:
    """The evaluation settings in force: ``protocol: paper`` fixes two samples, as the official
    evaluation does (its contexts are each model's trained one: 8,192 tokens for the released
    CALMs, 2,048 for the baseline; ``block_chunks`` overrides, for both)."""
    if ev.protocol != "paper":
        return ev
    return dataclasses.replace(ev, samples=PAPER_EVAL_SAMPLES)


@dataclass
class RayConfig:
    """Only used when the job starts Ray itself (no RAY_ADDRESS / no running cluster)."""

    num_cpus: int = 0  # 0 = all cores of this machine
    object_store_memory_mb: int = 1024


@dataclass
class ServeConfig:
    """Serving (jobs/serve.py, pipelines/serve): Ray Serve deployments behind the OpenAI-style HTTP API."""

    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other machines
    port: int = 8000
    direct_ingress: bool = False  # jobs/serve.py: the ingress replica answers HTTP on `port` itself, no proxy hop
    device: str = "cpu"  # where each model replica runs: cpu | cuda | auto
    min_replicas: int = 1  # per model deployment (autoscaling range)
    max_replicas: int = 1
    target_ongoing_requests: int = 16  # autoscaling target per replica
    max_ongoing_requests: int = 32  # requests a replica works on at once (batched together)
    max_queued_requests: int = 64  # waiting requests per deployment beyond which the server answers 503
    batching: str = "loop"  # loop: admit requests between model steps | serve_batch: Ray Serve's @serve.batch
    max_batch_rows: int = 32  # rows (completions) one model step computes at most
    batch_wait_ms: float = 10.0  # serve_batch: how long a batch waits to fill
    stream_interval_ms: float = 50.0  # loop: after a stream's first message, at most one per interval (the
    #                                  steps between ride along); 0 = a message per step
    stream_messages_per_s: float = 200.0  # loop: a replica's streams together send about this many messages per
    #                                  second at most (each stream's interval grows with the streams open); 0 = no cap
    cpus_per_replica: float = 0.5
    gpus_per_replica: float = 0.0
    threads_per_replica: int = 1  # torch threads in each model replica
    api_key_env: str = "CALM_API_KEY"  # when this environment variable is set where Ray starts, requests need "Bearer <it>"
    api_key_file: str = ""  # a file holding the key (e.g. a mounted Kubernetes Secret); wins over api_key_env
    docs: bool = False  # serve /docs and /openapi.json (off: they describe the API to anyone who asks)
    max_body_bytes: int = 1048576  # counted while the body is read (Content-Length first)
    max_json_depth: int = 8  # nesting of the request's JSON (a valid request needs 3)
    max_prompt_tokens: int = 4096
    max_prompts: int = 16  # prompts in one request (a list of strings)
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 16
    max_request_tokens: int = 16384  # max_tokens x n x prompts of one request
    max_stops: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 128  # characters per stop string
    max_draws: int = 2000  # the largest max_draws (exact sampler: decoded draws per chunk) a request may ask for
    max_step_draws: int = 8192  # decoded head samples one request may cost per step: n x candidates (T < 1)
    #                              or n x max_draws (exact sampler)
    request_timeout_s: float = 600.0  # wall clock from arrival: then finish_reason "length" (504 if not started)
    step_timeout_s: float = 120.0  # a step loop with work and no step for this long fails check_health
    health_check_period_s: float = 10.0  # how often Serve calls each model replica's check_health


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=8, lr=3e-4))  # batch in blocks of L chunks
    baseline: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=8, lr=3e-4))  # blocks of L*K tokens
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections (all when none): identifies what a result depends on."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- validation


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_scalar(value: Any, tp: Any, key: str, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' must be {expected}, got {value!r} ({type(value).__name__})")

    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise bad("a list")
        (inner,) = typing.get_args(tp)[:1]
        return [_check_scalar(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _check_scalar(value, option, key, source)
            except ConfigError:
                continue
        raise bad(str(tp))
    raise TypeError(f"unsupported config field type {tp} for {key}")


def _build(cls: type, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, full + ".", source)
        else:
            kwargs[key] = _check_scalar(value, tp, full, source)
    return cls(**kwargs)


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a built-in config (debug, small, paper)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and builtin.is_file():
        return builtin
    names = sorted(x.stem for x in BUILTIN_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a built-in config ({', '.join(names)})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config file (or the defaults when None), apply ``a.b=value`` overrides, validate."""
    data: dict = {}
    source = "defaults"
    if config is not None:
        path = resolve_config_path(str(config))
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        data = loaded or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    cfg = _build(Config, data, "", source)  # the file alone must be valid
    if overrides:
        merged = cfg.to_dict()
        for text in overrides:
            keys, value = parse_override(text)
            probe = {}
            cur = probe
            for k in keys[:-1]:
                cur = cur.setdefault(k, {})
            cur[keys[-1]] = value
            _build(Config, probe, "", f"override '{text}'")  # names the key if it is unknown or mistyped
            _deep_update(merged, probe)
        cfg = _build(Config, merged, "", "overrides")
    validate(cfg)
    return cfg


def config_from_dict(data: dict, source: str = "config") -> Config:
    cfg = _build(Config, data, "", source)
    validate(cfg)
    return cfg


def config_from_yaml(text: str, source: str = "config.yaml") -> Config:
    return config_from_dict(yaml.safe_load(text) or {}, source)


def _choice(value: str, key: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"key '{key}' must be one of {', '.join(options)}, got {value!r}")


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    _choice(cfg.data.format, "data.format", ("auto", "text", "jsonl", "parquet"))
    _choice(cfg.data.separator, "data.separator", ("auto", "eot_line", "blank_line", "line", "file"))
    _choice(cfg.data.layout, "data.layout", ("auto", "document", "packed"))
    _positive(cfg.data.pack_documents, "data.pack_documents")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"key 'data.val_fraction' must be in [0, 1), got {cfg.data.val_fraction}")
    _positive(cfg.data.max_documents, "data.max_documents", allow_zero=True)
    _positive(cfg.data.read_cpus, "data.read_cpus")
    _positive(cfg.data.section_chars, "data.section_chars", allow_zero=True)
    if cfg.tokenizer.vocab_size < 300:
        raise ConfigError("key 'tokenizer.vocab_size' must be >= 300 (256 bytes + special tokens + merges)")
    a = cfg.ae
    for key in ("K", "latent_dim", "d_model", "ffn_dim"):
        _positive(getattr(a, key), f"ae.{key}")
    for key in ("token_blocks", "latent_blocks"):
        _positive(getattr(a, key), f"ae.{key}", allow_zero=True)
    _positive(a.beta, "ae.beta", allow_zero=True)
    _positive(a.kl_clip, "ae.kl_clip", allow_zero=True)
    for key in ("mask_prob", "latent_dropout"):
        if not 0.0 <= getattr(a, key) < 1.0:
            raise ConfigError(f"key 'ae.{key}' must be in [0, 1), got {getattr(a, key)}")
    for sec in ("stage1", "stage2", "baseline"):
        t = getattr(cfg, sec)
        for key in ("batch_size", "max_steps", "log_every", "checkpoint_every", "val_max_chunks", "grad_accum"):
            _positive(getattr(t, key), f"{sec}.{key}")
        _choice(t.schedule, f"{sec}.schedule", ("cosine", "constant"))
        _choice(t.shuffle, f"{sec}.shuffle", ("buffer", "corpus"))
        _positive(t.lr, f"{sec}.lr")
        _positive(t.max_minutes, f"{sec}.max_minutes", allow_zero=True)
        if t.brier_samples < 2:
            raise ConfigError(f"key '{sec}.brier_samples' must be >= 2 (the Brier estimate compares samples), "
                              f"got {t.brier_samples}")
    if cfg.stage1.shuffle != "buffer":
        raise ConfigError("key 'stage1.shuffle' must be 'buffer': the corpus-level shuffle is for stage2 / baseline "
                          "blocks (stage 1 trains on single chunks through its shuffle buffer)")
    d = cfg.distributed
    _positive(d.num_workers, "distributed.num_workers")
    _positive(d.cpus_per_worker, "distributed.cpus_per_worker", allow_zero=True)
    if d.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"key 'distributed.zero_stage' must be 0, 1, 2 or 3, got {d.zero_stage}")
    _choice(d.precision, "distributed.precision", ("auto", "fp32", "bf16"))
    _choice(d.backend, "distributed.backend", ("auto", "gloo", "nccl"))
    _positive(d.num_to_keep, "distributed.num_to_keep")
    m = cfg.model
    for key in ("d_model", "n_layers", "n_heads", "ffn_dim", "block_chunks"):
        _positive(getattr(m, key), f"model.{key}")
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"key 'model.d_model' ({m.d_model}) must be n_heads ({m.n_heads}) x an even head width")
    _choice(m.input_mode, "model.input_mode", ("tokens", "latents", "both"))
    _choice(m.rope_pairing, "model.rope_pairing", ("adjacent", "halves"))
    _positive(m.n_kv_heads, "model.n_kv_heads", allow_zero=True)
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"key 'model.n_kv_heads' ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads})")
    for key in ("norm_eps", "layernorm_eps"):
        _positive(getattr(m, key), f"model.{key}")
    _positive(a.norm_eps, "ae.norm_eps")
    h = cfg.head
    _choice(h.kind, "head.kind", ("energy", "quadratic"))
    _choice(h.arch, "head.arch", ("paper", "adanorm"))
    _choice(h.init, "head.init", ("normal", "torch"))
    _choice(h.noise, "head.noise", ("uniform", "gaussian"))
    _positive(h.layernorm_eps, "head.layernorm_eps")
    if h.n_samples < 2:
        raise ConfigError(f"key 'head.n_samples' must be >= 2 (the energy score compares samples), got {h.n_samples}")
    _positive(h.n_targets, "head.n_targets")
    if not 0.0 < h.alpha <= 2.0:  # 2 is proper, not strictly (it sees only the mean): the paper's ablation
        raise ConfigError(f"key 'head.alpha' must be in (0, 2] (2: proper but not strictly; the energy score "
                          f"is not a score outside), got {h.alpha}")
    for key in ("noise_dim", "blocks", "margin", "input_noise_std", "prior_weight"):
        _positive(getattr(h, key), f"head.{key}", allow_zero=key != "noise_dim")
    _positive(h.width_ratio, "head.width_ratio")
    if round(cfg.model.d_model * h.width_ratio) < 1:
        raise ConfigError(f"key 'head.width_ratio' {h.width_ratio} leaves the head no width "
                          f"(model.d_model {cfg.model.d_model})")
    lt = cfg.latents
    _choice(lt.dtype, "latents.dtype", ("float32", "float16", "bfloat16"))
    for key in ("batch_size", "num_actors", "cpus_per_actor", "shard_documents"):
        _positive(getattr(lt, key), f"latents.{key}")
    _positive(lt.actor_memory_mb, "latents.actor_memory_mb", allow_zero=True)
    sv = cfg.serve
    _choice(sv.device, "serve.device", ("cpu", "cuda", "auto"))
    _choice(sv.batching, "serve.batching", ("loop", "serve_batch"))
    for key in ("port", "max_replicas", "target_ongoing_requests", "max_ongoing_requests", "threads_per_replica",
                "max_batch_rows", "max_body_bytes", "max_prompt_tokens", "max_tokens", "max_n", "max_draws",
                "max_json_depth", "max_prompts", "max_request_tokens", "max_stops", "max_stop_chars",
                "max_step_draws", "request_timeout_s", "step_timeout_s", "health_check_period_s"):
        _positive(getattr(sv, key), f"serve.{key}")
    for key in ("min_replicas", "max_queued_requests", "cpus_per_replica", "gpus_per_replica", "batch_wait_ms",
                "stream_interval_ms", "stream_messages_per_s"):
        _positive(getattr(sv, key), f"serve.{key}", allow_zero=True)
    if sv.batching == "serve_batch" and sv.max_n > sv.max_batch_rows:
        raise ConfigError(f"key 'serve.max_n' ({sv.max_n}) must be <= serve.max_batch_rows ({sv.max_batch_rows}) "
                          "with serve.batching=serve_batch (a request's n rows must fit in one batch)")
    if sv.min_replicas > sv.max_replicas:
        raise ConfigError(f"key 'serve.min_replicas' ({sv.min_replicas}) must be <= serve.max_replicas ({sv.max_replicas})")
    ev = cfg.eval
    _choice(ev.split, "eval.split", ("all", "heldout"))
    _choice(ev.protocol, "eval.protocol", ("project", "paper"))
    for key in ("batch_blocks", "samples", "sweep_every", "candidates", "actors", "cpus_per_actor"):
        _positive(getattr(ev, key), f"eval.{key}")
    if ev.threads_per_actor < 0:
        raise ConfigError(f"eval.threads_per_actor must be >= 0 (0: from eval.cpus_per_actor), got {ev.threads_per_actor}")
    if ev.actor_memory_mb < 0:
        raise ConfigError(f"eval.actor_memory_mb must be >= 0 (0: estimated), got {ev.actor_memory_mb}")
    for key in ("block_chunks", "max_blocks", "noise_std", "bootstrap"):
        _positive(getattr(ev, key), f"eval.{key}", allow_zero=True)
    if ev.samples < 2:
        raise ConfigError(f"key 'eval.samples' must be >= 2 (the Brier estimate compares samples), got {ev.samples}")
    if ev.block_chunks == 1:
        raise ConfigError("key 'eval.block_chunks' must be 0 (the trained context) or >= 2 (a context and a next chunk)")
    if not ev.temperatures or any(not 0.0 < t <= 1.0 for t in ev.temperatures):
        raise ConfigError(f"key 'eval.temperatures' must list values in (0, 1] (CALM's samplers), got {ev.temperatures}")
    if list(ev.band_edges) != sorted(set(ev.band_edges)) or any(e <= 0 for e in ev.band_edges):
        raise ConfigError(f"key 'eval.band_edges' must be increasing positive ranks, got {ev.band_edges}")
