#!/usr/bin/env python
"""The whole CALM chain on one corpus, each stage resumable: tokenizer -> stage 1 (autoencoder,
Ray Train + DeepSpeed) -> reconstruction report -> latents (Ray Data, Parquet) -> stage 2 (the
CALM model, Ray Train + DeepSpeed, with its held-out BrierLM) -> evaluation on the held-out
documents (RUN/eval/heldout: report and plots) -> a generated sample. --baseline trains the token
baseline too (also jobs/baseline.py); evaluation on other corpora: jobs/evaluate.py; generation:
jobs/generate.py.

    python jobs/run_all.py                      # demo config, Shakespeare plays, runs/demo
    python jobs/run_all.py --config small --corpus data/train.txt --run runs/small
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

from pipelines.cli import job_main, make_parser, parse
from pipelines.ray_env import init_ray


def parser():
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="", help="text the final sample continues (default: a new document)")
    p.add_argument("--baseline", action="store_true", help="also train the same-backbone token baseline (after "
                   "CALM; the evaluation then scores both)")
    return p


def main(argv=None):
    args, cfg, run = parse(parser(), argv)
    import dataclasses

    from calm_core.errors import DataError
    from pipelines.eval.ae_report import ae_report
    from pipelines.eval.job import evaluate
    from pipelines.eval.report import short_table
    from pipelines.data.precompute import precompute_latents
    from pipelines.train.stage1 import run_stage1
    from pipelines.train.stage2 import run_stage2

    print(f"[run_all] run directory {run.uri()}, corpus {args.corpus}", flush=True)
    init_ray(cfg.ray)
    run_stage1(cfg, args.corpus, run, overwrite=args.overwrite)
    ae_report(cfg, args.corpus, run)
    precompute_latents(cfg, args.corpus, run, overwrite=args.overwrite, replace_stale=True)
    run_stage2(cfg, run, "calm", overwrite=args.overwrite, replace_stale=True)
    if args.baseline:
        run_stage2(cfg, run, "baseline", overwrite=args.overwrite, replace_stale=True)
    try:
        rep = evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, split="heldout")), run,
                       args.corpus, "heldout", overwrite=args.overwrite)
        blocks = ", ".join(f"{k} {rep['blocks'][k]} blocks of {rep['context_chunks'][k]} chunks" for k in rep["models"])
        print(f"[run_all] evaluation on the held-out documents ({blocks}; full report and plots in "
              f"{run.uri('eval', 'heldout')}):\n{short_table(rep)}", flush=True)
    except DataError as e:  # a corpus too small to hold out a block: the trained run is still complete
        print(f"[run_all] evaluation skipped: {e}", flush=True)
    from pipelines.serve.generation import Generator

    gen = Generator.from_run(run)
    out = gen.complete(args.prompt, chunks=24, temperature=0.5, candidates=200, stop_at_end=False)
    print(f"[run_all] a sample (temperature 0.5, {out['tokens']} tokens in {out['steps']} steps of "
          f"{gen.model.K} tokens, {out['seconds']:.1f}s):\n{out['prompt_used']}{out['completion']}", flush=True)


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
