#!/usr/bin/env python
"""Official CALM checkpoints (shaochenze/calm, the released cccczshao/CALM-* models) in this project.

    import   official folders -> a run directory that every job reads (generate, evaluate, serve, fine-tune)
    parity   the run's models recompute a reference folder's official outputs (noise replayed); exit 0 only if equal
    export   a run's models -> the official format (pytorch_model.bin + config.json + a model card), for the official
             code and the Hub (hf upload ORG/NAME OUT/calm)

    python jobs/official.py import --calm hf://cccczshao/CALM-M --tokenizer hf://cccczshao/CALM-M --run runs/calm-m
    python jobs/official.py parity --run runs/calm-m --reference tests/fixtures/official-calm
    python jobs/official.py export --run runs/calm-m --out exported/
docs/OFFICIAL.md maps every official name and setting to this project's.
"""

import argparse
import sys

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

from calm_core.config import load_config
from calm_core.errors import ConfigError
from pipelines.cli import job_main
from pipelines.storage import RunDir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="official checkpoint folders or hf:// repos -> a run directory")
    imp.add_argument("--calm", help="EnergyTransformer folder, URI or hf://ORG/NAME[@REVISION] (config.json + "
                     "pytorch_model.bin / model.safetensors / shards with their *.index.json); its AE copy is used "
                     "when --ae is absent")
    imp.add_argument("--ae", help="Autoencoder folder, URI or hf://ORG/NAME[@REVISION] (default: the ae_model.* "
                     "copy inside --calm)")
    imp.add_argument("--baseline", help="LlamaForCausalLM folder, URI or hf://ORG/NAME[@REVISION] (the token baseline)")
    imp.add_argument("--tokenizer", required=True, help="tokenizer.json (or a folder or hf://ORG/NAME[@REVISION] "
                     "repo holding one) the models were trained with; its size and special ids are checked against "
                     "the configs. hf:// repos come through the Hub cache (HF_HOME, HF_HUB_OFFLINE=1, HF_TOKEN "
                     "apply); each manifest records the commit")
    imp.add_argument("--run", required=True, help="run directory or URI to create")
    imp.add_argument("--config", default="demo", help="config whose other sections (data, training, serving, "
                     "evaluation) the run gets; ae/model/head come from the checkpoints (default: demo)")
    imp.add_argument("--overwrite", action="store_true", help="replace the run's tokenizer and models")
    imp.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of that config")
    par = sub.add_parser("parity", help="recompute a reference folder's official outputs with the run's models")
    par.add_argument("--run", required=True)
    par.add_argument("--reference", required=True, help="folder with reference.safetensors (+ reference.json)")
    par.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    par.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    par.add_argument("--only", default="ae,calm,baseline", help="models to check (default: ae,calm,baseline)")
    exp = sub.add_parser("export", help="a run's models -> the official format, with model cards")
    exp.add_argument("--run", required=True)
    exp.add_argument("--out", required=True, help="folder to write ae/, calm/, baseline/ into (each "
                     "uploadable as it is: hf upload ORG/NAME OUT/calm)")
    exp.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    run = RunDir(args.run)
    from pipelines import official

    if args.command == "import":
        cfg = load_config(args.config, args.overrides)
        official.import_official(cfg, run, args.tokenizer, args.calm, args.ae, args.baseline, args.overwrite)
        print(f"imported into {run.uri()}; check it: python jobs/official.py parity --run {args.run} --reference DIR")
    elif args.command == "parity":
        only = tuple(x.strip() for x in args.only.split(",") if x.strip())
        if not only or set(only) - set(official.KINDS):
            raise ConfigError(f"--only takes a comma-separated subset of {', '.join(official.KINDS)}, got {args.only!r}")
        from pipelines.parity import run_parity

        checks = run_parity(run, args.reference, args.atol, args.rtol, only)
        for c in checks:
            print(c.line(), flush=True)
        bad = [c for c in checks if not c.passed]
        compared = sum(c.status in ("ok", "FAIL") for c in checks)
        print(f"parity: {compared - sum(c.status == 'FAIL' for c in bad)} of {compared} tensors within atol {args.atol:g} / "
              f"rtol {args.rtol:g}" + (f"; {len(bad)} not passed ({', '.join(c.name for c in bad[:5])})" if bad else ""))
        if bad:
            raise SystemExit(1)
    else:
        official.export_official(run, args.out, args.overwrite)


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    sys.exit(job_main(main))


if __name__ == "__main__":
    cli()
