#!/usr/bin/env python
"""The whole CALM chain on one corpus, each stage resumable: tokenizer -> stage 1 (autoencoder,
Ray Train + DeepSpeed) -> reconstruction report -> latents (Ray Data, Parquet) -> stage 2 (the
CALM model, Ray Train + DeepSpeed). Later stages (evaluation, generation) join this chain as they
land; the baseline has its own job (jobs/baseline.py).

    python jobs/run_all.py                      # demo config, Shakespeare plays, runs/demo
    python jobs/run_all.py --config small --corpus data/train.txt --run runs/small
"""

import _bootstrap  # noqa: F401

from pipelines.cli import job_main, make_parser, parse
from pipelines.ray_env import init_ray


def main(argv=None):
    args, cfg, run = parse(make_parser(__doc__.split("\n\n")[0]), argv)
    from pipelines.ae_report import ae_report
    from pipelines.precompute import precompute_latents
    from pipelines.stage1 import run_stage1
    from pipelines.stage2 import run_stage2

    print(f"[run_all] run directory {run.uri()}, corpus {args.corpus}", flush=True)
    init_ray(cfg.ray)
    run_stage1(cfg, args.corpus, run, overwrite=args.overwrite)
    ae_report(cfg, args.corpus, run)
    precompute_latents(cfg, args.corpus, run, overwrite=args.overwrite, replace_stale=True)
    run_stage2(cfg, run, "calm", overwrite=args.overwrite, replace_stale=True)


if __name__ == "__main__":
    raise SystemExit(job_main(main))
