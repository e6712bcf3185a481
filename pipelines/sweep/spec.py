"""A sweep's spec: the YAML file `jobs/sweep.py --spec` reads, and the trials it expands to.

    name: recipe-gutenberg              # the experiment's name (Tune's, and the results' title)
    description: one line on what it asks
    config: small                       # the base config of every trial (name or YAML path)
    corpus: ../shared/data/gutenberg/train/part-00[0-7].txt    # default corpus (--corpus wins)
    overrides: [stage2.max_minutes=0]   # every trial
    budget_flops: 2.0e13                # each trial's max_steps spends this many training FLOPs
    trials:                             # named trials, each one model and its overrides ...
      - {name: today, model: calm}
      - {name: tokens-32k, model: calm, overrides: [stage2.grad_accum=8], paper: "~2.1M tokens per step"}
    grid: {stage2.lr: [1.0e-3, 3.0e-4]} # ... and/or a grid crossed with `models` (search: grid), or
    search: random                      #     `samples` points drawn from it (search: random)
    scheduler: asha                     # fifo (every trial to its end) | asha (early stopping on `metric`)
    quick: {config: debug, budget_flops: 0}   # what --quick changes (the 2-core machine's size)

Unknown keys are refused by name, as in configs. Each trial's config (base + spec overrides +
its own) is loaded and validated before anything starts, so a typo fails the command at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from calm_core.config import Config, _build, load_config
from calm_core.errors import ConfigError

MODELS = ("calm", "baseline", "ae")  # ae: stage 1, its report and the latents only (e.g. K < 4)
SECTION = {"calm": "stage2", "baseline": "baseline", "ae": "stage1"}


def builtin_specs() -> Path:
    """The shipped specs: jobs/sweeps/ (installed: the calm_jobs package's data)."""
    try:
        import calm_jobs

        return Path(calm_jobs.__file__).resolve().parent / "sweeps"
    except ImportError:  # a checkout without the editable install
        return Path(__file__).resolve().parents[2] / "jobs" / "sweeps"


@dataclass
class TrialSpec:
    name: str = ""
    model: str = "calm"  # calm | baseline | ae
    overrides: list[str] = field(default_factory=list)
    paper: str = ""  # the paper's number or claim for this row (shown beside the result)


@dataclass
class SweepSpec:
    name: str = ""
    description: str = ""
    config: str = "demo"
    corpus: str = ""  # empty: the jobs' default corpus (the Shakespeare plays)
    overrides: list[str] = field(default_factory=list)
    budget_flops: float = 0.0  # 0: each trial trains the config's max_steps
    validations: int = 10  # with budget_flops: held-out validations (and reports to Tune) per trial
    models: list[str] = field(default_factory=lambda: ["calm"])  # what each grid point trains
    search: str = "grid"  # grid | random
    samples: int = 4  # random: points drawn from the grid's values
    seed: int = 0  # random: the draw's seed
    scheduler: str = "fifo"  # fifo | asha
    grace_steps: int = 0  # asha: steps before a trial may be stopped (0: a quarter of the shortest trial)
    metric: str = "val_brierlm"  # what asha compares, and the table's sort key
    mode: str = "max"  # max | min
    max_concurrent: int = 1  # trials at once (each its own Ray Train run; on a cluster, raise it)
    trial_cpus: float = 0.05  # CPUs each trial's driver function reserves (> 0; its Ray Train workers reserve theirs)
    max_failures: int = 1  # times Tune retries a failed trial (it resumes from its last checkpoint)
    correlate: list[str] = field(default_factory=list)  # two metrics: their Pearson and Spearman over the trials
    paper: str = ""  # where the paper's numbers come from
    trials: list[TrialSpec] = field(default_factory=list)
    grid: dict = field(default_factory=dict)  # key -> list of values
    quick: dict = field(default_factory=dict)  # spec keys --quick replaces (overrides are appended)


def _typed(cls: type, data: dict, prefix: str, source: str):
    plain = {k: v for k, v in data.items() if k not in ("trials", "grid", "quick")}
    return _build(cls, plain, prefix, source)


def load_spec(path_or_name: str, quick: bool = False) -> SweepSpec:
    """The spec at a path, or a shipped one by name (``jobs/sweeps/<name>.yaml``); ``quick``
    applies its ``quick:`` section."""
    p = Path(path_or_name)
    if not p.is_file():
        builtin = builtin_specs() / f"{path_or_name}.yaml"
        if "/" in path_or_name or not builtin.is_file():
            names = ", ".join(sorted(x.stem for x in builtin_specs().glob("*.yaml")))
            raise ConfigError(f"sweep spec '{path_or_name}' is neither a file nor a shipped spec ({names})")
        p = builtin
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return spec_from_dict(data, str(p), quick)


def spec_from_dict(data: dict, source: str = "spec", quick: bool = False) -> SweepSpec:
    data = dict(data)
    for key, kind in (("trials", list), ("grid", dict), ("quick", dict)):
        if not isinstance(data.get(key, kind()), kind):
            raise ConfigError(f"{source}: '{key}' must be a {'list' if kind is list else 'mapping'}")
    if quick:
        q = dict(data.get("quick") or {})
        if not q:
            raise ConfigError(f"{source}: this spec has no 'quick:' section; run it without --quick")
        if "overrides" in q:
            q["overrides"] = [*(data.get("overrides") or []), *q["overrides"]]
        _typed(SweepSpec, q, "quick.", source)  # its keys are the spec's own
        data.update(q)
    spec = _typed(SweepSpec, data, "", source)
    spec.trials = [_build(TrialSpec, t, f"trials[{i}].", source) for i, t in enumerate(data.get("trials") or [])]
    spec.grid = {str(k): v if isinstance(v, list) else [v] for k, v in (data.get("grid") or {}).items()}
    spec.quick = data.get("quick") or {}
    _check(spec, source)
    return spec


def _check(spec: SweepSpec, source: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name or ""):
        raise ConfigError(f"{source}: 'name' must be letters, digits, '.', '_' or '-' (it names folders), got {spec.name!r}")
    for key, value, options in (("search", spec.search, ("grid", "random")), ("scheduler", spec.scheduler, ("fifo", "asha")),
                                ("mode", spec.mode, ("max", "min"))):
        if value not in options:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(options)}, got {value!r}")
    for m in [*spec.models, *(t.model for t in spec.trials)]:
        if m not in MODELS:
            raise ConfigError(f"{source}: model {m!r} is not one of {', '.join(MODELS)}")
    if not spec.trials and not spec.grid:
        raise ConfigError(f"{source}: no trials: give 'trials:' or a 'grid:'")
    if spec.validations < 1:
        raise ConfigError(f"{source}: validations must be >= 1")
    if spec.budget_flops < 0 or spec.max_concurrent < 1 or spec.samples < 1 or spec.trial_cpus <= 0:
        raise ConfigError(f"{source}: budget_flops must be >= 0, trial_cpus > 0 (Tune needs a resource per trial), "
                          "max_concurrent and samples >= 1")
    if spec.correlate and len(spec.correlate) != 2:
        raise ConfigError(f"{source}: 'correlate' names two metrics, got {spec.correlate}")


