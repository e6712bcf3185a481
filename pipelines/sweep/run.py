"""The sweep driver: a spec's trials as one Ray Tune experiment in DIR/sweep/tune, restored when
it exists (a finished trial is not rerun; rerunning the command continues), then the results.

    DIR/sweep/spec.yaml        the resolved spec (a rerun with another spec is refused)
    DIR/sweep/tune/            Tune's experiment state (Tuner.restore reads it)
    DIR/sweep/results.parquet  one row per trial; results.md, curves.png
    DIR/shared/<ae_key>/       tokenizer, AE, its report, latents: one per distinct AE setting
    DIR/trials/<trial>/        the trial's CALM or baseline artifact, its logs and checkpoints
"""

from __future__ import annotations

import dataclasses
import os
import uuid

from calm_core.errors import ArtifactError
from pipelines.progress import progress
from pipelines.storage import RunDir
from pipelines.sweep.spec import SweepSpec, expand, folder_name, spec_text, trial_config
from pipelines.sweep.trial import SweepContext, run_trial, start_leases

EXPERIMENT = "tune"


def trial_dirname(trial) -> str:
    """Tune's folder for a trial: the trial's own folder name (module level: Tune pickles it)."""
    return folder_name(trial.config["trial"]["name"])[:90]


def trial_name(trial) -> str:
    """Tune's name for a trial (its status lines): the spec's."""
    return trial.config["trial"]["name"]


def _absolute_corpus(corpus: str) -> str:
    """Trials run in Tune's trial folders: a relative path or glob is made absolute here."""
    if "://" in corpus:
        return corpus
    return os.path.abspath(os.path.expanduser(corpus))


def run_sweep(spec: SweepSpec, root: RunDir, corpus: str, overwrite: bool = False) -> list[dict]:
    """Run (or continue) the sweep; returns the result rows (also written to DIR/sweep)."""
    import ray
    from ray import tune

    from pipelines.sweep.results import write_results

    spec = dataclasses.replace(spec, corpus=corpus)
    trials = expand(spec)
    for t in trials:  # every trial's config, validated before anything starts
        trial_config(spec, t)
    if overwrite:
        for part in ("sweep", "trials"):
            root.delete(part)
    text = spec_text(spec)
    if root.exists("sweep", "spec.yaml") and root.read_text("sweep", "spec.yaml") != text:
        raise ArtifactError(f"{root.uri('sweep')} holds a sweep of another spec (see its spec.yaml); use a new --run, "
                            "or --overwrite to discard its results and trials (the shared AEs and latents are kept)")
    root.write_text(text, "sweep", "spec.yaml")

    leases = f"calm-sweep-leases-{uuid.uuid4().hex[:8]}"
    holder = start_leases(leases)  # lives while this driver holds it
    ctx = SweepContext(root=root.uri(), config=_absolute_config(spec.config), overrides=tuple(spec.overrides),
                       corpus=corpus, budget_flops=spec.budget_flops, validations=spec.validations, leases=leases)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": spec.trial_cpus})
    path = root.uri("sweep", EXPERIMENT)
    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # "ae" trials report no BrierLM
        scheduler = ASHAScheduler(time_attr="step", metric=spec.metric, mode=spec.mode, max_t=10**9,
                                  grace_period=max(1, spec.grace_steps or 1))
    if tune.Tuner.can_restore(path):
        progress(f"[sweep] continuing {path}: finished trials are kept, the others resume from their checkpoints")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        progress(f"[sweep] {spec.name}: {len(trials)} trials, {spec.max_concurrent} at a time, in {root.uri()}")
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([dataclasses.asdict(t) for t in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, scheduler=scheduler,
                                        trial_dirname_creator=trial_dirname, trial_name_creator=trial_name),
            # verbose=0: Tune's own tables of every report are left out; each trial prints its stages' progress
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=root.uri("sweep"),
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures), verbose=0),
        )
    grid = tuner.fit()
    rows, text = write_results(root, spec, trials, grid)
    progress(f"[sweep] results in {root.uri('sweep')} (results.parquet, results.md, curves.png):\n{text}")
    failed = [r["trial"] for r in rows if r["status"].startswith("error")]
    if failed:
        progress(f"[sweep] {len(failed)} trial(s) failed: {', '.join(failed)}; rerun the command to retry them")
    ray.kill(holder)
    return rows


def _absolute_config(config: str) -> str:
    """A config path made absolute (trials run elsewhere); a built-in name stays a name."""
    from calm_core.config import resolve_config_path

    p = resolve_config_path(config)  # an unknown name or a missing file fails here
    return str(p.resolve()) if os.path.exists(config) else config
