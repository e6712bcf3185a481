"""The Ray Serve application: an ingress deployment (FastAPI through ``serve.ingress``) that checks the
API key, validates, tokenises and streams; one model deployment per served model (CALM, the
baseline) holding what a generation step needs, autoscaled with a bounded queue.

    client --HTTP--> Api (ingress) --handle, streaming--> ModelServer "calm" | "baseline"

``build_app({"run": RUN, ...overrides})`` is the application builder for ``serve run`` and
``jobs/serve.py``; ``cluster/serve.yaml`` deploys the same builder with ``serve deploy``.
"""


import dataclasses
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from calm_core.artifacts import MODEL_KINDS
from calm_core.config import Config, ServeConfig, config_from_yaml, load_config
from calm_core.errors import ArtifactError
from calm_core.tokenizer import CalmTokenizer
from pipelines.serve import api
from pipelines.serve import streams as S
from pipelines.storage import RunDir

app = FastAPI(title="CALM on Ray", description="OpenAI-compatible completions from CALM and its baseline")


@serve.deployment
class ModelServer:
    """One served model: loads its artifacts once per replica (from a local run directory or a URI)
    and batches the requests it holds (``serve.batching``):

    - ``loop`` (default): a step-level loop (``pipelines.serve.batch.StepLoop``) admits new requests
      between model steps, so a short request never waits for a long one;
    - ``serve_batch``: Ray Serve's ``@serve.batch`` collects requests for ``batch_wait_ms`` and runs
      them together until the last one ends (measured against ``loop`` in docs/BENCHMARKS.md).
    """

    def __init__(self, kind: str, run: str, settings: dict[str, Any]):
        import torch

        from pipelines.serve.batch import StepLoop
        from pipelines.serve.engine import BaselineEngine, CalmEngine

        s = ServeConfig(**settings)
        torch.set_num_threads(max(1, s.threads_per_replica))
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        rd = RunDir(run)
        self.engine = (CalmEngine(rd.local_artifact("ae"), rd.local_artifact("calm"), device) if kind == "calm"
                       else BaselineEngine(rd.local_artifact("baseline"), device))
        self.metrics = ServeMetrics(kind)
        self.policy = s.batching
        self.interval, self.rate, self.open = s.stream_interval_ms / 1000.0, s.stream_messages_per_s, 0
        self.loop = StepLoop(self.engine, s.max_batch_rows, self.metrics.step) if s.batching == "loop" else None
        self._window.set_max_batch_size(s.max_batch_rows)
        self._window.set_batch_wait_timeout_s(s.batch_wait_ms / 1000.0)

    async def stream(self, r):
        """Messages of model steps, each step the deltas of the request's completions (dicts: index,
        text, finish, tokens). A message holds every step done since the last one was taken: one
        per step while the client keeps up, several when the model runs ahead (fewer round trips
        through Serve under load; the ingress still sends one event per step)."""
        self.metrics.requests.inc()
        if self.policy == "loop":
            async for steps in self._loop_stream(r):
                yield [[dataclasses.asdict(d) for d in deltas] for deltas in steps]
        else:
            async for deltas in self._window(r):
                yield [[dataclasses.asdict(d) for d in deltas]]

    async def _loop_stream(self, r):
        import asyncio
        import time

        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        m = self.loop.submit(r, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        self.open += 1
        try:
            finished, last = False, None
            while not finished:
                items = [await q.get()]
                if last is not None and not isinstance(items[0], BaseException) and not items[0][1]:
                    # after the first message, at most one per stream interval: the steps in between ride along
                    wait = last + message_interval(self.interval, self.open, self.rate) - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                while not q.empty() and not isinstance(items[-1], BaseException) and not items[-1][1]:
                    items.append(q.get_nowait())
                if isinstance(items[-1], BaseException):
                    raise items[-1]
                finished = items[-1][1]
                last = time.monotonic()
                yield [deltas for deltas, _ in items]
        finally:
            self.open -= 1
            m.cancelled = True  # the client went away: the loop drops the rows at its next step

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=lambda rs: sum(r.n for r in rs))
    async def _window(self, rs: list):
        """``serve_batch``: the requests Serve collected, stepped together until the last one ends."""
        import asyncio

        from pipelines.serve.batch import Batch, Member, step_stats

        batch = Batch(self.engine)
        members = [Member.start(self.engine, r) for r in rs]
        await asyncio.to_thread(batch.join, members)
        slot = {id(m): i for i, m in enumerate(members)}
        ended = [False] * len(rs)
        while batch.members:
            out = await asyncio.to_thread(batch.step)
            self.metrics.step(*step_stats(out))
            results: list = [StopIteration] * len(rs)
            for m, deltas, finished in out:
                results[slot[id(m)]] = deltas
            for m, _, finished in out:
                ended[slot[id(m)]] = finished
            yield results
            if all(ended):
                return

    async def health(self) -> bool:
        """A real forward pass through the batching path: one step of a one-token prompt."""
        from pipelines.serve.engine import GenRequest

        r = GenRequest([self.engine.tok.eot_id], max_tokens=self.engine.step_tokens, seed=0)
        async for _ in self.stream(r):
            pass
        return True


