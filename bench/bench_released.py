#!/usr/bin/env python
"""The released sizes end to end on this machine: random CALM-M, its AE and the Transformer baseline
written as the Hugging Face Hub holds them, then every step a user runs on them, each the project's
job script in a fresh process, timed, with its peak memory.

    python bench/bench_released.py                          # the released sizes (issue 33 item 4)
    python bench/bench_released.py --scale tiny             # the same steps on a few-MB copy (minutes)
    python bench/bench_released.py --steps import evaluate --json bench/results/released.json

Writes into --work (emptied first): a byte-level BPE tokenizer with the official vocabulary layout
(128,257 ids, <|begin_of_text|> 128000, <|end_of_text|> 128001, [PAD] 128256) trained on the
evaluation text, and ae/, calm/ (with its AE copy under ae_model.), baseline/: config.json, safetensors
shards and model.safetensors.index.json (bench/official_folders.py). Their parameter counts are
checked against the published ones before anything runs. Then the steps (--steps; default all):

    import     jobs/official.py import --calm --ae --baseline --tokenizer --run RUN
    evaluate   jobs/evaluate.py --run RUN --corpus CORPUS --name paper eval.protocol=paper
               eval.max_blocks=N (CALM on blocks of 2,048 chunks = 8,192 tokens, the baseline on
               2,048-token blocks at every token position; one temperature, 1.0)
    generate   jobs/generate.py at T = 1 and at T = 0.5 (200 candidates per step)
    serve      jobs/serve.py --run RUN, one completion from `calm` and one from `baseline` through the
               official openai client, then Ctrl-C (SIGINT), as its banner says
    finetune   jobs/precompute_latents.py of a slice of --ft-corpus with the imported AE (the packed
               layout, the run's), then jobs/stage2.py stage2.init_from=RUN/calm for 2 steps of one
               block per worker on 2 workers at ZeRO stage 2, then stage 3, validating at steps 0 and
               2 on one block per worker; at model.block_chunks 2,048 while it fits, else the next of
               --ft-block-chunks (the table says which; ZeRO-3 starts at ZeRO-2's)

Memory (bench/session_memory.py): each job runs in its own session, as do the Ray processes it
starts (each job starts its own Ray: RAY_ADDRESS is removed from its environment); "peak GB" is the
highest sum of their RSS, sampled every 0.2 s; "machine GB" the machine's used memory at its highest
less its level when the step began (a cross-check; other work on the machine moves it). A step that
drives the machine below --min-free-gb available is stopped and reported, as is one over
--step-timeout; processes a step leaves running are reported and stopped. The weights are random:
BrierLM comes out near 0 and the loss is a random model's, the times and the memory are the point.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # its helper modules (official_folders, session_memory), however it is loaded

import psutil  # noqa: E402
import torch  # noqa: E402
from official_folders import SCALES, check_published, llama_style_tokenizer, parameter_counts, write_models  # noqa: E402
from session_memory import GB, Session, Usage, run  # noqa: E402

STEPS = ("import", "evaluate", "generate", "serve", "finetune")
WIKITEXT = "https://raw.githubusercontent.com/shaochenze/calm/main/data/wikitext_document_level-test.json"
EVAL = ["eval.protocol=paper", "eval.temperatures=[1.0]", "eval.batch_blocks=1"]
NAMES = {"ae": "AE", "calm": "CALM", "baseline": "baseline"}


@dataclass
class Row:
    step: str
    what: str
    usage: Usage | None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    clean: tuple[int, ...] = (0,)  # the exit statuses of a step that went well (a server's Ctrl-C: 130)

    @property
    def ok(self) -> bool:
        return self.usage is not None and self.usage.rc in self.clean and not self.usage.stopped


class Bench:
    """The work folder, the run, the job environment and the rows so far (printed and saved as they come)."""

    def __init__(self, a: argparse.Namespace, env: dict):
        self.a, self.env = a, {k: v for k, v in env.items() if not k.startswith("RAY_ADDRESS")}
        self.work, self.scale = Path(a.work), SCALES[a.scale]
        self.run, self.logs, self.rows = self.work / "run", self.work / "logs", []
        self.cuda = a.device == "cuda"
        self.counts = parameter_counts(self.scale)

    def job(self, name: str, script: str, *args: str, **kw) -> Usage:
        argv = [sys.executable, str(ROOT / "jobs" / script), *args]
        print(f"[released] {name}: {' '.join(argv[1:])}", flush=True)
        return run(argv, self.logs / f"{name}.log", env=self.env, cwd=ROOT, min_free_gb=self.a.min_free_gb,
                   timeout_s=self.a.step_timeout, **kw)

    def session(self, name: str, script: str, *args: str) -> Session:
        argv = [sys.executable, str(ROOT / "jobs" / script), *args]
        print(f"[released] {name}: {' '.join(argv[1:])}", flush=True)
        return Session(argv, self.logs / f"{name}.log", env=self.env, cwd=ROOT, min_free_gb=self.a.min_free_gb,
                       timeout_s=self.a.step_timeout)

    def add(self, row: Row) -> Row:
        if row.usage is not None and not row.ok:
            row.notes = "; ".join(filter(None, [failure(row.usage, self.logs / f"{row.step}.log"), row.notes]))
        elif row.usage is None and not row.notes:
            row.notes = "not run"
        if row.usage is not None and row.usage.leftovers:
            row.notes += f"; left running after it ended, stopped by the benchmark: {', '.join(row.usage.leftovers)}"
        self.rows.append(row)
        print(f"[released] {table_line(row)}", flush=True)
        if self.a.json:
            Path(self.a.json).write_text(json.dumps(self.report(), indent=2, default=str))
        return row

    def report(self) -> dict:
        return {"args": vars(self.a), "machine": machine(), "scale": self.a.scale,
                "parameters": self.counts, "rows": [asdict(r) | {"ok": r.ok} for r in self.rows]}


def failure(u: Usage, log: Path) -> str:
    """Why a step failed, in a line: the guard's reason, else the job's last error line."""
    if u.stopped:
        return u.stopped
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    err = next((x for x in reversed(lines) if x.startswith("error:") or "Error" in x), lines[-1] if lines else "")
    return f"failed (exit {u.rc}; {log.name}): {err.strip()[:200]}"


def machine() -> str:
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return (f"{platform.platform()}, {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"torch {torch.__version__}, Ray {importlib.metadata.version('ray')}, "
            f"DeepSpeed {importlib.metadata.version('deepspeed')}")


# ----------------------------------------------------------------------------- the steps


def step_import(b: Bench) -> None:
    w = b.work / "official"
    u = b.job("import", "official.py", "import", "--calm", str(w / "calm"), "--ae", str(w / "ae"), "--baseline",
              str(w / "baseline"), "--tokenizer", str(b.work / "tokenizer.json"), "--run", str(b.run))
    size = sum(f.stat().st_size for f in w.rglob("*.safetensors"))
    b.add(Row("import", f"AE + CALM + baseline, {size / 1e6:,.1f} MB of safetensors", u,
              f"peak / checkpoint {u.peak_gb * GB / size:.2f}", {"checkpoint_gb": size / GB}))


def eval_memory(b: Bench, overrides: list[str]) -> tuple[list[str], str]:
    """What each scoring actor reserves: the project's estimate, unless that is more than a private
    Ray can hand out here (the actor would then never start and the job wait for ever): then
    eval.actor_memory_mb = what it can, said in the notes."""
    from calm_core import official as O
    from calm_core.config import eval_protocol, load_config
    from pipelines.eval.job import scorer_memory_mb

    ev = eval_protocol(load_config("demo", overrides).eval)
    K = b.scale.ae["K"]
    size = {k: sum(f.stat().st_size for f in (b.run / k).glob("*.safetensors")) for k in ("ae", "calm", "baseline")}
    need = max(scorer_memory_mb(ev, size["ae"] + size[k], L, K, b.scale.vocab, k == "baseline")
               for k, L in (("calm", O.CALM_BLOCK_CHUNKS), ("baseline", O.BASELINE_BLOCK_TOKENS // K)))
    can = int((psutil.virtual_memory().available - load_config("demo").ray.object_store_memory_mb * 2**20) / 2**20)
    if need <= can:
        return [], f"each scoring actor reserved {need:,} MB (the project's estimate)"
    give = int(can * 0.9)
    return [f"eval.actor_memory_mb={give}"], (f"the project's estimate for a scoring actor, {need:,} MB, is more than "
                                              f"a private Ray can reserve here ({can:,} MB): eval.actor_memory_mb={give}")


def step_evaluate(b: Bench) -> None:
    overrides = [*EVAL, f"eval.max_blocks={b.a.eval_blocks}", *(["eval.use_gpu=true"] if b.cuda else [])]
    extra, reserved = eval_memory(b, overrides)
    u = b.job("evaluate", "evaluate.py", "--run", str(b.run), "--corpus", b.a.corpus, "--name", "paper",
              *overrides, *extra)
    notes, figures = [], {}
    report = b.run / "eval" / "paper" / "report.json"
    if u.rc == 0 and report.exists():
        rep = json.loads(report.read_text())
        for k in rep["models"]:
            m = rep[k]
            figures[k] = {"blocks": m["blocks"], "context_tokens": m["context_tokens"], "positions": m["positions"],
                          "brierlm": m["brierlm"], "brierlm_official": m["brierlm_official"]}
            ce = f", CE {m['cross_entropy']['mean']:.2f}" if "cross_entropy" in m else ""
            notes.append(f"{NAMES[k]}: {m['blocks']} x {m['context_tokens']:,} tokens, {m['positions']:,} positions, "
                         f"BrierLM {m['brierlm']:.2f} (official {m['brierlm_official']:.2f}){ce}")
        t = rep["throughput"]
        notes.append(f"scoring {t['tokens_scored']:,} tokens in {t['seconds']:.0f} s; random weights: BrierLM ~0")
        figures["throughput"] = t
    what = f"paper protocol, at most {b.a.eval_blocks} block(s) per model of {Path(b.a.corpus).name}"
    b.add(Row("evaluate", what, u, "; ".join([*notes, reserved]), figures))


def step_generate(b: Bench) -> None:
    for T in (1.0, 0.5):
        name = f"generate_T{T:g}"
        u = b.job(name, "generate.py", "--run", str(b.run), "--prompt", b.a.prompt, "--chunks", str(b.a.chunks),
                  "--temperature", str(T), "--candidates", "200", "--device", b.a.device)
        m = re.search(r"--- sample 1 \((\d+) tokens in (\d+) steps, ([\d.]+)s", (b.logs / f"{name}.log").read_text())
        figures = {"tokens": int(m[1]), "steps": int(m[2]), "seconds": float(m[3])} if m else {}
        notes = (f"{m[1]} tokens in {m[2]} steps, {int(m[1]) / float(m[3]):.1f} tokens/s in the loop "
                 f"({float(m[3]):.1f} s; the rest: start and loading)" if m else "")
        b.add(Row(name, f"CALM, T = {T:g}" + (", 200 candidates per step" if T < 1 else ""), u, notes, figures))


def completer(url: str, timeout: float):
    """(model, prompt, max_tokens) -> (completion tokens, text): the official openai client, or the
    same request over plain HTTP where it is not installed (the GPU machine's image lacks it)."""
    try:
        from openai import OpenAI
    except ImportError:
        import urllib.request

        def plain(model: str, prompt: str, max_tokens: int) -> tuple[int, str]:
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": 1,
                               "temperature": 1.0}).encode()
            req = urllib.request.Request(f"{url}/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out = json.loads(r.read())
            return out["usage"]["completion_tokens"], out["choices"][0]["text"]

        return plain, "plain HTTP (no openai package)"
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout)

    def official(model: str, prompt: str, max_tokens: int) -> tuple[int, str]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, seed=1, temperature=1.0)
        return r.usage.completion_tokens, r.choices[0].text

    return official, "the openai client"