def _value_text(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)


def expand(spec: SweepSpec) -> list[TrialSpec]:
    """Every trial of the spec, in a fixed order: the named trials, then the grid's points (all of
    them, or ``samples`` drawn with ``seed``) for each of ``models``. Names are unique."""
    trials = [dataclasses.replace(t, name=t.name or f"trial-{i}") for i, t in enumerate(spec.trials)]
    if spec.grid:
        keys = list(spec.grid)
        points = list(itertools.product(*(spec.grid[k] for k in keys)))
        if spec.search == "random":
            rng = random.Random(spec.seed)
            points = [tuple(rng.choice(spec.grid[k]) for k in keys) for _ in range(spec.samples)]
        for point in points:
            ov = [f"{k}={_value_text(v)}" for k, v in zip(keys, point)]
            for m in spec.models:
                trials.append(TrialSpec(name=",".join(ov) + (f"/{m}" if len(spec.models) > 1 else ""), model=m,
                                        overrides=ov))
    seen: dict[str, int] = {}
    out = []
    for t in trials:
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        out.append(dataclasses.replace(t, name=t.name if n == 0 else f"{t.name}#{n + 1}"))
    return out


def folder_name(trial_name: str) -> str:
    """A trial's folder under DIR/trials: its name with anything but [A-Za-z0-9._=-] as '_', and a
    short hash when that changed it (two names never share a folder)."""
    safe = re.sub(r"[^A-Za-z0-9._=-]", "_", trial_name)[:80]
    return safe if safe == trial_name else f"{safe}-{hashlib.sha256(trial_name.encode()).hexdigest()[:6]}"


def trial_config(spec: SweepSpec, trial: TrialSpec) -> Config:
    try:
        return load_config(spec.config, [*spec.overrides, *trial.overrides])
    except ConfigError as e:
        raise ConfigError(f"trial '{trial.name}': {e}") from None


def ae_key(cfg: Config, corpus: str) -> str:
    """What the shared artifacts (tokenizer, AE, its report, latents) of a trial depend on: trials
    with the same key share one folder DIR/shared/<key>."""
    d = cfg.to_dict()
    parts = {s: d[s] for s in ("data", "tokenizer", "ae", "stage1", "latents", "distributed")}
    parts["corpus"] = corpus
    return "ae-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def spec_text(spec: SweepSpec) -> str:
    """The resolved spec as YAML (saved in DIR/sweep/spec.yaml; a rerun with another one is refused)."""
    d = dataclasses.asdict(spec)
    d.pop("quick", None)
    return yaml.safe_dump(d, sort_keys=False)
