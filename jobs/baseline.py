#!/usr/bin/env python
"""The discrete baseline: the same Transformer backbone over tokens with a softmax head, trained on
the token blocks of RUN/latents (same tokenizer, corpus, split) with Ray Train + DeepSpeed ZeRO;
writes RUN/baseline.

Needs RUN/ae and RUN/latents (jobs/stage1.py, jobs/precompute_latents.py); --ae PATH names another
AE, whose hash the latents must match. Rerunning the same command resumes from the last
checkpoint; a finished run is left alone (raise baseline.max_steps to extend it).

    python jobs/baseline.py --config small --run runs/small
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

from pipelines.cli import job_main
from pipelines.train.stage2 import job

parser, main = job("baseline", __doc__.split("\n\n")[0])


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
