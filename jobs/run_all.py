#!/usr/bin/env python
"""The whole CALM chain on one corpus, each stage resumable: tokenizer -> stage 1 (autoencoder,
Ray Train + DeepSpeed) -> reconstruction report -> latents (Ray Data, Parquet) -> stage 2 (the
CALM model, Ray Train + DeepSpeed, with its held-out BrierLM) -> a generated sample. The baseline
has its own job (jobs/baseline.py), generation too (jobs/generate.py).

    python jobs/run_all.py                      # demo config, Shakespeare plays, runs/demo
    python jobs/run_all.py --config small --corpus data/train.txt --run runs/small
"""

import _bootstrap  # noqa: F401

from pipelines.cli import job_main, make_parser, parse
from pipelines.ray_env import init_ray


def main(argv=None):
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="", help="text the final sample continues (default: a new document)")
    args, cfg, run = parse(p, argv)
    from pipelines.eval.ae_report import ae_report
    from pipelines.data.precompute import precompute_latents
    from pipelines.train.stage1 import run_stage1
    from pipelines.train.stage2 import run_stage2

    print(f"[run_all] run directory {run.uri()}, corpus {args.corpus}", flush=True)
    init_ray(cfg.ray)
    run_stage1(cfg, args.corpus, run, overwrite=args.overwrite)
    ae_report(cfg, args.corpus, run)
    precompute_latents(cfg, args.corpus, run, overwrite=args.overwrite, replace_stale=True)
    m = run_stage2(cfg, run, "calm", overwrite=args.overwrite, replace_stale=True)["metrics"]
    briers = ", ".join(f"{m.get(k, float('nan')):.3f}" for k in ("val_brier1", "val_brier2", "val_brier3", "val_brier4"))
    print(f"[run_all] CALM held-out BrierLM {m.get('val_brierlm', float('nan')):.2f} (Brier-1..4 {briers})", flush=True)
    from pipelines.serve.generation import Generator

    gen = Generator.from_run(run)
    out = gen.complete(args.prompt, chunks=24, temperature=0.5, candidates=200, stop_at_end=False)
    print(f"[run_all] a sample (temperature 0.5, {out['tokens']} tokens in {out['steps']} steps of "
          f"{gen.model.K} tokens, {out['seconds']:.1f}s):\n{out['prompt_used']}{out['completion']}", flush=True)


if __name__ == "__main__":
    raise SystemExit(job_main(main))
