"""Serving: the real Ray Serve application on a local 2-CPU Ray, reached over HTTP by the official
``openai`` client (unmodified) and by raw requests for the bad inputs.

The run holds a random tiny AE, CALM and baseline written by the project's artifact writer: what is
tested here is the serving (API, streaming, seeds, stop strings, validation), not the text.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from conftest import write_random_ae, write_random_model

from pipelines.ray_env import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, tiny_corpus_text):
    """A run with a random tiny AE, CALM and baseline (no Ray)."""
    run = tmp_path_factory.mktemp("serve") / "run"
    _, tok = write_random_ae(run / "ae", tiny_corpus_text, for_text=True)
    write_random_model(run, "calm", tok)
    write_random_model(run, "baseline", tok)
    return run


@pytest.fixture(scope="module")
def server(ray_module, served_run):
    """(base URL, run directory) of the app serving both models; a second app at /secure needs a key
    (from a key file) and serves its docs,
    a third at /tight takes one request at a time with a queue of one, a fourth at /window batches
    with Ray Serve's @serve.batch instead of the step loop."""
    from ray import serve

    from pipelines.serve.app import build_app

    run = served_run
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"run": str(run), "config": "debug", "serve.cpus_per_replica": "0.2", "serve.max_tokens": "24",
             "serve.max_request_tokens": "512"}
    # the open app caps its streams' messages (fuller messages as streams open): every test of it goes through that
    serve.run(build_app({**small, "serve.stream_messages_per_s": "20", "serve.health_check_period_s": "1"}),
              name="open", route_prefix="/")
    key_file = run / "api-key"  # as a mounted Secret would be
    key_file.write_text("sesame\n")
    serve.run(build_app({**small, "serve.api_key_file": str(key_file), "serve.docs": "true"}), name="secure",
              route_prefix="/secure")
    tight = {"serve.max_ongoing_requests": "1", "serve.max_queued_requests": "1", "serve.max_batch_rows": "1"}
    serve.run(build_app({**small, **tight}), name="tight", route_prefix="/tight")
    window = {"serve.batching": "serve_batch", "serve.batch_wait_ms": "300"}
    serve.run(build_app({**small, **window}), name="window", route_prefix="/window")
    yield f"http://127.0.0.1:{port}", run
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_list_and_health(server, client):
    """/health runs no model step: it reports each model replica's step loop; its details need the key."""
    assert sorted(m.id for m in client.models.list().data) == ["baseline", "calm"]
    code, out = get(f"{server[0]}/health")
    assert code == 200 and out["status"] == "ok" and set(out["models"]) == {"calm", "baseline"}
    assert all(m["ok"] and m["problem"] is None and m["restarts"] == 0 for m in out["models"].values())
    code, out = get(f"{server[0]}/secure/health")
    assert code == 200 and out == {"status": "ok"}  # no key: the state only
    code, out = get(f"{server[0]}/secure/health", {"Authorization": "Bearer sesame"})
    assert code == 200 and set(out["models"]) == {"calm", "baseline"}


@pytest.mark.parametrize("model,temperature", [("calm", 1.0), ("calm", 0.5), ("baseline", 0.8)])
def test_streamed_text_equals_the_plain_text_for_a_seed(server, client, model, temperature):
    from calm_core.artifacts import load_ae

    kw = dict(model=model, prompt="the cat sat on", max_tokens=12, temperature=temperature, seed=7)
    plain = client.completions.create(**kw)
    events = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(e.choices[0].text for e in events if e.choices)
    assert streamed == plain.choices[0].text and len(plain.choices[0].text) > 0
    assert plain.choices[0].finish_reason in ("length", "stop")
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == plain.choices[0].finish_reason
    assert events[-1].usage.completion_tokens == plain.usage.completion_tokens <= 12
    assert plain.usage.prompt_tokens == len(load_ae(server[1] / "ae").tok.encode("the cat sat on"))  # the run's tokenizer
    assert client.completions.create(**kw).choices[0].text == plain.choices[0].text  # the seed decides
    if model == "calm":  # one event per decoded chunk of K = 4 tokens (the last may carry only the end)
        assert len([e for e in events if e.choices]) <= 12 // 4 + 1


