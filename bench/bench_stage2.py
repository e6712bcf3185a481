#!/usr/bin/env python
"""Stage-2 benchmark: CALM (energy head) against the same-backbone softmax Transformer at equal
training-FLOP budgets, on the same tokenizer, corpus, split and blocks.

    python bench/bench_stage2.py --run /tmp/bench-small --corpus tinystories-sample.txt \
        --budgets 6e12 1.2e13 2.4e13
    # head A/Bs: CALM variants only, each a name and its overrides
    python bench/bench_stage2.py --run /tmp/ab/demo --config demo --budgets 3.05e13 --no-baseline \
        --variants adanorm:head.arch=adanorm,head.init=torch paper:head.arch=paper,head.init=normal

Needs RUN/ae (e.g. from bench/bench_stage1.py --run DIR); makes RUN/latents if missing. For every
budget and model: a fresh Ray Train + DeepSpeed run whose max_steps spends the budget (cosine
schedule to that step), then held-out evaluation on the driver with plain PyTorch
(``calm_core.evaluate``) at every chunk start of the held-out blocks: CALM's BrierLM from
``--brier-samples`` head samples per position decoded by the AE; the baseline's BrierLM from its
probabilities (exact P(y), exact Brier-1), with its sample-only estimate from as many sampled
continuations beside it, and its exact Brier-1 over every token. Also the step time of each model
in a plain single-process torch loop against the Ray run. Prints tables and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calm_core.autoencoder import load_autoencoder_dir  # noqa: E402
from calm_core.config import load_config  # noqa: E402
from calm_core.optim import param_groups  # noqa: E402


def evaluate(kind: str, run, ae_dir: Path, val: dict, samples: int, seed: int = 0) -> dict:
    from calm_core.evaluate import baseline_heldout, calm_heldout, heldout_record
    from calm_core.artifacts import load_model

    art = load_model(Path(run.path(kind)), kind)
    model, cfg, tok = art.model, art.cfg, art.tok
    torch.set_num_threads(os.cpu_count() or 1)
    # tokens and the blocks' keys (their noise seeds) stay integers; mu / log_sigma float32
    v = {k: torch.as_tensor(np.asarray(x, dtype=np.int64 if k in ("tokens", "key") else np.float32)) for k, x in val.items()}
    if kind == "calm":
        ae = load_autoencoder_dir(ae_dir)[0]
        sums = calm_heldout(model, ae, v, 8, samples, seed)
    else:
        sums = baseline_heldout(model, v, 8, cfg.ae.K, samples, seed, tok.pad_id)
    return heldout_record(kind, sums)


def plain_step_time(kind: str, cfg, vocab: int, blocks: dict, seconds: float) -> float:
    """Seconds per step of the same model and global batch in one process (no Ray, no DeepSpeed)."""
    from calm_core.artifacts import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    section = "stage2" if kind == "calm" else "baseline"
    t = getattr(cfg, section)
    model = build_model(kind, cfg, vocab)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
    batch = t.batch_size * cfg.distributed.num_workers
    tok = torch.as_tensor(np.asarray(blocks["tokens"], dtype=np.int64))
    mu = torch.as_tensor(np.asarray(blocks["mu"], dtype=np.float32))
    ls = torch.as_tensor(np.asarray(blocks["log_sigma"], dtype=np.float32))
    steps, t0, warm = 0, None, 3
    while True:
        idx = torch.randint(0, len(tok), (batch,))
        loss = model(tok[idx], mu[idx], ls[idx]).loss if kind == "calm" else model(tok[idx].flatten(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps == warm:
            t0 = time.perf_counter()
        if t0 is not None and time.perf_counter() - t0 >= seconds:
            return (time.perf_counter() - t0) / (steps - warm)


def report(res: dict) -> None:
    """The tables and learning curves of a result (also: --from-json PATH)."""
    results, plain, ray_step = res["results"], res.get("plain_step_s", {}), res.get("ray_step_s", {})
    L, K = res["L"], res["K"]
    ae = res.get("ae_cost")
    print(f"\nstage 2 vs baseline, config {res['config']}, L={L} chunks (K={K}: {L * K} tokens), corpus {res['corpus']}")
    print(f"held-out: {results[0]['eval'].get('val_positions', '?')} chunk starts of "
          f"{res.get('heldout', 'the held-out split of the training corpus')}, {res.get('brier_samples', '?')} samples each")
    if ae:
        print(f"autoencoder: {ae['train_flops']:.3g} stage-1 training FLOPs + {ae['encode_flops']:.3g} to encode the "
              f"{ae['train_tokens']:,} training tokens once = {ae['train_flops'] + ae['encode_flops']:.3g} (in CALM's "
              "'incl. AE' column)")
    print("| budget (FLOPs) | model | steps | passes | tokens/s | FLOPs incl. AE | held-out loss | Brier-1 | Brier-2 "
          "| Brier-3 | Brier-4 | BrierLM | sample-only BrierLM | exact Brier-1, every token |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        e = r["eval"]
        incl = r["flops"] + (ae["train_flops"] + ae["encode_flops"] if ae and r["kind"] == "calm" else 0)
        passes = f"{r['passes']:.2f}" if "passes" in r else "?"
        print(f"| {r['budget']:.2g} | {r.get('name', r['kind'])} | {r['steps']} | {passes} | {r['tokens_per_s']:,.0f} "
              f"| {incl:.3g} | {e['val_loss']:.4f} | "
              + " | ".join(f"{e[f'val_brier{n}']:.4f}" for n in (1, 2, 3, 4))
              + f" | {e['val_brierlm']:.2f} | {e.get('val_sampled_brierlm', e['val_brierlm']):.2f}"
              + (f" | {e['val_brier1_exact']:.4f} |" if "val_brier1_exact" in e else " | - |"))
    if plain:
        print("\n| model | Ray Train + DeepSpeed step (s) | plain torch step (s) | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for k in plain:
            print(f"| {k} | {ray_step[k]:.3f} | {plain[k]:.3f} | {ray_step[k] / plain[k]:.2f} |")
    print("\nlearning curves (in-training validation: training FLOPs: held-out loss / BrierLM):")
    for r in results:
        pts = "; ".join(f"{c['train_flops']:.2g}: {c['val_loss']:.3f} / {c['val_brierlm']:.2f}" for c in r["curve"]
                        if c.get("val_loss") is not None)
        print(f"- {r.get('name', r['kind'])} ({r['budget']:.2g} budget): {pts}")


def ae_cost(ae_model, ae_cfg, ae_manifest: dict, train_chunks: int) -> dict:
    """The autoencoder's share: its stage-1 training FLOPs (from its manifest; computed from its
    metrics for an AE published before the manifest recorded them) and the one-off encoding of the
    training latents."""
    from calm_core.autoencoder import encoder_flops_per_token
    from pipelines.train.stage1 import ae_train_flops

    train = ae_manifest.get("train_flops") or ae_train_flops(ae_model, ae_cfg, ae_manifest["metrics"])
    tokens = train_chunks * ae_model.cfg.K
    return {"train_flops": float(train), "encode_flops": encoder_flops_per_token(ae_model) * tokens, "train_tokens": tokens}


def parse_variants(specs: list[str] | None) -> list[tuple[str, list[str]]]:
    """["name:a.b=1,c.d=x", ...] -> [(name, overrides)]; none given: one plain CALM."""
    if not specs:
        return [("calm", [])]
    out = []
    for v in specs:
        name, _, ov = v.partition(":")
        if not name:
            raise SystemExit(f"--variants: '{v}' has no name (NAME:key=value,...)")
        out.append((name, [x for x in ov.split(",") if x]))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run directory holding RUN/ae (RUN/latents is made if missing)")
    ap.add_argument("--corpus", default=None, help="file, directory or glob, read only when RUN/latents is missing "
                    "(default: the project's default corpus, the Shakespeare plays; docs/BENCHMARKS.md says which "
                    "corpus each figure used)")
    ap.add_argument("--config", default="small")
    ap.add_argument("--budgets", type=float, nargs="+", default=[6e12, 1.2e13, 2.4e13],
                    help="training-FLOP budgets (per model)")
    ap.add_argument("--brier-samples", type=int, default=8, help="samples per held-out position for BrierLM "
                    "(CALM: decoded head samples; baseline: sampled continuations)")
    ap.add_argument("--val-chunks", type=int, default=16384, help="held-out chunks for the driver-side evaluation "
                    "(cut into blocks of L; the whole held-out split if it is smaller)")
    ap.add_argument("--heldout-run", default=None, metavar="DIR",
                    help="score on the latents of another run directory made with the same AE (e.g. a held-out "
                         "corpus encoded with jobs/precompute_latents.py --ae RUN/ae data.val_fraction=1.0); "
                         "default: the held-out split of --run's latents")
    ap.add_argument("--plain-seconds", type=float, default=30.0, help="seconds of the plain-torch step timing "
                    "(0 = skip it)")
    ap.add_argument("--out", default="bench/results/stage2.json",
                    help="result JSON, rewritten after every run; rows already in it (same budget and model) are "
                         "kept and not rerun, so an interrupted or multi-session benchmark resumes")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME:KEY=VALUE,...",
                    help="train CALM once per variant (its name and comma-separated overrides) at every budget")
    ap.add_argument("--no-baseline", action="store_true", help="train only CALM (with --variants: the head A/Bs)")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--from-json", default=None, help="only print the tables of a saved result and exit")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()))
        return
    if not args.run:
        ap.error("--run is required (a run directory holding RUN/ae)")

    from pipelines.data import latents as LT
    from pipelines.data.files import default_corpus
    from pipelines.data.precompute import precompute_latents
    from pipelines.ray_env import init_ray
    from calm_core.artifacts import load_ae
    from pipelines.sweep.trial import budget_steps
    from pipelines.train.stage2 import held_out_blocks, run_stage2
    from pipelines.storage import RunDir

    base = load_config(args.config, args.overrides)
    init_ray(base.ray)
    run = RunDir(args.run)
    ae_dir = run.local_artifact("ae")
    ae_model, ae_cfg, tok, ae_manifest = load_autoencoder_dir(ae_dir)
    if not run.has_artifact("latents"):
        precompute_latents(load_config(args.config, args.overrides), args.corpus or default_corpus(), run)
    ae_ident = load_ae(ae_dir).identity
    lman = LT.latents_manifest(run)
    base = dataclasses.replace(base, ae=ae_cfg.ae)
    L, K = base.model.block_chunks, base.ae.K
    hrun = RunDir(args.heldout_run) if args.heldout_run else run
    val, _ = held_out_blocks(hrun, LT.latents_manifest(hrun), ae_ident, L, args.val_chunks)
    train_chunks = int(lman["metrics"]["rows_per_split"]["train"])

    out = Path(args.out)
    res = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}",
           "corpus": lman.get("inputs", {}).get("corpus", {}).get("spec", args.corpus), "config": args.config, "overrides": args.overrides, "L": L, "K": K, "results": [],
           "brier_samples": args.brier_samples,
           "heldout": (LT.latents_manifest(hrun).get("inputs", {}).get("corpus", {}).get("spec")
                       if args.heldout_run else "the held-out split of the training corpus"), "ae_cost": ae_cost(ae_model, ae_cfg, ae_manifest, train_chunks),
           "train_chunks": train_chunks}
    if out.exists():
        old = json.loads(out.read_text())
        mine = (res["config"], res["corpus"], args.overrides, res["heldout"])
        theirs = (old.get("config"), old.get("corpus"), old.get("overrides", []),
                  old.get("heldout", "the held-out split of the training corpus"))
        if mine != theirs:
            raise SystemExit(f"{out} holds results of another setup (config, corpus, overrides, held-out {theirs}, not {mine}); "
                             "give another --out")
        res["results"] = old["results"]
        print(f"[bench] {out}: keeping {len(old['results'])} finished runs", flush=True)
    done = {(r["budget"], r.get("name", r["kind"])) for r in res["results"]}

    models = [("calm", "stage2", name, ov) for name, ov in parse_variants(args.variants)]
    if not args.no_baseline:
        models.append(("baseline", "baseline", "baseline", []))
    for budget in args.budgets:
        for kind, section, name, var_ov in models:
            if (budget, name) in done:
                continue
            vcfg = dataclasses.replace(load_config(args.config, [*args.overrides, *var_ov]), ae=ae_cfg.ae)
            steps, fpt, tokens_per_step = budget_steps(vcfg, kind, tok.vocab_size, budget)
            ov = [f"{section}.max_steps={steps}", f"{section}.max_minutes=0", f"{section}.log_every={max(1, steps // 5)}",
                  f"{section}.checkpoint_every={steps}", f"{section}.warmup_steps={max(1, steps // 20)}"]
            cfg = load_config(args.config, [*args.overrides, *var_ov, *ov])
            t0 = time.perf_counter()
            m = run_stage2(cfg, run, kind, overwrite=True)
            wall = time.perf_counter() - t0
            records = [json.loads(x) for x in Path(run.path(section if kind == "baseline" else "calm",
                                                             "metrics.jsonl")).read_text().splitlines()]
            t_eval = time.perf_counter()
            ev = evaluate(kind, run, ae_dir, val, args.brier_samples)
            eval_s = time.perf_counter() - t_eval
            row = {"budget": budget, "kind": kind, "name": name, "overrides": var_ov, "steps": steps,
                   "flops": m["metrics"]["train_flops"], "flops_per_token": fpt,
                   "flops_per_token_by_part": m.get("flops_per_token_by_part"), "wall_s": wall, "eval_s": eval_s,
                   "passes": steps * tokens_per_step / (train_chunks * K),
                   "tokens_per_s": float(np.median([r["tokens_per_s"] for r in records[1:]] or [records[-1]["tokens_per_s"]])),
                   "eval": ev, "curve": [{k: r.get(k) for k in ("step", "train_flops", "val_loss", "val_brierlm")}
                                         for r in records]}
            res["results"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
            print(f"[bench] {name} budget {budget:.2g}: {steps} steps, BrierLM {ev['val_brierlm']:.2f}, "
                  f"held-out loss {ev['val_loss']:.4f}", flush=True)

    import ray

    ray.shutdown()
    if args.plain_seconds > 0:
        # the plain loop runs the config without variant overrides: compare it with the plain runs only
        last = {r["kind"]: r for r in res["results"] if r["budget"] == args.budgets[-1] and not r.get("overrides")}
        for kind in last:
            res.setdefault("plain_step_s", {})[kind] = plain_step_time(kind, base, tok.vocab_size, val, args.plain_seconds)
        res["ray_step_s"] = {k: (getattr(base, "stage2" if k == "calm" else "baseline").batch_size
                                 * base.distributed.num_workers * L * K) / last[k]["tokens_per_s"] for k in last}  # per micro-batch
        res["step_time_ratio"] = {k: res["ray_step_s"][k] / res["plain_step_s"][k] for k in last}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))

    report(res)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
