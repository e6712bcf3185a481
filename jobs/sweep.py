#!/usr/bin/env python
"""A sweep of config overrides as a Ray Tune experiment: each trial one model (CALM, the baseline,
or an AE alone) trained by the project's own stages, trials with the same AE setting sharing one
AE and one latent set (DIR/shared), each trial's held-out metrics reported to Tune as it trains.
Rerunning the command continues an interrupted sweep (finished trials are kept). Results:
DIR/sweep/results.parquet, results.md (the paper's number beside each row) and curves.png.

    python jobs/sweep.py --spec recipe-gutenberg --corpus 'books/*.txt' --run runs/sweep-recipe   # its corpus: yours
    python jobs/sweep.py --spec ae-robustness --quick --run runs/sweep-ae      # the 2-core size
    python jobs/sweep.py --spec my-sweep.yaml --corpus data/train.txt --run s3://bucket/sweeps/a

Shipped specs (jobs/sweeps/*.yaml, by name): see --list. The spec format: pipelines/sweep/spec.py
and docs/ABLATIONS.md.
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

import argparse

from pipelines.cli import job_main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--spec", help="a sweep spec: YAML path, or the name of a shipped one (jobs/sweeps/)")
    p.add_argument("--quick", action="store_true", help="the spec's quick variant (its 'quick:' section: minutes on 2 cores)")
    p.add_argument("--corpus", default=None, help="corpus of every trial (default: the spec's, else the Shakespeare plays)")
    p.add_argument("--run", default=None, help="the sweep's directory or URI (default: runs/sweep-<spec name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard this sweep's results and trials (the shared AEs and latents are kept)")
    p.add_argument("--list", action="store_true", help="list the shipped specs and exit")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    from pipelines.ray_env import ray_environment

    ray_environment()  # before anything imports ray
    from pipelines.sweep.spec import builtin_specs, load_spec

    if args.list:
        for f in sorted(builtin_specs().glob("*.yaml")):
            s = load_spec(str(f))
            print(f"{f.stem:24s} {s.description}")
        return
    if not args.spec:
        p.error("--spec is required (or --list)")
    spec = load_spec(args.spec, quick=args.quick)
    from calm_core.config import load_config
    from pipelines.data.files import default_corpus, resolve_corpus_files
    from pipelines.ray_env import init_ray
    from pipelines.storage import RunDir
    from pipelines.sweep.run import _absolute_corpus, run_sweep

    corpus = args.corpus or spec.corpus or default_corpus()
    base = load_config(spec.config, spec.overrides)
    resolve_corpus_files(corpus, base.data.format)  # a bad path fails here, before Ray starts
    run = RunDir(args.run or f"runs/sweep-{spec.name}{'-quick' if args.quick else ''}")
    init_ray(base.ray)
    run_sweep(spec, run, _absolute_corpus(corpus), overwrite=args.overwrite)


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