def test_n_choices_and_a_list_of_prompts(client):
    out = client.completions.create(model="calm", prompt=["the cat", "a dog ran"], max_tokens=8, n=2, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert len({c.text for c in out.choices}) > 1
    events = list(client.completions.create(model="baseline", prompt="the cat", max_tokens=6, n=3, seed=2, stream=True))
    assert {e.choices[0].index for e in events} == {0, 1, 2}


@pytest.mark.parametrize("model", ["calm", "baseline"])
def test_a_stop_string_cuts_the_text_where_it_starts(client, model):
    kw = dict(model=model, prompt="the cat sat", max_tokens=20, temperature=1.0, seed=11)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 6, full
    stop = full[3:5]  # starts inside the text, and for CALM usually inside a chunk
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(e.choices[0].text for e in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url = f"{server[0]}/v1/completions"
    good = {"model": "calm", "prompt": "the cat", "max_tokens": 4}

    def bad(body, status: int, param_or_code: str):
        code, out = post(url, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert code == status, (body, out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert param_or_code in (err["param"], err["code"]), err

    bad(b"{not json", 400, "invalid_json")
    bad(b'{"model": "calm", "prompt": "\xff\xfe"}', 400, "invalid_encoding")
    bad({**good, "max_tokens": "4"}, 400, "max_tokens")
    bad({**good, "prompt": 5}, 400, "invalid_value")
    bad({**good, "model": "gpt-4"}, 404, "model_not_found")
    bad({**good, "prompt": ""}, 400, "prompt")
    bad({**good, "prompt": "the cat sat on the mat " * 20}, 400, "context_length_exceeded")
    bad({**good, "max_tokens": 0}, 400, "max_tokens")
    bad({**good, "max_tokens": 25}, 400, "max_tokens")  # over serve.max_tokens
    bad({**good, "temperature": 1.5}, 400, "temperature")
    bad({**good, "model": "baseline", "temperature": -1}, 400, "temperature")
    bad({**good, "logprobs": 2}, 400, "logprobs")
    # the request that stalled a replica (a billion draws at T = 1e-6), and the floor of the exact sampler
    bad({**good, "temperature": 1e-6, "sampler": "exact", "max_draws": 1_000_000_000}, 400, "max_draws")
    bad({**good, "temperature": 1e-6, "sampler": "exact"}, 400, "temperature")
    bad({**good, "unknown_field": 1}, 400, "unknown_field")
    bad(json.dumps({**good, "prompt": "x" * (1 << 20)}).encode(), 413, "body_too_large")
    # one request crafted for each limit of serve.*
    bad({**good, "prompt": ["a"] * 17}, 400, "prompt")  # max_prompts
    bad({**good, "prompt": ["a"] * 16, "n": 2, "max_tokens": 24}, 400, "max_tokens")  # max_request_tokens (512 here)
    bad({**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop")  # max_stops
    bad({**good, "stop": "s" * 129}, 400, "stop")  # max_stop_chars
    bad({**good, "temperature": 0.5, "n": 16, "candidates": 2000, "sampler": "exact"}, 400, "max_draws")  # max_step_draws
    bad({**good, "seed": 1 << 64}, 400, "seed")  # a seed the generator cannot take (it failed its batch)
    bad({**good, "user": [[[[[[[[["deep"]]]]]]]]]}, 400, "invalid_json")  # max_json_depth
    bad(b"[" * 100_000, 400, "invalid_json")  # deeper than the parser recurses (it was a 500)
    bad(b'{"model": "calm", "prompt": "a", "temperature": NaN}', 400, "invalid_json")
    assert post(url, json.dumps(good).encode())[0] == 200


def test_routing_errors_are_in_openais_shape_and_the_docs_are_off_unless_asked(server):
    base = server[0]
    for method, path, status in [("GET", "/v1/completions", 405), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v2/nothing", 404), ("GET", "/docs", 404), ("GET", "/openapi.json", 404)]:
        code, out = get(base + path, method=method)
        assert code == status and set(out["error"]) == {"message", "type", "param", "code"}, (path, out)
    code, spec = get(f"{base}/secure/openapi.json")  # serve.docs=true
    assert code == 200 and "/v1/completions" in spec["paths"]


def test_an_api_key_is_required_when_set(server):
    from openai import AuthenticationError, OpenAI

    base = f"{server[0]}/secure/v1"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base, api_key="wrong", max_retries=0).completions.create(model="calm", prompt="a", max_tokens=4)
    code, out = post(f"{base}/completions", json.dumps({"model": "calm", "prompt": "a", "max_tokens": 4}).encode())
    assert code == 401 and out["error"]["code"] == "invalid_api_key"
    code, out = post(f"{base}/completions", b"{}", {"Authorization": "Bearer sesame2"})  # a longer key: no crash
    assert code == 401
    code, out = post(f"{base}/completions", b"{}", {"Authorization": "Bearer s\u00e9same"})
    assert code == 401
    ok = OpenAI(base_url=base, api_key="sesame", max_retries=0).completions.create(model="calm", prompt="a", max_tokens=4)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_the_serve_deploy_config_builds_the_deployments_it_configures(served_run):
    """cluster/serve.yaml is a valid Ray Serve deploy config; the application builder it names,
    imported from its import_path as Serve does and called with its args (the run pointed at a run of
    this machine), builds the ingress and one model deployment per model of the run, each with the
    options the args set and, for the rest, the values of the config the args name."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve._private.build_app import build_app as serve_build
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeDeploySchema

    from calm_core.config import load_config

    text = (Path(__file__).resolve().parents[1] / "cluster" / "serve.yaml").read_text()
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
    module, name = app.import_path.split(":")
    application = getattr(importlib.import_module(module), name)({**app.args, "run": str(served_run)})
    # Serve has no public API that lists an application's deployments before it is deployed: these are
    # the functions the `serve build` command runs to write them out
    built = {d.name: deployment_to_schema(d) for d in serve_build(application, name=app.name).deployments}
    assert set(built) == {"api", "model-calm", "model-baseline"}
    args = app.args
    defaults = load_config(args["config"]).serve  # what the args leave to the config they name
    for kind in ("calm", "baseline"):
        d = built[f"model-{kind}"]
        scaling = d.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (
            args["serve.min_replicas"], args["serve.max_replicas"], args["serve.target_ongoing_requests"]), kind
        assert (d.max_queued_requests, d.max_ongoing_requests) == (args["serve.max_queued_requests"],
                                                                   defaults.max_ongoing_requests), kind
        assert (d.ray_actor_options.num_cpus, d.ray_actor_options.num_gpus) == (defaults.cpus_per_replica,
                                                                                  defaults.gpus_per_replica), kind
        assert d.health_check_period_s == defaults.health_check_period_s, kind
    # the ingress admits what the model deployments may hold or queue, over all their replicas
    admits = (defaults.max_ongoing_requests + args["serve.max_queued_requests"]) * args["serve.max_replicas"] * 2
    assert built["api"].max_ongoing_requests == admits and built["api"].ray_actor_options.num_cpus == 0


def test_the_message_interval_grows_with_the_open_streams_beyond_the_cap():
    """serve.stream_messages_per_s: n open streams at a cap of r messages/s send one message each per
    n / r seconds, never more often than stream_interval_ms; no cap (0) keeps the interval."""
    from pipelines.serve.app import message_interval

    assert message_interval(0.05, 1, 200.0) == 0.05  # below the cap: the interval
    assert message_interval(0.05, 32, 200.0) == pytest.approx(0.16)  # 32 streams x 1/0.16 s = 200 messages/s
    assert message_interval(0.05, 64, 0.0) == 0.05 and message_interval(0.0, 64, 0.0) == 0.0


def test_overload_beyond_the_queue_is_503_at_once_and_the_rest_are_served(server):
    """One request at a time and one waiting: of 8 slow concurrent requests most are refused with a
    503 in OpenAI's shape (never a hang), the admitted ones complete, and afterwards all is normal."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{server[0]}/tight/v1/completions"
    slow = json.dumps({"model": "calm", "prompt": "the cat", "max_tokens": 24, "n": 4, "temperature": 0.5,
                       "candidates": 2000, "seed": 0}).encode()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post(url, slow), range(8)))
    codes = sorted(code for code, _ in results)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    assert all(out["error"]["code"] == "overloaded" for code, out in results if code == 503)
    assert post(url, json.dumps({"model": "calm", "prompt": "a", "max_tokens": 4}).encode())[0] == 200


def test_a_killed_model_replica_is_replaced_and_later_requests_are_served(server, client):
    """Ray Serve's controller replaces a dead replica; the API keeps answering (retried while the
    new replica starts, as a client would)."""
    import time

    import openai
    import ray

    before = client.completions.create(model="baseline", prompt="the cat", max_tokens=6, seed=5).choices[0].text
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "open#model-baseline" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    deadline, after = time.monotonic() + 180, None
    while after is None and time.monotonic() < deadline:
        try:
            after = client.completions.create(model="baseline", prompt="the cat", max_tokens=6, seed=5)
        except (openai.InternalServerError, openai.APIConnectionError):  # a 5xx, or a reset connection or a
            time.sleep(1)  # timeout, while the replica is replaced; a 4xx is no part of that and fails the test
    assert after is not None and after.choices[0].text == before  # same seed, same text, new replica
    names_now = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and "open#model-baseline" in a["name"]]
    assert names_now and names_now != names


def test_the_fuzzer_gets_no_server_error_and_every_refusal_in_openais_shape(server):
    """At least 500 hostile requests (tests/http_fuzz.py: malformed bodies, wrong types, huge
    and nested values, invalid UTF-8, unknown fields, extreme sampling settings on both models, plain
    and streamed, other methods and paths, lying lengths, chunked bodies over the limit), four at a
    time: no answer >= 500 but 503, every refusal in OpenAI's shape, and a plain request answered
    after each phase."""
    import http_fuzz as fuzz

    url = server[0]
    all_cases = fuzz.cases(seed=0, per_phase=130)
    assert len(all_cases) >= 500
    plain = json.dumps({"model": "calm", "prompt": "the cat", "max_tokens": 4, "seed": 1}).encode()
    statuses: dict[int, int] = {}
    for phase in fuzz.PHASES:
        answers = concurrently(lambda c: fuzz.send(url, c), [c for c in all_cases if c.phase == phase], workers=4)
        problems = [(a.case.body[:80], a.status, a.problem) for a in answers if a.problem]
        assert not problems, (phase, problems[:5])
        for a in answers:
            statuses[a.status] = statuses.get(a.status, 0) + 1
        assert post(f"{url}/v1/completions", plain)[0] == 200, phase
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) >= 250, statuses  # both kinds were really exercised


def _step_rows(text: str, app: str) -> tuple[dict[float, float], list[float]]:
    """Buckets and count of the rows-per-step histogram of ``app``'s CALM replica."""
    mine = [line for line in text.splitlines()
            if line.startswith("ray_calm_serve_step_rows") and f'application="{app}"' in line and 'model="calm"' in line]
    buckets = {float(m.group(1)): float(m.group(2)) for line in mine if "_bucket" in line
               for m in [re.search(r'le="([^"]+)"[^}]*} (\S+)$', line)] if m and m.group(1) != "+Inf"}
    return buckets, [float(line.rsplit(" ", 1)[1]) for line in mine if line.startswith("ray_calm_serve_step_rows_count")]


def concurrently(fn, args: list, workers: int | None = None) -> list:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(workers or len(args)) as ex:
        return list(ex.map(fn, args))


NAMES = ("calm_serve_requests", "calm_serve_steps", "calm_serve_tokens", "calm_serve_step_rows")


def batched_steps(app: str, wait_s: float = 30) -> tuple[str, bool]:
    """(the node's Prometheus text, whether ``app``'s CALM replica exported a step of several rows),
    polled: exports come every few seconds."""
    import time

    import ray

    node = ray.get_runtime_context().get_node_id()
    (port,) = [n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node]
    deadline = time.monotonic() + wait_s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        buckets, total = _step_rows(text, app)
        several = bool(buckets) and len(total) == 1 and total[0] > buckets[1.0]
        if (several and all(f"ray_{n}" in text for n in NAMES)) or time.monotonic() > deadline:
            return text, several
        time.sleep(2)


def test_the_project_metrics_are_exported_and_show_concurrent_requests_batched(server, client):
    """Requests, steps, rows per step and tokens appear on the node's Prometheus endpoint; concurrent
    one-completion requests shared model steps (steps of more than one row). A round of 6 concurrent
    requests is sent again if none overlapped."""
    for _ in range(4):
        concurrently(lambda i: client.completions.create(model="calm", prompt="the cat", max_tokens=24, seed=i),
                     list(range(6)))
        text, several = batched_steps("open")
        if several:
            break
    for name in NAMES:
        assert re.search(name + r'\w*\{[^}]*model="calm"', text), name
    assert several  # some steps computed several requests' rows


@pytest.mark.parametrize("model", ["calm", "baseline"])
def test_serve_batch_batching_gives_the_same_texts_as_the_step_loop(server, model):
    """The /window app (``serve.batching=serve_batch``, 300 ms window) batches 4 concurrent requests
    into one @serve.batch call; each seeded text equals the step loop's, streamed or not."""
    base = server[0]

    def complete(args):
        app, seed, stream = args
        body = {"model": model, "prompt": "the cat sat", "max_tokens": 12 + 4 * seed, "seed": seed, "stream": stream}
        req = urllib.request.Request(f"{base}{app}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
        if not stream:
            return json.loads(raw)["choices"][0]["text"]
        events = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")]
        return "".join(c["text"] for e in events for c in e["choices"])

    loop = concurrently(complete, [("", s, False) for s in range(4)])
    assert concurrently(complete, [("/window", s, False) for s in range(4)]) == loop
    assert concurrently(complete, [("/window", s, True) for s in range(4)]) == loop
    assert len(set(loop)) == 4
    if model == "calm":
        assert batched_steps("window", 60)[1]  # @serve.batch put concurrent requests in one step


def test_jobs_serve_with_direct_ingress_answers_from_the_ingress_replica(server, tmp_path):
    """`jobs/serve.py ... serve.direct_ingress=true` as a user starts it (its own Ray): the port is held
    by the ingress replica itself (no proxy hop) and the openai client gets plain and streamed text."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil
    from openai import OpenAI

    from conftest import one_line_error, stop_group

    root, run, port = Path(__file__).resolve().parents[1], server[1], free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    cmd = [sys.executable, str(root / "jobs" / "serve.py"), "--run", str(run), "--config", "debug", "--port",
           str(port), "serve.direct_ingress=true", "serve.cpus_per_replica=0.2", "serve.max_tokens=24"]
    refused = subprocess.run(cmd, env={**env, "RAY_ADDRESS": "127.0.0.1:1"}, capture_output=True, text=True,
                             timeout=120)
    one_line_error(refused, "serve.direct_ingress", "RAY_SERVE_ENABLE_DIRECT_INGRESS=1")

    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "[serve] serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert f"http://127.0.0.1:{port}/v1 (direct ingress)" in log.read_text()
        holders = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        titles = [psutil.Process(p).cmdline()[0] for p in holders]
        assert titles and all(t.startswith("ray::ServeReplica") and t.endswith(":api") for t in titles), titles
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        plain = client.completions.create(model="calm", prompt="the cat", max_tokens=12, seed=3)
        streamed = "".join(e.choices[0].text for e in client.completions.create(
            model="calm", prompt="the cat", max_tokens=12, seed=3, stream=True) if e.choices)
        assert plain.choices[0].text and streamed == plain.choices[0].text
    finally:
        stop_group(proc, signal.SIGINT)


def test_a_dead_step_loop_fails_check_health_and_serve_replaces_the_replica(server, client):
    """(Last in this file: it replaces the CALM replica, whose old metrics would confuse the metrics test.)
    The step loop of the CALM replica is stopped from inside the replica (as if its thread had
    died): requests to it end at once with a 503 instead of hanging, its check_health fails, Serve
    (health checks every second in this app) replaces it, and later requests are served."""
    import time

    import ray

    def replica():
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and "open#model-calm" in a["name"]]
        assert len(names) == 1, names
        return names[0], ray.get_actor(names[0], namespace="serve")

    kw = dict(model="calm", prompt="the cat", max_tokens=8, seed=3)
    before = client.completions.create(**kw).choices[0].text
    name, actor = replica()

    def stop_loop(replica_actor):  # runs inside the replica actor
        # Serve's private attributes: no public API reaches the object a replica serves with (its
        # ModelServer) from outside, and the product has no hook to stop its step loop
        loop = replica_actor._replica_impl._user_callable_wrapper.user_callable.loop
        loop.stopped = True
        loop.thread.join(10)
        return loop.thread.is_alive()

    assert ray.get(actor.__ray_call__.remote(stop_loop)) is False
    code, out = post(f"{server[0]}/v1/completions", json.dumps(kw).encode())
    assert code == 503 and out["error"]["code"] in ("model_unavailable", "overloaded"), out
    deadline, after = time.monotonic() + 180, None
    while after is None and time.monotonic() < deadline:
        code, out = post(f"{server[0]}/v1/completions", json.dumps(kw).encode())
        after = out if code == 200 else time.sleep(1)
    assert after is not None and after["choices"][0]["text"] == before  # same seed, same text, new replica
    assert replica()[0] != name
    code, out = get(f"{server[0]}/health")
    assert code == 200 and out["models"]["calm"]["ok"]
