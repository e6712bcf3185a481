#!/usr/bin/env python
"""Serving under load: the Ray Serve application (jobs/serve.py's) over HTTP at several concurrency
levels, CALM and the same-backbone baseline side by side, with both batching policies
(``serve.batching``: the step loop and Ray Serve's @serve.batch), against in-process generation of
the same model at the same batch.

    python bench/bench_serve.py --run /tmp/bench-small --corpus tinystories-sample.txt \
        --concurrency 1 8 32 64 --requests 64 --max-tokens 64

Needs RUN/calm and/or RUN/baseline (and RUN/ae). Each request streams a completion of a prompt
taken from --corpus (the first --prompt-tokens tokens of a document) at temperature 1. For every
model and concurrency c: c client threads send --requests requests in all; reported are completion
tokens/s, requests/s, p50/p99 latency, p50 time to first chunk (first streamed text) and the error
rate. "in-process" is the model's own generation (calm_core.batching, no Ray, no HTTP) of c
requests with their own prompts at once (one batched prefill, then steps), measured before Ray
starts and again after it stops (the reference is the mean: this machine's speed drifts by up to
1.4x between minutes), with all cores and with a model replica's torch threads
(``serve.threads_per_replica``); the ratio served / in-process says how much of the model's batched
speed reaches clients. The policies are deployed as apps of the same Ray Serve instance and loaded
one after the other. The served app runs with the project's ``serve.*`` defaults unless overridden.
``--variant NAME:serve.key=value,...`` (repeated) compares serve settings instead, one app each, and
``--rounds R`` measures every level R times with the apps taking turns, then prints each app's
median and its ratio to the first (settings compared in one run, on the same minutes of the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stream_one(url: str, body: dict) -> dict:
    """One streamed completion: latency, time to first text, completion tokens, error."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0, first, tokens = time.perf_counter(), None, 0
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                elif first is None and ev["choices"] and ev["choices"][0]["text"]:
                    first = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - counted as an error, reported
        return {"error": f"{type(e).__name__}: {str(e)[:80]}", "latency": time.perf_counter() - t0}
    return {"latency": time.perf_counter() - t0, "first": first, "tokens": tokens, "error": None}


