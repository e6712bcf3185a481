#!/usr/bin/env python
"""Generation speed: CALM (one backbone step per chunk of K tokens) against the same-backbone token
baseline (one step per token), both with a KV cache, on the same prompts.

    python bench/bench_generation.py --run /tmp/bench-small --corpus tinystories-sample.txt

Needs RUN/calm, RUN/baseline and RUN/ae (bench/bench_stage2.py makes them). Prompts are the first
--prompt-tokens tokens of documents from --corpus (plain text, one document per blank-line or
<|endoftext|> block). For every batch size: generated tokens per second of CALM at temperature 1
(one head sample per step), CALM at --temperature with --candidates head samples per step (the
likelihood-free batch approximation), and the baseline at temperature 1; the median of --repeats
runs after one warm-up. Plain PyTorch in one process (no Ray): what a serving replica runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from calm_core.generate import generate, prompt_chunks  # noqa: E402
from calm_core.temperature import ExactStats  # noqa: E402
from pipelines.progress import timed  # noqa: E402


def prompts_from(corpus: str | None, tok, n: int, length: int, K: int) -> list[list[int]]:
    """The first ``length`` tokens (a multiple of K) of the first n documents that long."""
    from pipelines.data.files import default_corpus, resolve_corpus_files
    from pipelines.data.parsers import split_text

    fs, files, _ = resolve_corpus_files(corpus or default_corpus(), "text")
    documents = (doc for f in files for doc in split_text(fs.open_input_file(f).read(), "auto", "<|endoftext|>"))
    out = []
    for raw in documents:
        ids = tok.encode(raw.decode("utf-8", errors="replace").strip())
        if len(ids) >= length:
            out.append(ids[: length - length % K])
        if len(out) == n:
            return out
    raise SystemExit(f"error: fewer than {n} documents of >= {length} tokens in {corpus}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory with RUN/calm, RUN/baseline and RUN/ae")
    ap.add_argument("--corpus", default=None, help="file, directory or glob (default: the project's default "
                    "corpus, the Shakespeare plays; docs/BENCHMARKS.md says which corpus each figure used)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens to generate per sequence")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--max-draws", type=int, default=2000, help="the exact sampler's cap per step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="bench/results/generation.json")
    return ap


def main() -> None:
    args = parser().parse_args()

    from pipelines.serve.generation import Generator
    from calm_core.artifacts import load_model
    from pipelines.storage import RunDir

    torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    gen = Generator.from_run(run)
    lm = load_model(run.local_artifact("baseline"), "baseline").model
    tok, K = gen.tok, gen.model.K
    chunks = args.tokens // K
    rows = []
    for B in args.batch_sizes:
        prompts = prompts_from(args.corpus, tok, B, args.prompt_tokens, K)
        ids = torch.tensor(prompts)  # [B, T]
        ctx = torch.cat([prompt_chunks(p, K, "document", tok.eot_id, tok.pad_id)[0] for p in prompts])  # [B, 1 + T/K, K]
        g = torch.Generator().manual_seed(0)
        exact = ExactStats()
        cases = {
            "CALM, T=1": lambda: generate(gen.model, gen.ae, ctx, chunks, 1.0, generator=g),
            f"CALM, T={args.temperature} ({args.candidates} candidates)":
                lambda: generate(gen.model, gen.ae, ctx, chunks, args.temperature, args.candidates, g),
            f"CALM, T={args.temperature} (exact sampler)":
                lambda: generate(gen.model, gen.ae, ctx, chunks, args.temperature, args.candidates, g, "exact",
                                 args.max_draws, exact),
            "baseline, T=1": lambda: lm.generate(ids, chunks * K, 1.0, generator=g),
        }
        for name, fn in cases.items():
            s = timed(fn, args.repeats)
            steps = chunks if name.startswith("CALM") else chunks * K
            rows.append({"batch": B, "model": name, "seconds": s, "steps": steps,
                         "tokens_per_s": B * chunks * K / s, "ms_per_step": 1000 * s / steps})
            if "exact" in name:  # over the warm-up and the repeats
                rows[-1].update(draws_per_chunk=exact.draws / exact.rows, fallback_share=exact.fallbacks / exact.rows)
            print(f"[bench] batch {B} {name}: {B * chunks * K / s:,.0f} tokens/s", flush=True)

    res = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {args.threads} threads, Python "
                      f"{platform.python_version()}, torch {torch.__version__}",
           "run": args.run, "tokens": chunks * K, "prompt_tokens": args.prompt_tokens, "K": K, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\ngeneration, {chunks * K} new tokens after {args.prompt_tokens}-token prompts, K={K}, {res['machine']}")
    print("| batch | model | steps | ms / step | tokens/s | vs baseline | exact: draws per chunk, fallbacks |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["model"].startswith("baseline"))
        print(f"| {r['batch']} | {r['model']} | {r['steps']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              + (f"{r['draws_per_chunk']:.0f}, {100 * r['fallback_share']:.1f}% |" if "draws_per_chunk" in r else "- |"))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
