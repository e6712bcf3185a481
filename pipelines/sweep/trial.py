"""One sweep trial as a Tune function trainable: the project's own stages, sharing what trials
have in common.

A trial (``run_trial``) is one model on one config:
1. the shared artifacts of its AE setting, DIR/shared/<ae_key>: tokenizer, stage 1, the AE's
   reconstruction report and the latents, each claimed by the project's claim rule (complete:
   nothing to do; another setup: refused). Trials with the same key use one folder; a lease
   (``Leases``, a named Ray actor) lets one trial at a time build it, and a dead holder's lease
   lapses, so its retry or another trial takes over from the last checkpoint;
2. stage 2 or the baseline in DIR/trials/<name> on those latents, its max_steps set by the spec's
   FLOP budget, every validation reported to Tune as it trains (Ray Train V2's TuneReportCallback);
3. a final ``tune.report`` with the artifact's metrics, the AE's report and the wall time.

Everything is resumable: a retried or restored trial finds its artifacts complete or resumes its
Ray Train checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray

from calm_core.config import Config
from pipelines.progress import progress, timed
from pipelines.storage import RunDir
from pipelines.sweep.spec import SECTION, TrialSpec, ae_key, folder_name

LEASE_S = 60.0  # a lease not renewed for this long lapses (its holder died)


@ray.remote(num_cpus=0)
class Leases:
    """Named leases on keys: one holder at a time; a holder renews, a lapsed lease is taken over."""

    def __init__(self):
        self.held: dict[str, tuple[str, float]] = {}

    def take(self, key: str, owner: str) -> bool:
        now = time.time()
        holder = self.held.get(key)
        if holder is None or holder[0] == owner or holder[1] < now:
            self.held[key] = (owner, now + LEASE_S)
            return True
        return False

    def give_back(self, key: str, owner: str) -> None:
        if self.held.get(key, ("",))[0] == owner:
            del self.held[key]


def start_leases(name: str):
    """The sweep driver's Leases actor (it lives as long as the driver's job; trials find it by name)."""
    return Leases.options(name=name, get_if_exists=True).remote()


@contextmanager
def lease(actor_name: str, key: str, owner: str):
    actor = ray.get_actor(actor_name)
    waited = 0.0
    while not ray.get(actor.take.remote(key, owner)):
        if waited == 0:
            progress(f"[sweep] {owner}: waiting for another trial building {key}")
        time.sleep(2.0)
        waited += 2.0
    stop = threading.Event()

    def renew():
        while not stop.wait(LEASE_S / 4):
            ray.get(actor.take.remote(key, owner))

    t = threading.Thread(target=renew, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        ray.get(actor.give_back.remote(key, owner))


@dataclass(frozen=True)
class SweepContext:
    """What every trial shares (absolute paths: Tune runs trials in their own working folders)."""

    root: str  # DIR
    config: str  # the spec's base config
    overrides: tuple[str, ...]
    corpus: str
    budget_flops: float
    validations: int
    leases: str  # the Leases actor's name


def budget_steps(cfg: Config, kind: str, vocab: int, budget: float) -> tuple[int, float, int]:
    """The optimizer steps that spend ``budget`` training FLOPs (FLOPs per token x tokens per
    optimizer step; at least 2), with the FLOPs per token and the tokens per step (also
    bench/bench_stage2.py's budgets)."""
    import torch

    from calm_core.artifacts import build_model, flops_breakdown

    t = getattr(cfg, SECTION[kind])
    with torch.device("meta"):  # shapes only
        fpt = flops_breakdown(kind, build_model(kind, cfg, vocab))["total"]
    tokens_per_step = t.batch_size * t.grad_accum * cfg.distributed.num_workers * cfg.model.block_chunks * cfg.ae.K
    return max(2, math.ceil(budget / (fpt * tokens_per_step))), fpt, tokens_per_step


def budget_overrides(cfg: Config, kind: str, vocab: int, budget: float, own: list[str],
                     validations: int = 10) -> list[str]:
    """The overrides of a trial that spends ``budget`` training FLOPs (``budget_steps``):
    ``validations`` evenly spaced, one checkpoint half-way, warm-up 5% of the steps unless the
    trial sets its own."""
    section = SECTION[kind]
    steps = budget_steps(cfg, kind, vocab, budget)[0]
    ov = [f"{section}.max_steps={steps}", f"{section}.max_minutes=0", f"{section}.log_every={max(1, steps // validations)}",
          f"{section}.checkpoint_every={max(1, steps // 2)}"]
    if not any(o.startswith(f"{section}.warmup_steps=") for o in own):
        ov.append(f"{section}.warmup_steps={max(1, steps // 20)}")
    return ov


GEN_BATCH = 4  # prompts in the generation-speed probe of every trained trial


def generation_speed(run: RunDir, kind: str, ae_path: str, repeats: int = 3) -> float:
    """Generated tokens per second of the trial's model (KV cache, temperature 1, in this process's
    torch threads): GEN_BATCH prompts of random ids filling the first quarter of the model's context
    (block_chunks x K tokens), continued to its end (CALM: one backbone step per K tokens; the
    baseline: one per token); the median of ``repeats`` after a warm-up. A speed, not a quality:
    it depends on K and the model's size, not on its weights."""
    import torch

    from calm_core.artifacts import load_ae, load_model
    from calm_core.generate import generate

    art = load_model(run.local_artifact(kind), kind)
    model, ae = art.model.eval(), load_ae(ae_path)
    K, V, chunks = ae.cfg.ae.K, ae.tok.vocab_size, art.cfg.model.block_chunks
    prompt_chunks = max(1, chunks // 4)
    new_chunks = chunks - prompt_chunks
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (GEN_BATCH, prompt_chunks, K), generator=g)  # [B, T, K]
    if kind == "calm":
        step = lambda: generate(model, ae.model.eval(), prompt, new_chunks, generator=g)  # noqa: E731
    else:
        step = lambda: model.generate(prompt.flatten(1), new_chunks * K, generator=g)  # noqa: E731
    with torch.no_grad():
        return GEN_BATCH * new_chunks * K / timed(step, repeats)


def shared_artifacts(cfg: Config, ctx: SweepContext, owner: str) -> tuple[RunDir, dict, dict]:
    """DIR/shared/<ae_key>: tokenizer, AE, its report, latents (built once, under the lease)."""
    from pipelines.data.precompute import precompute_latents
    from pipelines.eval.ae_report import ARTIFACT as REPORT
    from pipelines.eval.ae_report import ae_report
    from pipelines.train.stage1 import run_stage1

    key = ae_key(cfg, ctx.corpus)
    shared = RunDir(f"{ctx.root}/shared/{key}")
    with lease(ctx.leases, key, owner):
        run_stage1(cfg, ctx.corpus, shared)
        if shared.has_artifact(REPORT):
            report = shared.read_json(REPORT, "report.json")
        else:
            report = ae_report(cfg, ctx.corpus, shared)
        lman = precompute_latents(cfg, ctx.corpus, shared)
    return shared, report, lman


def run_trial(config: dict, ctx: SweepContext) -> None:
    """Tune's function trainable: ``config["trial"]`` is a TrialSpec as a dict."""
    from ray import tune

    from calm_core.artifacts import load_ae
    from calm_core.config import load_config
    from pipelines.train.stage2 import run_stage2

    from pipelines.ray_env import quiet_ray_data

    quiet_ray_data()  # a trial runs in its own actor: Ray Data's bars are off there too
    trial = TrialSpec(**config["trial"])
    t0 = time.perf_counter()
    progress(f"[sweep] trial {trial.name}: {trial.model}, overrides {' '.join(trial.overrides) or '(none)'}")
    cfg = load_config(ctx.config, [*ctx.overrides, *trial.overrides])
    shared, report, lman = shared_artifacts(cfg, ctx, trial.name)
    ae_metrics = {f"ae_{k}": report[k] for k in ("acc_mu", "acc_sample", "acc_noise", "active_dims", "latent_dim",
                                                 "mean_sigma", "mu_var_mean", "mu_std_over_sigma") if k in report}
    ae_metrics.update(latents_bytes_per_token=lman["metrics"].get("bytes_per_token"), ae_key=shared.spec.rsplit("/", 1)[-1],
                      K=cfg.ae.K)
    out: dict[str, Any] = {"trial": trial.name, "model": trial.model, **ae_metrics}
    if trial.model != "ae":
        ae = load_ae(shared.local_artifact("ae"))
        cfg = dataclasses.replace(cfg, ae=ae.cfg.ae)
        own = list(trial.overrides)
        if ctx.budget_flops > 0:
            extra = budget_overrides(cfg, trial.model, ae.tok.vocab_size, ctx.budget_flops, own, ctx.validations)
            cfg = load_config(ctx.config, [*ctx.overrides, *own, *extra])
        run = RunDir(f"{ctx.root}/trials/{folder_name(trial.name)}")
        from ray.tune.integration.ray_train import TuneReportCallback

        manifest = run_stage2(cfg, run, trial.model, ae_path=str(shared.local_artifact("ae")), latents=shared,
                              callbacks=[TuneReportCallback()])
        m = manifest["metrics"]
        out.update({k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        out["max_steps"] = getattr(cfg, SECTION[trial.model]).max_steps
        # the training speed: the median of the logged figures (the last one covers a single step
        # after a validation, e.g. 808 tokens/s where the run made ~5,000)
        speeds = [json.loads(x).get("tokens_per_s") for x in run.read_text(trial.model, "metrics.jsonl").splitlines()]
        speeds = sorted(v for v in speeds[:-1] or speeds if v)
        if speeds:
            out["tokens_per_s"] = speeds[len(speeds) // 2]
        out["gen_tokens_per_s"] = generation_speed(run, trial.model, str(shared.local_artifact("ae")))
    out.update(wall_s=time.perf_counter() - t0, done=True)
    progress(f"[sweep] trial {trial.name} done in {out['wall_s']:.0f}s" + (
        f": held-out loss {out['val_loss']:.4f}, BrierLM {out.get('val_brierlm', float('nan')):.2f}" if "val_loss" in out else ""))
    tune.report(out)
