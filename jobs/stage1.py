#!/usr/bin/env python
"""Stage 1: train the CALM chunk autoencoder with Ray Train + DeepSpeed ZeRO.

Reads the corpus through Ray Data, makes RUN/tokenizer if the run has none, and writes RUN/ae
(consolidated safetensors, resolved config, tokenizer, manifest, metrics). Rerunning the same
command resumes from the last checkpoint; a finished run is left alone.

    python jobs/stage1.py --config small --corpus data/train.txt --run runs/small
    ray job submit --working-dir . -- python jobs/stage1.py --config small --run s3://bucket/run
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

from pipelines.cli import job_main, make_parser, parse
from pipelines.ray_env import init_ray


def parser():
    return make_parser(__doc__.split("\n\n")[0])


def main(argv=None):
    args, cfg, run = parse(parser(), argv)
    from pipelines.train.stage1 import run_stage1

    init_ray(cfg.ray)
    run_stage1(cfg, args.corpus, run, overwrite=args.overwrite)


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