ROLES = (("model-", "model replica"), (":api", "ingress"), ("ProxyActor", "proxy"))


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this machine's processes, by their part in serving: the model replicas,
    the ingress replica, Serve's HTTP proxy, this process (the load generator's threads) and the rest."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            title, t = (p.info["cmdline"] or [""])[0], p.cpu_times()
        except (psutil.Error, IndexError):
            continue
        role = "client" if p.pid == os.getpid() else next((r for key, r in ROLES if key in title), "other")
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def load_level(url: str, model: str, prompts: list[str], c: int, n_requests: int, max_tokens: int) -> dict:
    """c client threads sending n_requests streamed completions in all -> the level's figures."""
    results, lock, it = [], threading.Lock(), iter(range(n_requests))

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "seed": i,
                    "stream": True, "stream_options": {"include_usage": True}}
            r = stream_one(url, body)
            with lock:
                results.append(r)

    cpu0, t0 = cpu_by_role(), time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_by_role().items()}
    ok = [r for r in results if r["error"] is None]
    lat = sorted(r["latency"] for r in ok) or [float("nan")]
    firsts = sorted(r["first"] for r in ok if r["first"] is not None) or [float("nan")]
    return {"model": model, "concurrency": c, "requests": len(results), "errors": len(results) - len(ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "requests_per_s": len(ok) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "first_chunk_p50_s": statistics.median(firsts),
            "first_error": next((r["error"] for r in results if r["error"]), None),
            "wall_s": wall, "cpu_share": {k: v / wall / (os.cpu_count() or 1) for k, v in cpu.items()}}


def in_process(engine, prompts: list[str], rows: int, max_tokens: int, repeats: int = 2) -> float:
    """Completion tokens/s of the model generating ``rows`` requests at once, each its own prompt
    and seed (the first ``rows`` of ``prompts``, as the served level sends them): one batched
    prefill, then steps until the last ends (calm_core.batching.Batch, no Ray, no HTTP)."""
    from calm_core.batching import Batch, Member
    from calm_core.engine import GenRequest

    best = 0.0
    for rep in range(repeats + 1):  # the first is a warm-up
        batch = Batch(engine)
        t0 = time.perf_counter()
        batch.join([Member.start(engine, GenRequest.of(engine.tok.encode(prompts[i % len(prompts)]), max_tokens=max_tokens,
                                                    seed=rep * rows + i)) for i in range(rows)])
        tokens = 0
        while batch.members:
            tokens += sum(d.tokens for _, deltas, _ in batch.step() for d in deltas if d.finish)
        if rep:
            best = max(best, tokens / (time.perf_counter() - t0))
    return best


def prompts_from(corpus: str | None, tok, n: int, length: int) -> list[str]:
    from pipelines.data.files import default_corpus, resolve_corpus_files
    from pipelines.data.parsers import split_text

    fs, files, _ = resolve_corpus_files(corpus or default_corpus(), "text")
    documents = (doc for f in files for doc in split_text(fs.open_input_file(f).read(), "auto", "<|endoftext|>"))
    out = []
    for raw in documents:
        ids = tok.encode(raw.decode("utf-8", "replace").strip())
        if len(ids) >= length:
            out.append(tok.decode(ids[:length]))
        if len(out) == n:
            break
    return out


def ingress_url(base: int, ports: int, policy: str) -> str:
    """The completions URL of the app at /policy on its ingress replica's own port (direct ingress)."""
    for p in range(base, base + ports):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{p}/{policy}/v1/models", timeout=5).read()
            return f"http://127.0.0.1:{p}/{policy}/v1/completions"
        except OSError:
            continue
    raise SystemExit(f"error: no ingress replica answers /{policy} on ports {base}..{base + ports - 1}")


def app_of(r: dict) -> str:
    """A level's app: its variant's name, or its batching policy (results written before --variant)."""
    return r.get("app", r.get("batching", "loop"))


def report(res: dict) -> None:
    th = res.get("threads", {})
    print(f"\nserving, run {res['run']}, {res['max_tokens']} completion tokens per request, machine {res['machine']}; "
          f"torch threads: in-process {th.get('in_process', '?')}, each model replica {th.get('replica', '?')}")
    print("| model | app | ingress | concurrency | requests | errors | tokens/s | requests/s | p50 latency (s) "
          "| p99 latency (s) | p50 first chunk (s) | in-process tokens/s (batch = concurrency; before / after) "
          "| served / in-process | served / in-process at the replica's threads |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in res["levels"]:
        ip = r.get("in_process_tokens_per_s") or float("nan")
        runs = " / ".join(f"{x:,.0f}" for x in r.get("in_process_runs", []))
        ipt = r.get("in_process_replica_threads_tokens_per_s") or float("nan")
        print(f"| {r['model']} | {app_of(r)} | {r.get('ingress', 'proxy')} | "
              f"{r['concurrency']} | {r['requests']} | {r['errors']} | "
              f"{r['tokens_per_s']:,.0f} | "
              f"{r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['first_chunk_p50_s']:.2f} | "
              f"{ip:,.0f}{f' ({runs})' if runs else ''} | {r['tokens_per_s'] / ip:.2f} | "
              f"{r['tokens_per_s'] / ipt:.2f} |")
    roles = ("model replica", "ingress", "proxy", "client", "other")
    print("\nwhere the machine's CPU went during each level (share of all cores)")
    print("| model | app | ingress | concurrency | " + " | ".join(roles) + " | idle |")
    print("| --- | --- | --- | ---: |" + " ---: |" * (len(roles) + 1))
    for r in res["levels"]:
        share = r.get("cpu_share", {})
        if share:
            print(f"| {r['model']} | {app_of(r)} | {r.get('ingress', 'proxy')} | {r['concurrency']} | "
                  + " | ".join(f"{share.get(k, 0.0):.0%}" for k in roles)
                  + f" | {max(0.0, 1 - sum(share.values())):.0%} |")
    summary(res["levels"])


def summary(levels: list[dict]) -> None:
    """With several rounds: every app's median tokens/s per level and its ratio to the first app's."""
    runs: dict[tuple, list[float]] = {}
    for r in levels:
        key = r["model"], r["concurrency"], r.get("ingress", "proxy"), app_of(r)
        runs.setdefault(key, []).append(r["tokens_per_s"])
    if max(map(len, runs.values()), default=0) < 2:
        return
    print("\nrounds side by side: median tokens/s (every round) and the ratio to the first app of the level")
    print("| model | concurrency | ingress | app | median tokens/s | rounds | ratio to the first app |")
    print("| --- | ---: | --- | --- | ---: | --- | ---: |")
    first: dict[tuple, float] = {}
    for (model, c, how, app), xs in runs.items():
        med = statistics.median(xs)
        ref = first.setdefault((model, c, how), med)
        print(f"| {model} | {c} | {how} | {app} | {med:,.0f} | {' / '.join(f'{x:,.0f}' for x in xs)} | "
              f"{med / ref:.2f} |")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--corpus", default=None, help="where prompts come from: file, directory or "
                    "glob (default: the Shakespeare plays; docs/BENCHMARKS.md says which corpus each figure used)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=64, help="requests per model and concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--models", nargs="+", default=["calm", "baseline"])
    ap.add_argument("--batching", nargs="+", default=["loop", "serve_batch"], choices=["loop", "serve_batch"],
                    help="batching policies to compare (serve.batching)")
    ap.add_argument("--ingress", nargs="+", default=["proxy"], choices=["proxy", "direct"],
                    help="how requests reach the ingress: through Serve's HTTP proxy, or straight to the ingress "
                         "replica's own port (serve.direct_ingress); both in one run compare them")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:serve.key=value,...",
                    help="compare serve settings instead of batching policies: each variant is one app of the same "
                         "Serve instance (repeat the option; --batching is then ignored, serve.batching may be set)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every level this many times, the apps taking turns, in reverse order every other "
                         "round (a fairer A/B on a machine whose speed drifts: use an even number); the summary "
                         "gives each app's median and its ratio to the first app")
    ap.add_argument("--out", default="bench/results/serve.json")
    ap.add_argument("--from-json", default=None, help="only print the table of a saved result")
    ap.add_argument("overrides", nargs="*", help="serve.* settings of the served app (e.g. serve.max_replicas=2)")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be 1 or more, got {args.rounds}")
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()))
        return
    import ray
    import torch
    from ray import serve

    from calm_core.config import load_config
    from pipelines.ray_env import free_port, init_ray
    from pipelines.serve.app import build_app, direct_ingress
    from calm_core.engine import BaselineEngine, CalmEngine
    from pipelines.storage import RunDir

    top = max(args.concurrency)
    sets = {"serve.max_ongoing_requests": str(top), "serve.max_queued_requests": str(4 * top),
            "serve.max_batch_rows": str(top), "serve.target_ongoing_requests": str(top), "serve.max_n": "1",
            "serve.max_tokens": str(args.max_tokens), "serve.cpus_per_replica": "0.1",  # Ray scheduling only
            **dict(o.split("=", 1) for o in args.overrides)}
    cfg = load_config("demo", [f"{k}={v}" for k, v in sets.items()])
    apps = {} if args.variant else {p: {**sets, "serve.batching": p} for p in args.batching}
    for v in args.variant:
        name, _, kv = v.partition(":")
        if not name or not kv or name in apps or "/" in name:
            raise SystemExit(f"error: --variant '{v}': want a new NAME (no '/') and serve.key=value pairs")
        apps[name] = {**sets, **dict(x.split("=", 1) for x in kv.split(","))}
    app_threads = {a: load_config("demo", [f"{k}={v}" for k, v in st.items()]).serve.threads_per_replica
                   for a, st in apps.items()}
    run = RunDir(args.run)
    device = "cuda" if cfg.serve.device == "auto" and torch.cuda.is_available() else cfg.serve.device
    device = "cpu" if device == "auto" else device  # in-process generation on the replicas' device
    engines = {"calm": lambda: CalmEngine.load(run.local_artifact("ae"), run.local_artifact("calm"), device),
               "baseline": lambda: BaselineEngine.load(run.local_artifact("baseline"), device)}
    cores = os.cpu_count() or 1
    prompts: dict[str, list[str]] = {}

    def measure_alone(when: str) -> dict:
        """In-process tokens/s of every model and batch, with all cores and with the replica's threads."""
        out = {}
        for model in args.models:
            engine = engines[model]()
            if args.prompt_tokens + args.max_tokens > engine.context_tokens:
                raise SystemExit(f"error: --prompt-tokens {args.prompt_tokens} + --max-tokens {args.max_tokens} "
                                 f"exceed {model}'s context of {engine.context_tokens} tokens (the server answers 400)")
            prompts.setdefault(model, prompts_from(args.corpus, engine.tok, max(args.requests, 8), args.prompt_tokens))
            for c in args.concurrency:
                for n in sorted({cores, *app_threads.values()}):
                    torch.set_num_threads(n)
                    out[model, c, n] = in_process(engine, prompts[model], c, args.max_tokens)
                    print(f"[bench] {model} in-process {when}, batch {c}, {n} threads: {out[model, c, n]:,.0f} "
                          "tokens/s", flush=True)
            del engine
        torch.set_num_threads(cores)
        return out

    # in-process before Ray and Serve start (nothing else competes for the cores) and again after they
    # stop: this machine's speed drifts between minutes, so the reference is the mean of the two
    before = measure_alone("before")
    port, base = free_port(), free_port()
    if "direct" in args.ingress:  # each app's ingress replica answers on a port of base .. base + apps - 1
        direct_ingress(base, len(apps))
    init_ray(cfg.ray)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for name, settings in apps.items():
        serve.run(build_app({"run": args.run, "config": "demo", **settings}), name=name, route_prefix=f"/{name}")
        urls[name, "proxy"] = f"http://127.0.0.1:{port}/{name}/v1/completions"
        if "direct" in args.ingress:
            urls[name, "direct"] = ingress_url(base, len(apps), name)
    levels = []
    for model in args.models:
        for c in args.concurrency:
            for rnd in range(args.rounds):  # A B, then B A: a steady drift of the machine's speed cancels
                for name, settings in (list(apps.items()) if rnd % 2 == 0 else list(apps.items())[::-1]):
                    for how in args.ingress:
                        print(f"[bench] {model}, {name}, {how}, concurrency {c}: {args.requests} requests"
                              + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
                        row = load_level(urls[name, how], model, prompts[model], c, args.requests, args.max_tokens)
                        levels.append({**row, "app": name, "batching": settings.get("serve.batching", "loop"),
                                       "ingress": how, "round": rnd, "replica_threads": app_threads[name]})
    serve.shutdown()
    ray.shutdown()
    after = measure_alone("after")
    for row in levels:
        key = row["model"], row["concurrency"]
        row["in_process_runs"] = [before[key + (cores,)], after[key + (cores,)]]
        row["in_process_tokens_per_s"] = statistics.mean(row["in_process_runs"])
        n = row["replica_threads"]
        row["in_process_replica_threads_tokens_per_s"] = statistics.mean([before[key + (n,)], after[key + (n,)]])
    res = {"machine": f"{platform.machine()} {cores} CPUs, Python {platform.python_version()}",
           "threads": {"in_process": cores, "replica": app_threads},
           "run": args.run, "max_tokens": args.max_tokens, "settings": sets, "apps": apps, "levels": levels}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    report(res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