def step_serve(b: Bench) -> None:
    from pipelines.ray_env import free_port

    port = free_port()
    device = ["serve.device=cuda", "serve.gpus_per_replica=0.25"] if b.cuda else []
    answers, notes, ready = {}, [], None
    complete, via = completer(f"http://127.0.0.1:{port}/v1", b.a.step_timeout)
    with b.session("serve", "serve.py", "--run", str(b.run), "--port", str(port), *device) as s:
        log = b.logs / "serve.log"
        while "[serve] serving" not in log.read_text(errors="replace") and s.running():
            time.sleep(0.5)
        if s.running():
            ready = time.perf_counter() - s.t0
            try:
                for model in ("calm", "baseline"):
                    t = time.perf_counter()
                    tokens, text = complete(model, b.a.prompt, b.a.serve_tokens)
                    answers[model] = {"after_start_s": time.perf_counter() - s.t0, "seconds": time.perf_counter() - t,
                                      "tokens": tokens, "text_chars": len(text)}
            except Exception as e:  # noqa: BLE001 - the client's errors: reported in the row
                notes.append(f"request failed: {type(e).__name__}: {str(e)[:200]}")
        stop_t = time.perf_counter()
    u = s.usage()
    if ready is not None:
        notes.insert(0, f"ready {ready:.0f} s after start")
    if "calm" in answers:
        notes.append(f"first answer (calm) {answers['calm']['after_start_s']:.0f} s after start")
    notes += [f"{m}: {a['tokens']} tokens in {a['seconds']:.1f} s" for m, a in answers.items()]
    notes.append(f"SIGINT (Ctrl-C): ended in {time.perf_counter() - stop_t:.0f} s, exit {u.rc}")
    b.add(Row("serve", f"calm + baseline replicas, {b.a.serve_tokens} tokens each via {via}", u, "; ".join(notes),
              {"ready_s": ready, "answers": answers}, clean=(0, 130) if len(answers) == 2 else ()))


