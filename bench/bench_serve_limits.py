#!/usr/bin/env python
"""Serving under hostile requests: how fast each limit refuses, what ordinary streams feel while it
does, and the fuzzer's answers (docs/SERVING.md "Limits and failure behaviour").

    python bench/bench_serve_limits.py --run RUN [--corpus FILE]

Needs RUN/calm (and RUN/ae; RUN/baseline too for the fuzzer's baseline requests). Starts a local Ray
and the Serve app with the project's ``serve.*`` defaults (plus overrides given as key=value), then:

1. ``streams``: 8 concurrent ordinary CALM streams (prompts from --corpus, --max-tokens each), alone;
   then the same 8 again while another client sends, one after the other, the request that once
   stalled a replica and one request crafted for each limit. Reported: each crafted request's status
   and seconds, and the streams' time with and without the hostile traffic (the ratio).
2. ``fuzz``: tests/http_fuzz.py's requests (--per-phase each of four phases, 4 at a time):
   status counts, broken promises, latency, and a plain request's seconds after each phase.
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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOOD = {"model": "calm", "prompt": "the cat", "max_tokens": 8}
CRAFTED = {  # the stalling request, then one past each limit of the defaults
    "stall (T=1e-6, exact, 10^9 draws)": {**GOOD, "temperature": 1e-6, "sampler": "exact", "max_draws": 10 ** 9},
    "exact floor(1/T) > max_draws": {**GOOD, "temperature": 1e-6, "sampler": "exact"},
    "max_step_draws (n16 x 2000)": {**GOOD, "temperature": 0.5, "n": 16, "candidates": 2000},
    "max_request_tokens (16x16x1024)": {**GOOD, "prompt": ["a"] * 16, "n": 16, "max_tokens": 1024},
    "max_prompts (17)": {**GOOD, "prompt": ["a"] * 17},
    "max_n (17)": {**GOOD, "n": 17},
    "max_tokens (10^6)": {**GOOD, "max_tokens": 10 ** 6},
    "max_stops (5)": {**GOOD, "stop": list("abcde")},
    "max_stop_chars (129)": {**GOOD, "stop": "s" * 129},
    "seed 2^64": {**GOOD, "seed": 2 ** 64},
    "candidates 10^9": {**GOOD, "temperature": 0.5, "candidates": 10 ** 9},
    "max_body_bytes (1 MiB + 1)": {**GOOD, "prompt": "x" * (1 << 20)},
    "json depth 100,000": b"[" * 100_000,
}


def post(url: str, body, timeout: float = 300) -> tuple[int, bytes, float]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - t0


def streams(url: str, prompts: list[str], max_tokens: int) -> list[float]:
    """Seconds of each of len(prompts) concurrent streamed completions."""
    def one(i):
        body = {"model": "calm", "prompt": prompts[i], "max_tokens": max_tokens, "stream": True, "seed": i}
        code, out, s = post(url, body)
        assert code == 200 and out.rstrip().endswith(b"[DONE]"), (code, out[-200:])
        return s
    with ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(one, range(len(prompts))))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory with calm/ (and ae/, baseline/)")
    ap.add_argument("--corpus", default=None, help="where prompts come from: its first file "
                    "(default: the Shakespeare plays; docs/BENCHMARKS.md says which corpus each figure used)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per ordinary stream")
    ap.add_argument("--per-phase", type=int, default=130, help="fuzzer requests per phase (4 phases)")
    ap.add_argument("--out", default="bench/results/serve_limits.json")
    ap.add_argument("overrides", nargs="*", metavar="serve.key=value")
    return ap


def main() -> None:
    args = parser().parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from pipelines.data.files import default_corpus, resolve_corpus_files
    from pipelines.ray_env import free_port
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fuzzer lives with the tests that run it
    import http_fuzz as fuzz
    from pipelines.serve.app import build_app

    fs, files, _ = resolve_corpus_files(args.corpus or default_corpus(), "text")
    with fs.open_input_file(files[0]) as f:
        text = f.read(200_000).decode("utf-8", "replace")
    prompts = [" ".join(d.split()[:6]) for d in text.split("\n") if len(d.split()) > 6][:8]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"run": args.run, "config": "demo", **dict(o.split("=", 1) for o in args.overrides)}),
              name="limits", route_prefix="/")
    base, url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1/completions"
    post(url, GOOD)  # warm
    alone = streams(url, prompts, args.max_tokens)
    crafted: dict = {}

    def hostile():
        for name, body in CRAFTED.items():
            code, out, s = post(url, body)
            err = json.loads(out)["error"] if code >= 400 else {}
            crafted[name] = (code, err.get("code") or err.get("param"), s)

    th = threading.Thread(target=hostile)
    th.start()
    busy = streams(url, prompts, args.max_tokens)
    th.join()
    print(f"\n{'crafted request':36} {'status':>6} {'code or param':>26} {'seconds':>8}")
    for name, (code, err, s) in crafted.items():
        print(f"{name:36} {code:>6} {str(err):>26} {s:8.3f}")
    m_alone, m_busy = statistics.median(alone), statistics.median(busy)
    print(f"\n8 ordinary CALM streams of {args.max_tokens} tokens: median {m_alone:.2f} s alone, {m_busy:.2f} s "
          f"beside the crafted requests (ratio {m_busy / m_alone:.2f}); max {max(alone):.2f} / {max(busy):.2f} s")

    phases = {}
    for phase in fuzz.PHASES:
        cs = [c for c in fuzz.cases(0, args.per_phase) if c.phase == phase]
        with ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(lambda c: fuzz.send(base, c), cs))
        plain = post(url, GOOD)
        lat = sorted(a.seconds for a in answers)
        counts: dict[int, int] = {}
        for a in answers:
            counts[a.status] = counts.get(a.status, 0) + 1
        phases[phase] = {"requests": len(answers), "statuses": dict(sorted(counts.items())),
                         "broken": sum(a.problem is not None for a in answers),
                         "p50_s": lat[len(lat) // 2], "p99_s": lat[int(len(lat) * 0.99)], "max_s": lat[-1],
                         "plain_after_status": plain[0], "plain_after_s": plain[2]}
    print(f"\n{'fuzz phase':10} {'requests':>8} {'statuses':>34} {'broken':>6} {'p50 s':>7} {'p99 s':>7} "
          f"{'max s':>7} {'plain after':>12}")
    for phase, r in phases.items():
        st = " ".join(f"{k}:{v}" for k, v in r["statuses"].items())
        print(f"{phase:10} {r['requests']:>8} {st:>34} {r['broken']:>6} {r['p50_s']:7.3f} {r['p99_s']:7.3f} "
              f"{r['max_s']:7.3f} {r['plain_after_s']:10.3f} s")
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "run": args.run, "overrides": args.overrides,
              "crafted": crafted, "streams_alone_s": alone, "streams_beside_crafted_s": busy, "fuzz": phases}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {args.out}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
