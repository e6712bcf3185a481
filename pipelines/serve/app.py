"""The Ray Serve application: an ingress deployment (FastAPI through ``serve.ingress``) that checks the
API key, validates, tokenises and streams; one model deployment per served model (CALM, the
baseline) holding what a generation step needs, autoscaled with a bounded queue.

    client --HTTP--> Api (ingress) --handle, streaming--> ModelServer "calm" | "baseline"

``build_app({"run": RUN, ...overrides})`` is the application builder for ``serve run`` and
``jobs/serve.py``; ``cluster/serve.yaml`` deploys the same builder with ``serve deploy``.
"""


import asyncio
import dataclasses
import os
import time
from typing import Any

from ray import serve

from calm_core.artifacts import MODEL_KINDS
from calm_core.config import Config, ServeConfig, load_config
from calm_core.errors import ArtifactError
from pipelines.serve.ingress import Api, api_key
from pipelines.storage import RunDir

class Unavailable(Exception):
    """This replica cannot serve (its step loop has ended); Serve replaces it."""


def error_message(e: BaseException) -> dict:
    """How a model replica reports a request it could not finish, in place of a message of steps."""
    from pipelines.serve.batch import RequestTimeout

    if isinstance(e, RequestTimeout):
        return {"error": {"status": 504, "message": str(e), "code": "timeout", "type": "server_error"}}
    if isinstance(e, Unavailable):
        return {"error": {"status": 503, "message": str(e), "code": "model_unavailable", "type": "server_error"}}
    return {"error": {"status": 500, "message": f"the model failed on this request ({type(e).__name__}: "
                                                f"{str(e)[:300]})", "code": "model_error", "type": "server_error"}}


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
        from calm_core.engine import BaselineEngine, CalmEngine

        s = ServeConfig(**settings)
        torch.set_num_threads(max(1, s.threads_per_replica))
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        rd = RunDir(run)
        self.engine = (CalmEngine.load(rd.local_artifact("ae"), rd.local_artifact("calm"), device) if kind == "calm"
                       else BaselineEngine.load(rd.local_artifact("baseline"), device))
        self.metrics = ServeMetrics(kind)
        self.kind, self.policy, self.timeout_s, self.step_timeout_s = kind, s.batching, s.request_timeout_s, s.step_timeout_s
        self.interval, self.rate, self.open = s.stream_interval_ms / 1000.0, s.stream_messages_per_s, 0
        self.loop = (StepLoop(self.engine, s.max_batch_rows, self.metrics.step, s.request_timeout_s)
                     if s.batching == "loop" else None)
        self.window_step: float | None = None  # serve_batch: time.monotonic() of the last step
        self._window.set_max_batch_size(s.max_batch_rows)
        self._window.set_batch_wait_timeout_s(s.batch_wait_ms / 1000.0)

    async def stream(self, r):
        """Messages of model steps, each step the deltas of the request's completions (dicts: index,
        text, finish, tokens). A message holds every step done since the last one was taken: one
        per step while the client keeps up, several when the model runs ahead (fewer round trips
        through Serve under load; the ingress still sends one event per step). A request that fails
        or times out before it ends gets one last message ``{"error": {...}}`` (``error_message``)."""
        self.metrics.requests.inc()
        if self.policy == "loop":
            async for steps in self._loop_stream(r):
                yield steps if isinstance(steps, dict) else [[dataclasses.asdict(d) for d in deltas] for deltas in steps]
        else:
            async for deltas in self._window(r):
                if isinstance(deltas, BaseException):
                    yield error_message(deltas)
                    return
                yield [[dataclasses.asdict(d) for d in deltas]]

    async def _next(self, q: asyncio.Queue):
        """The step loop's next item for a request, or ``Unavailable`` as soon as the loop has died."""
        while True:
            try:
                return await asyncio.wait_for(q.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if not self.loop.thread.is_alive():  # check_health fails too: Serve replaces this replica
                    return Unavailable(f"model '{self.kind}': the step loop has ended; retry")

    async def _loop_stream(self, r):
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        m = self.loop.submit(r, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        self.open += 1
        try:
            finished, last = False, None
            while not finished:
                items = [await self._next(q)]
                if last is not None and not isinstance(items[0], BaseException) and not items[0][1]:
                    # after the first message, at most one per stream interval: the steps in between ride along
                    wait = last + message_interval(self.interval, self.open, self.rate) - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                while not q.empty() and not isinstance(items[-1], BaseException) and not items[-1][1]:
                    items.append(q.get_nowait())
                if isinstance(items[-1], BaseException):
                    if len(items) > 1:
                        yield [deltas for deltas, _ in items[:-1]]
                    yield error_message(items[-1])
                    return
                finished = items[-1][1]
                last = time.monotonic()
                yield [deltas for deltas, _ in items]
        finally:
            self.open -= 1
            m.cancelled = True  # the client went away: the loop drops the rows at its next step

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=lambda rs: sum(r.params.n for r in rs))
    async def _window(self, rs: list):
        """``serve_batch``: the requests Serve collected, stepped together until the last one ends."""

        from calm_core.batching import Batch, Member, step_stats

        batch = Batch(self.engine)
        members, results = [], [StopIteration] * len(rs)
        for i, r in enumerate(rs):  # a request that cannot start (a bad seed, say) fails alone
            try:
                members.append(Member.start(self.engine, r, timeout_s=self.timeout_s))
            except Exception as e:  # noqa: BLE001
                members.append(None)
                results[i] = e
        slot = {id(m): i for i, m in enumerate(members) if m is not None}
        ended = [m is None for m in members]
        try:
            await asyncio.to_thread(batch.join, [m for m in members if m is not None])
        except Exception as e:  # noqa: BLE001 - the prefill of these requests failed: each ends with it
            yield [e if m is not None else results[i] for i, m in enumerate(members)]
            return
        if any(ended):  # the failed ones end now; the others get an empty step
            yield [r if m is None else [] for r, m in zip(results, members)]
        while batch.members:
            out = await asyncio.to_thread(batch.step)
            self.window_step = time.monotonic()
            self.metrics.step(*step_stats(out))
            results = [StopIteration] * len(rs)
            for m, e in batch.failed:
                results[slot[id(m)]], ended[slot[id(m)]] = e, True
            for m, deltas, finished in out:
                results[slot[id(m)]] = deltas
            for m, _, finished in out:
                ended[slot[id(m)]] = finished
            yield results
            if all(ended):
                return

    def _problem(self) -> str | None:
        """Why this replica cannot serve (a dead or stuck step loop), or None."""
        return self.loop.health(self.step_timeout_s) if self.loop is not None else None

    def status(self) -> dict:
        """Cheap (no model step): the replica's state for ``GET /health``."""
        last = self.loop.last_step if self.loop is not None else self.window_step
        problem = self._problem()
        return {"ok": problem is None, "problem": problem, "open_streams": self.open,
                "last_step_s_ago": None if last is None else round(time.monotonic() - last, 3),
                "restarts": self.loop.restarts if self.loop is not None else 0}

    def check_health(self) -> None:
        """Ray Serve calls this every ``serve.health_check_period_s``: a dead or stuck step loop
        raises, and Serve replaces the replica."""
        problem = self._problem()
        if problem:
            raise RuntimeError(f"model '{self.kind}': {problem}")


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
        health_check_period_s=s.health_check_period_s,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    ).bind(kind, run, dataclasses.asdict(s)) for kind in served_kinds(rd)}
    api_key(s)  # a missing or empty key file: one clear error here, before any replica starts
    opts = {"num_cpus": 0}  # the key is read by the replicas (file or environment), never put in a runtime_env
    # the ingress admits every request the model deployments may hold or queue (Serve's default of 5
    # capped the batches at 5 requests: measured, bench/bench_serve.py), so that overload is shed by
    # the model deployments, answered 503 in OpenAI's shape; beyond that requests wait at the ingress
    ongoing = (s.max_ongoing_requests + s.max_queued_requests) * s.max_replicas * len(models)
    return Api.options(name="api", ray_actor_options=opts, max_ongoing_requests=max(1, ongoing)).bind(
        models, run, dataclasses.asdict(s))
