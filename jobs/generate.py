#!/usr/bin/env python
"""Generate text with a trained CALM run: RUN/calm and the AE it was trained on (checked by hash).
One Transformer step per chunk of K tokens; temperature < 1 is likelihood-free (CALM.md section 4):
the batch approximation over --candidates head samples per step (default, fast), or --sampler exact
(law P^(1/T), at most --max-draws draws per step before it falls back to the batch approximation).

    python jobs/generate.py --run runs/demo --prompt "ROMEO:" --chunks 24 --temperature 0.5
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

from calm_core.errors import ConfigError
from pipelines.cli import job_main, make_parser, parse


def parser():
    p = make_parser(__doc__.split("\n\n")[0], corpus=False, trains=False, ae=True)
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--chunks", type=int, default=16, help="chunks to generate (K tokens each; default 16)")
    p.add_argument("--temperature", type=float, default=0.5, help="in (0, 1]; 1 = one head sample per step "
                   "(default 0.5, the paper's advice for fluent text)")
    p.add_argument("--candidates", type=int, default=200, help="head samples per step when temperature < 1 (default 200)")
    p.add_argument("--sampler", choices=("batch", "exact"), default="batch",
                   help="temperature < 1: batch approximation (default) or the exact sampler")
    p.add_argument("--max-draws", type=int, default=2000, help="exact sampler: draws per step before the "
                   "batch-approximation fallback (default 2000; fallbacks are reported)")
    p.add_argument("--samples", type=int, default=1, help="independent completions to print (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-stop", action="store_true", help="keep generating past end-of-text (a new line per document)")
    return p


def main(argv=None):
    args, _, run = parse(parser(), argv)
    from calm_core.sampling import SamplingError, SamplingParams
    from pipelines.serve.generation import OFFLINE, Generator

    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    try:  # the checks every sampler caller shares (calm_core.sampling); chunks are counted as tokens there
        SamplingParams(args.chunks, args.temperature, seed=args.seed, candidates=args.candidates, sampler=args.sampler,
                       max_draws=args.max_draws).check("calm", OFFLINE)
    except SamplingError as e:
        flag = "--chunks" if e.param == "max_tokens" else f"--{e.param.replace('_', '-')}"
        raise ConfigError(f"{flag}: {e}".replace("max_tokens", "chunks")) from None
    import torch

    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device {args.device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu or auto")
    gen = Generator.from_run(run, args.ae, args.device)
    for i in range(args.samples):
        out = gen.complete(args.prompt, args.chunks, args.temperature, args.candidates, args.seed + i,
                           stop_at_end=not args.no_stop, sampler=args.sampler, max_draws=args.max_draws)
        print(f"--- sample {i + 1} ({out['tokens']} tokens in {out['steps']} steps, {out['seconds']:.2f}s"
              f"{', stopped at end-of-text' if out['ended'] and not args.no_stop else ''}; prompt used: {out['prompt_used']!r})")
        if out["exact"]:
            e = out["exact"]
            print(f"exact sampler: {e['draws']:,} draws for {e['rows']} chunks, {e['fallbacks']} fell back to the "
                  f"batch approximation after --max-draws {args.max_draws}")
        if out["warning"]:
            print(f"warning: {out['warning']}")
        print(out["prompt_used"] + out["completion"], flush=True)


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