def finetune_corpus(b: Bench, L: int) -> Path:
    """The first documents of --ft-corpus: about 6 blocks of L chunks (2 steps of one block on each of
    2 workers, and some to spare), cut at a line end."""
    from tokenizers import Tokenizer

    text = "\n".join(Path(f).read_text(errors="replace") for f in sorted(glob.glob(b.a.ft_corpus)))
    tok = Tokenizer.from_file(str(b.work / "tokenizer.json"))
    sample = text[:200_000]
    per_token = len(sample) / max(1, len(tok.encode(sample).ids))
    want = int(6 * L * b.scale.ae["K"] * per_token * 1.2)
    cut = text.find("\n", want)
    out = b.work / "finetune.txt"
    out.write_text(text if cut < 0 else text[:cut + 1])
    return out


def step_finetune(b: Bench) -> None:
    Ls = b.a.ft_block_chunks
    corpus = finetune_corpus(b, max(Ls))
    ft, ae = b.work / "finetune", str(b.run / "ae")
    u = b.job("latents", "precompute_latents.py", "--run", str(ft), "--ae", ae, "--corpus", str(corpus),
              *(["latents.use_gpu=true"] if b.cuda else []))
    man = ft / "latents" / "manifest.json"
    rows = json.loads(man.read_text())["metrics"]["rows_per_split"] if man.exists() else {}
    b.add(Row("latents", f"the imported AE on {corpus.stat().st_size / 1e6:.1f} MB of {Path(b.a.ft_corpus).name}", u,
              f"{sum(rows.values()):,} chunks ({rows})", {"rows_per_split": rows}))
    if u.rc != 0:
        return
    n = 1 if b.cuda else 2
    workers = ["distributed.use_gpu=true", "distributed.cpus_per_worker=8", "ray.num_cpus=16"] if b.cuda else \
        ["distributed.cpus_per_worker=0.75"]
    first, fits = True, 0  # ZeRO-3 starts at the context ZeRO-2 ran at: the two stages compare at one L
    for zero in (2, 3):
        for i in range(fits, len(Ls)):
            L, why = Ls[i], f" ({Ls[i - 1]:,} did not fit)" if i > fits else " (as ZeRO-2)" if i else ""
            args = ["--run", str(ft), "--ae", ae, *([] if first else ["--overwrite"]), f"stage2.init_from={b.run / 'calm'}",
                    f"distributed.zero_stage={zero}", f"model.block_chunks={L}", "stage2.batch_size=1",
                    "stage2.max_steps=2", "stage2.log_every=2", "stage2.checkpoint_every=2", "stage2.warmup_steps=0",
                    # one validation block per worker: with fewer blocks than workers every rank gets none and
                    # the step-0 validation fails (KeyError 'positions' in calm_core.evaluate.heldout_record)
                    f"stage2.val_max_chunks={n * L}", "stage2.max_minutes=0", f"distributed.num_workers={n}", *workers]
            first = False
            u = b.job(f"finetune_zero{zero}_L{L}", "stage2.py", *args)
            what = (f"CALM from the import, L = {L:,} chunks ({L * b.scale.ae['K']:,} tokens)"
                    + why + f", ZeRO-{zero}, "
                    + ("1 GPU" if b.cuda else f"{n} workers x 0.75 CPU") + ", batch 1 block per worker, 2 steps")
            b.add(Row(f"finetune_zero{zero}_L{L}", what, u, losses(ft) if u.rc == 0 else "",
                      {"block_chunks": L, "zero_stage": zero}))
            # did not fit: the guard stopped it, or the machine came within twice the guard (Ray's memory
            # monitor kills a worker at 95% used, 1.2 GB free of 24), or the kernel killed it
            too_big = u.reason == "memory" or u.min_free_gb < 2 * b.a.min_free_gb or u.rc == -9
            if u.rc == 0:
                fits = i
            if u.rc == 0 or not too_big:
                break