def message_interval(interval_s: float, open_streams: int, messages_per_s: float) -> float:
    """Seconds between two messages of one stream: ``interval_s`` (``serve.stream_interval_ms``),
    longer when the replica's ``open_streams`` would together send more than ``messages_per_s``
    (``serve.stream_messages_per_s``; 0 = no cap). Every message costs Serve's transport and the
    ingress about the same CPU whatever it holds, so under load fewer, fuller messages leave more
    of the cores to the model (docs/BENCHMARKS.md)."""
    return max(interval_s, open_streams / messages_per_s) if messages_per_s > 0 else interval_s


class ServeMetrics:
    """The project's Prometheus metrics, exported with Ray's (``ray_`` prefix, tag ``model``):
    requests, model steps, rows per step (the batch a step computes) and completion tokens."""

    def __init__(self, kind: str):
        from ray.serve import metrics

        self.requests = metrics.Counter("calm_serve_requests", "generation requests", ("model",))
        self.steps = metrics.Counter("calm_serve_steps", "model steps (CALM: one chunk of K tokens)", ("model",))
        self.tokens = metrics.Counter("calm_serve_tokens", "completion tokens generated", ("model",))
        self.rows = metrics.Histogram("calm_serve_step_rows", "rows computed per model step (batch size)",
                                      [1, 2, 4, 8, 16, 32, 64, 128], ("model",))
        for m in (self.requests, self.steps, self.tokens, self.rows):
            m.set_default_tags({"model": kind})  # a fresh dict each: Serve adds its own tags into it

    def step(self, rows: int, finished_tokens: int) -> None:
        self.steps.inc()
        if rows:
            self.rows.observe(rows)
        if finished_tokens:
            self.tokens.inc(finished_tokens)


def model_info(run: RunDir, kind: str) -> tuple[api.ModelInfo, str]:
    """The served model's context (from its config, no weights) and its tokenizer.json text."""
    folder = run.local_artifact(kind)
    cfg = config_from_yaml((folder / "config.yaml").read_text(), str(folder / "config.yaml"))
    L, K = cfg.model.block_chunks, cfg.ae.K
    return api.ModelInfo(kind, kind, L * K, K if kind == "calm" else 1), (folder / "tokenizer.json").read_text()


