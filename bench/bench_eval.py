#!/usr/bin/env python
"""The evaluation job on corpora a run's models were not trained on, and its own throughput with 1
and 2 scoring actors.

    python bench/bench_eval.py --run /tmp/bench-small \
        --corpus ../shared/data/tinystories-sample/valid.txt ../shared/data/wikitext-2/wiki.test.tokens \
                 ../shared/data/tinyshakespeare/input.txt --max-blocks 300 --plots docs/img/eval

For every corpus: jobs/evaluate.py's evaluation (RUN/eval/<corpus name>), the main figures of both
models side by side. Then the first corpus again with --actors 1 and 2 (fresh evaluations named
throughput-a1 / -a2, each re-encoding the corpus first; the figure is the scoring's tokens/s only),
and the ratio. --plots copies each report's PNGs to DIR/<name>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def name_of(corpus: str) -> str:
    return Path(corpus).stem.replace(".", "-")


def table(results: list[dict]) -> None:
    print("| corpus | model | blocks | BrierLM (95%) | Brier-1 | Brier-2 | Brier-3 | Brier-4 | cross-entropy / ppl "
          "| next-chunk token acc | exact chunk | BLEU | ROUGE-L |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        rep = r["report"]
        for k in rep["models"]:
            m = rep[k]
            ci = "{:.2f}..{:.2f}".format(*m["brierlm_ci95"]) if "brierlm_ci95" in m else ""
            ce = f"{m['cross_entropy']['mean']:.3f} / {m['perplexity']:.1f}" if "cross_entropy" in m else "-"
            a = m["agreement"]
            print(f"| {r['name']} | {k} | {rep['blocks'][k]} | {m['brierlm']:.2f} ({ci}) | "
                  + " | ".join(f"{m[f'brier{n}']['mean']:.4f}" for n in (1, 2, 3, 4))
                  + f" | {ce} | {a['token_accuracy']['mean']:.4f} | {a['exact_chunk']['mean']:.4f} | {a['bleu']:.2f} "
                    f"| {a['rouge_l']:.4f} |")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--corpus", nargs="+", required=True)
    ap.add_argument("--config", default="small", help="config whose eval/data sections apply")
    ap.add_argument("--max-blocks", type=int, default=300, help="blocks per corpus (0: only the throughput runs)")
    ap.add_argument("--actors", type=int, nargs="*", default=[1, 2], help="actor counts of the throughput runs (none: skip)")
    ap.add_argument("--throughput-blocks", type=int, default=64, help="blocks scored by each throughput run")
    ap.add_argument("--plots", default=None, help="copy each report's PNGs to DIR/<name>/")
    ap.add_argument("--out", default="bench/results/eval.json")
    ap.add_argument("--from-json", default=None, help="only print the tables of a saved result")
    ap.add_argument("overrides", nargs="*", help="eval.* / data.* settings (e.g. eval.samples=16)")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        res = run(args)
    table(res["results"])
    tp = res["throughput"]
    if tp:
        base = tp[0]["tokens_per_s"]
        print("\n| actors | blocks | tokens scored | seconds | tokens/s | vs 1 actor |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
        for t in tp:
            print(f"| {t['actors']} | {t['blocks']} | {t['tokens_scored']:,} | {t['seconds']:.1f} | "
                  f"{t['tokens_per_s']:,.0f} | {t['tokens_per_s'] / base:.2f} |")


def cpus_per_actor(actors: int) -> float:
    """What each of ``actors`` scoring actors reserves: the machine's CPUs less the 1 that Ray Data's
    file listing needs (pipelines.eval.job.check_fits); the threads use every core."""
    return ((os.cpu_count() or 2) - 1) / actors


def run(args) -> dict:
    from calm_core.config import load_config
    from pipelines.eval.job import evaluate
    from pipelines.ray_env import init_ray
    from pipelines.storage import RunDir

    cfg = load_config(args.config, [f"eval.max_blocks={args.max_blocks}", *args.overrides])
    rd = RunDir(args.run)
    init_ray(cfg.ray)
    results = []
    for corpus in args.corpus if args.max_blocks else []:
        name = name_of(corpus)
        rep = evaluate(cfg, rd, corpus, name)
        results.append({"name": name, "corpus": corpus, "report": rep})
        if args.plots:
            dest = Path(args.plots) / name
            dest.mkdir(parents=True, exist_ok=True)
            for png in Path(rd.path("eval", name)).glob("*.png"):
                shutil.copy(png, dest / png.name)
    throughput = []
    for a in args.actors:
        c = load_config(args.config, [f"eval.max_blocks={args.throughput_blocks}", *args.overrides,
                                      f"eval.actors={a}", f"eval.cpus_per_actor={cpus_per_actor(a)}",
                                      f"eval.threads_per_actor={max(1, (os.cpu_count() or 2) // a)}"])
        rep = evaluate(c, rd, args.corpus[0], f"throughput-a{a}", overwrite=True)
        throughput.append({"actors": a, "blocks": sum(rep["blocks"].values()), **rep["throughput"]})
    res = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
           "run": args.run, "config": args.config, "max_blocks": args.max_blocks, "results": results,
           "throughput": throughput}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