def losses(ft: Path) -> str:
    path = ft / "calm" / "metrics.jsonl"
    if not path.exists():
        return ""
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    val = " -> ".join(f"{r['val_loss']:.3f}" for r in recs if "val_loss" in r)
    train = ", ".join(f"{r['loss']:.3f} (step {r['step']})" for r in recs if "loss" in r)
    on = "training blocks: too few held-out chunks" if recs and recs[-1].get("val_on_training_data") else "held-out"
    return f"validation loss {val} (steps {', '.join(str(r['step']) for r in recs)}; {on}); training loss {train}"


# ----------------------------------------------------------------------------- output


def table_line(r: Row) -> str:
    u = r.usage
    figures = (f"{u.seconds:.1f} | {u.peak_gb:.2f} | {u.machine_gb:.2f}" if u else "- | - | -")
    return f"| {r.step} | {r.what} | {figures} | {r.notes.replace('|', '/')} |"


def table(b: Bench) -> str:
    head = ("| step | what runs | wall s | peak GB (its processes' RSS) | machine GB (used - idle) | notes |\n"
            "| --- | --- | ---: | ---: | ---: | --- |")
    return "\n".join([head, *(table_line(r) for r in b.rows)])


def build(b: Bench) -> None:
    """The tokenizer and the three official folders; parameter counts checked before anything runs."""
    counts = parameter_counts(b.scale)
    wrong = check_published(b.scale, counts)
    for k, n in counts.items():
        published = b.scale.published.get(k)
        print(f"[released] {NAMES[k]}: {n:,} parameters" + (f" (published: {published[0]}M)" if published else ""))
    if wrong:
        raise SystemExit(f"the models' shapes are wrong: {'; '.join(wrong)}")
    t0 = time.perf_counter()
    texts = (json.loads(x)["text"] if b.a.corpus.endswith((".json", ".jsonl")) else x
             for x in Path(b.a.corpus).read_text().splitlines() if x.strip())
    llama_style_tokenizer(b.work / "tokenizer.json", b.scale.vocab, texts, b.scale.merges)
    write_models(b.scale, b.work / "official")
    print(f"[released] wrote the tokenizer and the official folders in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    env = dict(os.environ)  # the jobs' environment, before anything here imports the project's packages
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="released")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="(import runs whenever one runs)")
    p.add_argument("--work", default="/tmp/bench-released", help="emptied, then holds the models, the run and logs/")
    p.add_argument("--json", default=None, help="also write the rows here (after every step)")
    p.add_argument("--corpus", default="wikitext_document_level-test.json",
                   help=f"the evaluation text (default: WikiText-103 test, the paper's, in the current folder: curl -LO "
                        f"{WIKITEXT}); the tokenizer trains on it")
    p.add_argument("--ft-corpus", default=None,
                   help="text file(s) (a path or glob) whose first documents the fine-tune trains on (default: the "
                        "project's default corpus, the Shakespeare plays)")
    p.add_argument("--eval-blocks", type=int, default=1, help="eval.max_blocks: blocks scored per model (default 1)")
    p.add_argument("--chunks", type=int, default=32, help="chunks generated per completion (default 32)")
    p.add_argument("--serve-tokens", type=int, default=32, help="max_tokens of each served completion (default 32)")
    p.add_argument("--prompt", default="The history of the Roman Empire")
    p.add_argument("--ft-block-chunks", type=int, nargs="+", default=[2048, 512, 256],
                   help="model.block_chunks of the fine-tune, tried in order while one does not fit (default 2048 512 256)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: eval.use_gpu, generate --device cuda, serve.device=cuda, training on 1 GPU")
    p.add_argument("--min-free-gb", type=float, default=1.0, help="stop a step when the machine has less available")
    p.add_argument("--step-timeout", type=float, default=3600, help="seconds before a step is stopped")
    a = p.parse_args()
    if a.ft_corpus is None:
        from pipelines.data.files import default_corpus

        a.ft_corpus = default_corpus()
    if not Path(a.corpus).is_file():
        raise SystemExit(f"{a.corpus}: no such file (--corpus); the paper's evaluation text: curl -LO {WIKITEXT}")
    if not glob.glob(a.ft_corpus):
        raise SystemExit(f"{a.ft_corpus}: no such file (--ft-corpus)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: the running step's session is stopped too
    b = Bench(a, env)
    shutil.rmtree(b.work, ignore_errors=True)
    b.logs.mkdir(parents=True)
    print(f"[released] {machine()}", flush=True)
    build(b)
    steps = {"import": step_import, "evaluate": step_evaluate, "generate": step_generate, "serve": step_serve,
             "finetune": step_finetune}
    for name in STEPS:
        if name == "import" or name in a.steps:
            if name != "import" and not (b.run / "calm").exists():
                b.add(Row(name, "", None, "not run: the import failed"))
                continue
            try:
                steps[name](b)
            except Exception as e:  # noqa: BLE001 - one step's surprise must not lose the others' rows
                b.add(Row(name, "", None, f"benchmark error: {type(e).__name__}: {str(e)[:300]}"))
    print(f"\nThe {a.scale} sizes end to end ({machine()}); random weights\n")
    print(table(b))


if __name__ == "__main__":
    main()
