#!/usr/bin/env python
"""Evaluate every model of a run (CALM, the baseline) on any corpus: BrierLM with intervals, the
baseline's cross-entropy, CALM's latent and energy scores, next-chunk agreement (accuracy, exact
match, BLEU, ROUGE-L), the temperature trade-off and the AE's reconstruction by token frequency.
Writes RUN/eval/NAME/ (report.json, report.md, PNG plots); the same inputs again are a no-op.

    python jobs/evaluate.py --run runs/demo --corpus wikitext_document_level-test.json --name wikitext   # README.md
    python jobs/evaluate.py --run runs/demo --corpus data/valid.jsonl eval.actors=2 eval.max_blocks=500
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

from pathlib import Path

from pipelines.cli import job_main, make_parser, parse
from pipelines.ray_env import init_ray


def parser():
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--name", default=None, help="RUN/eval/NAME (default: the corpus file's name)")
    return p


def main(argv=None):
    args, cfg, run = parse(parser(), argv)
    from pipelines.eval.job import evaluate, run_models
    from pipelines.eval.report import markdown

    run_models(run)  # a run with nothing to evaluate fails before Ray starts
    name = args.name or Path(args.corpus.rstrip("/")).stem.replace("*", "_") or "corpus"
    init_ray(cfg.ray)
    report = evaluate(cfg, run, args.corpus, name, overwrite=args.overwrite)
    print(markdown(report))


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
