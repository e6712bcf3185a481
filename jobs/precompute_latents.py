#!/usr/bin/env python
"""Offline latent precomputation: the frozen stage-1 encoder over every K-token chunk of the corpus,
written once as Parquet (RUN/latents) for stage 2.

Reads RUN/ae (or --ae PATH), ingests the corpus with the AE's tokenizer and chunk rule, encodes the
chunks in one Ray Data actor pool for the whole job (one streaming execution, however many shards)
and writes each shard's Parquet part files as its rows arrive (docs/LATENTS.md). Rerunning the same command
finishes an interrupted run (every chunk exactly once) or says the output is complete; latents of
another AE, tokenizer, K or dtype in RUN/latents are refused unless --overwrite. A rerun names the
run's corpus again (without --corpus a job reads the default corpus, the Shakespeare plays).

    python jobs/precompute_latents.py --config small --corpus data/train.txt --run runs/small
    python jobs/precompute_latents.py --config small --corpus data/train.txt --run runs/small --overwrite latents.dtype=float16
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

from pipelines.cli import job_main, make_parser, parse
from pipelines.ray_env import init_ray


def parser():
    return make_parser(__doc__.split("\n\n")[0], ae=True)


def main(argv=None):
    args, cfg, run = parse(parser(), argv)
    from calm_core.autoencoder import load_autoencoder_dir
    from pipelines.data.precompute import precompute_latents

    ae_dir = args.ae or str(run.local_artifact("ae"))  # a missing or damaged AE fails before Ray starts
    load_autoencoder_dir(ae_dir)
    init_ray(cfg.ray)
    precompute_latents(cfg, args.corpus, run, ae_path=ae_dir, overwrite=args.overwrite)


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
