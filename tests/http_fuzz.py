"""A seeded fuzzer for the HTTP API: hostile and odd requests in four phases, sent over a raw HTTP
connection, each answer checked against the server's promises (tests/test_serve.py runs it against
a local Serve app; bench/bench_serve_limits.py measures it; point it at any deployment). A test and
benchmark harness: it is not part of the installed package.

    bodies    malformed bodies: random bytes, invalid UTF-8, cut JSON, deep nesting, NaN, huge numbers
    fields    wrong types, unknown fields, huge and empty values of every field
    sampling  extreme sampling settings on both models, plain and streamed (the stalling request too)
    http      other methods and paths, lying or missing Content-Length, chunked bodies over the limit

The promises: no answer >= 500 except 503 (overload); every 4xx/5xx is OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``; a 200 stream holds no error event.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

PHASES = ("bodies", "fields", "sampling", "http")
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
          "user", "candidates", "sampler", "max_draws", "logprobs", "echo", "best_of", "suffix"]
ODD_VALUES = [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 64 + 1, -(2 ** 70), 1e-300, 1e308, -0.0, 0.5, "", "x",
              "\u0000", "\ud7ff" * 3, "é" * 50, [], [1], ["a"], [""], {}, {"a": 1}, [[["a"]]], "NaN", 10 ** 40]


@dataclass
class Case:
    phase: str
    method: str
    path: str
    body: bytes
    headers: dict
    chunked: bool = False


@dataclass
class Answer:
    case: Case
    status: int
    body: bytes
    seconds: float
    problem: str | None  # why the answer breaks a promise (None: it keeps them)


def cases(seed: int, per_phase: int, models=("calm", "baseline"), max_body_bytes: int = 1 << 20) -> list[Case]:
    rng = random.Random(seed)
    json_h = {"Content-Type": "application/json"}

    def good(**kw) -> dict:
        return {"model": rng.choice(models), "prompt": "the cat", "max_tokens": rng.randint(1, 8), **kw}

    def post(phase, body, headers=None, **kw) -> Case:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Case(phase, "POST", "/v1/completions", raw, {**json_h, **(headers or {})}, **kw)

    out: list[Case] = []
    for _ in range(per_phase):  # bodies
        kind = rng.randrange(8)
        text = json.dumps(good())
        body = [lambda: bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))),
                lambda: text.encode()[: rng.randint(0, len(text) - 1)],
                lambda: text.replace("the cat", "\udcff").encode("utf-8", "surrogateescape"),
                lambda: b"[" * rng.randint(10, 200_000) + b"]" * rng.randint(0, 10),
                lambda: text.replace('"max_tokens": ', '"max_tokens": NaN, "x": ').encode(),
                lambda: text.replace('"max_tokens": ', '"max_tokens": 1' + "0" * rng.randint(400, 9000) + ", \"y\": ").encode(),
                lambda: json.dumps(rng.choice([[], 1, "s", None, [good()]])).encode(),
                lambda: json.dumps({**good(), "user": _nested(rng.randint(9, 60))}).encode()][kind]()
        out.append(post("bodies", body))
    for _ in range(per_phase):  # fields
        body = good()
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(FIELDS + ["unknown", "max_tokens"])
            body[name] = rng.choice(ODD_VALUES + ["y" * rng.choice([10, 5000, 200_000])])
        if rng.random() < 0.2:
            body.pop(rng.choice(["model", "prompt"]), None)
        out.append(post("fields", body))
    for _ in range(per_phase):  # sampling
        body = good(stream=rng.random() < 0.5, seed=rng.choice([None, 0, 7, 2 ** 64 - 1, 2 ** 64, -5]),
                    temperature=rng.choice([1.0, 0.5, 0.1, 1e-3, 1e-6, 0.0, 1.0000001, 2.0, -1e-9, 1e9]),
                    n=rng.choice([1, 2, 16, 17, 10 ** 6]), sampler=rng.choice(["batch", "exact", "other"]),
                    candidates=rng.choice([1, 200, 2000, 2001, 10 ** 9]),
                    max_draws=rng.choice([1, 10, 2000, 2001, 10 ** 9]),
                    max_tokens=rng.choice([1, 4, 24, 25, 10 ** 6]),
                    prompt=rng.choice(["a", "the cat " * rng.randint(1, 400), ["a"] * rng.choice([1, 3, 17, 1000])]),
                    stop=rng.choice([None, "e", ["e", "a"], ["x"] * 5, "s" * 129, ""]))
        if rng.random() < 0.3:  # mostly within the limits, so that many of these really generate
            for k in ("candidates", "max_draws", "n", "max_tokens"):
                body[k] = min(body[k], {"candidates": 64, "max_draws": 64, "n": 2, "max_tokens": 8}[k])
            body["prompt"], body["temperature"] = "the cat", rng.choice([1.0, 0.5, 0.25])
        out.append(post("sampling", body))
    out += [_http_case(i, rng, post, good, max_body_bytes) for i in range(per_phase)]
    return out


def _http_case(i: int, rng: random.Random, post, good, max_body_bytes: int) -> Case:
    kind = i % 6
    if kind == 0:
        return Case("http", rng.choice(["GET", "PUT", "DELETE", "PATCH"]), "/v1/completions", b"", {})
    if kind == 1:
        return Case("http", rng.choice(["GET", "POST", "DELETE"]),
                    rng.choice(["/", "/v2/x", "/v1/models/calm", "/docs", "/openapi.json", "/redoc",
                                "/v1/chat/completions", "/health/../v1/models"]), b"", {})
    if kind == 2:
        return Case("http", "DELETE", "/v1/models", b"", {})
    if kind == 3:  # the body is longer than the limit, sent in chunks without a length
        return post("http", b" " * (max_body_bytes + 1) + b"{}", chunked=True)
    if kind == 4:  # a declared length over the limit (the body itself is short)
        return post("http", json.dumps(good()).encode(), {"Content-Length": str(max_body_bytes * 10)})
    return post("http", json.dumps(good()).encode(), {"Content-Type": rng.choice(["text/plain", "x/y", ""]),
                                                      "Authorization": "Bearer " + "k" * 5000})


def _nested(depth: int):
    v: object = "x"
    for _ in range(depth):
        v = [v]
    return v


def send(base_url: str, case: Case, timeout: float = 120.0) -> Answer:
    """One case over a fresh connection -> its answer, checked."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        path = (u.path.rstrip("/") + case.path) or "/"
        if case.chunked:
            conn.putrequest(case.method, path)
            for k, v in {**case.headers, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            try:
                for i in range(0, len(case.body), 65536):
                    part = case.body[i:i + 65536]
                    conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                conn.send(b"0\r\n\r\n")
            except OSError:  # the server answered and closed before the whole body went out: fine
                pass
        elif "Content-Length" in case.headers:  # a lying length: send the headers and the short body as they are
            conn.putrequest(case.method, path, skip_accept_encoding=True)
            for k, v in case.headers.items():
                conn.putheader(k, v)
            conn.endheaders(case.body)
        else:
            conn.request(case.method, path, body=case.body or None, headers=case.headers)
        r = conn.getresponse()
        status, body = r.status, r.read()
    finally:
        conn.close()
    return Answer(case, status, body, time.perf_counter() - t0, check(status, body))


def check(status: int, body: bytes) -> str | None:
    """Why an answer breaks the server's promises, or None."""
    if status >= 500 and status != 503:
        return f"status {status}"
    if status >= 400:
        try:
            err = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {status} without OpenAI's error shape: {body[:120]!r}"
        if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or not err["message"]:
            return f"status {status} with a malformed error: {err!r:.160}"
    elif status == 200 and body.startswith(b"data: ") and b'"error"' in body:
        return f"a stream ended by an error: {body[-200:]!r}"
    return None
