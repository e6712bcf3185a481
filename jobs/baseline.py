#!/usr/bin/env python
"""The discrete baseline: the same Transformer backbone over tokens with a softmax head, trained on
the token blocks of RUN/latents (same tokenizer, corpus, split) with Ray Train + DeepSpeed ZeRO;
writes RUN/baseline.

Needs RUN/ae and RUN/latents (jobs/stage1.py, jobs/precompute_latents.py); --ae PATH names another
AE, whose hash the latents must match. Rerunning the same command resumes from the last
checkpoint; a finished run is left alone (raise baseline.max_steps to extend it).

    python jobs/baseline.py --config small --run runs/small
"""

import _bootstrap  # noqa: F401

from pipelines.cli import job_main, make_parser, parse
from pipelines.ray_env import init_ray


def main(argv=None):
    parser = make_parser(__doc__.split("\n\n")[0], corpus=False)
    parser.add_argument("--ae", default=None, help="the autoencoder artifact (default: RUN/ae)")
    args, cfg, run = parse(parser, argv)
    from pipelines.stage2 import run_stage2

    ae_dir = args.ae or str(run.local_artifact("ae"))  # a missing AE fails before Ray starts
    init_ray(cfg.ray)
    run_stage2(cfg, run, kind="baseline", ae_path=ae_dir, overwrite=args.overwrite)


if __name__ == "__main__":
    raise SystemExit(job_main(main))