@serve.deployment
@serve.ingress(app)
class Api:
    def __init__(self, models: dict[str, Any], run: str, settings: dict[str, Any]):
        s = ServeConfig(**settings)
        rd = RunDir(run)
        self.models = models
        self.info: dict[str, api.ModelInfo] = {}
        for kind in models:
            self.info[kind], tok_json = model_info(rd, kind)
        self.tok = CalmTokenizer.from_str(tok_json)
        self.limits = api.Limits(s.max_body_bytes, s.max_prompt_tokens, s.max_tokens, s.max_n, max_draws=s.max_draws)
        self.key = os.environ.get(s.api_key_env) or None

    def _auth(self, request: Request) -> None:
        if self.key and request.headers.get("authorization", "") != f"Bearer {self.key}":
            raise api.ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key", kind="authentication_error")

    @app.get("/v1/models")
    async def models_list(self, request: Request):
        try:
            self._auth(request)
        except api.ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return {"object": "list", "data": [{"id": m.name, "object": "model", "owned_by": "calm-on-ray",
                                            "context_tokens": m.context_tokens} for m in self.info.values()]}

    @app.get("/health")
    async def health(self):
        ok = {kind: await handle.health.remote() for kind, handle in self.models.items()}
        return JSONResponse({"status": "ok" if all(ok.values()) else "degraded", "models": ok},
                            status_code=200 if all(ok.values()) else 503)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            self._auth(request)
            body = await request.body()
            req = api.parse_request(body, self.limits)
            if req.model not in self.info:
                raise api.ApiError(404, f"model '{req.model}' is not served here (served: "
                                        f"{', '.join(self.info)})", "model", "model_not_found")
            gens = api.gen_requests(req, self.info[req.model], self.tok.encode, self.limits)
            streams = [await S.first(self.models[req.model], g) for g in gens]
        except api.ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        rid, prompt_tokens = api.new_id(), sum(len(g.prompt_ids) for g in gens)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(S.events(rid, req.model, streams, req.n, prompt_tokens, usage),
                                     media_type="text/event-stream")
        return await S.collect(rid, req.model, streams, req.n, prompt_tokens)


def direct_ingress(port: int, ports: int = 1) -> None:
    """Ray Serve's direct ingress for a Ray this process starts: the ingress replicas answer HTTP
    themselves on ``port`` .. ``port + ports - 1`` (one port per ingress replica of the node), so a
    request skips the proxy hop (Serve's proxy still starts, on the port ``serve.start`` gives it).
    Measured on 2 CPUs: +40% tokens/s served at 32 concurrent streams (docs/BENCHMARKS.md). Must run
    before Ray starts; a ``ray start`` cluster needs the same variables on its nodes."""
    os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
                       "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + ports)})


def served_kinds(run: RunDir) -> list[str]:
    kinds = [k for k in MODEL_KINDS if run.has_artifact(k)]
    if not kinds:
        raise ArtifactError(f"'{run.uri()}' holds no trained model to serve (neither calm/ nor baseline/); "
                            "run jobs/stage2.py or jobs/baseline.py first")
    return kinds


def build_app(args: dict[str, Any]):
    """Application builder: ``{"run": RUN, "config": NAME_OR_YAML (optional), "serve.key": value, ...}``."""
    args = dict(args)
    run = args.pop("run", None)
    if not run:
        raise ArtifactError("build_app needs run=RUN (a run directory or URI with calm/ or baseline/)")
    cfg: Config = load_config(args.pop("config", "demo"), [f"{k}={v}" for k, v in args.items()])
    s, rd = cfg.serve, RunDir(run)
    models = {kind: ModelServer.options(
        name=f"model-{kind}", max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    ).bind(kind, run, dataclasses.asdict(s)) for kind in served_kinds(rd)}
    key = os.environ.get(s.api_key_env)  # set where the app is built: handed to the ingress replicas
    opts = {"num_cpus": 0, **({"runtime_env": {"env_vars": {s.api_key_env: key}}} if key else {})}
    # the ingress admits every request the model deployments may hold or queue (Serve's default of 5
    # capped the batches at 5 requests: measured, bench/bench_serve.py), so that overload is shed by
    # the model deployments, answered 503 in OpenAI's shape; beyond that requests wait at the ingress
    ongoing = (s.max_ongoing_requests + s.max_queued_requests) * s.max_replicas * len(models)
    return Api.options(name="api", ray_actor_options=opts, max_ongoing_requests=max(1, ongoing)).bind(
        models, run, dataclasses.asdict(s))
