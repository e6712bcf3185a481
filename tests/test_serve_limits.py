"""The request limits of the HTTP API (pipelines/serve/api.py), without a server: every limit is
checked before any work, and every refusal is an ApiError in OpenAI's shape naming the field.
(The same limits against the real Serve app, and a fuzzer: tests/test_serve.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest

from calm_core.sampling import SamplingLimits
from pipelines.serve import api

CALM = api.ModelInfo("calm", "calm", context_tokens=256, step_tokens=4)
BASE = api.ModelInfo("baseline", "baseline", context_tokens=256, step_tokens=1)
LIMITS = api.Limits(max_prompts=3, max_json_depth=4, sampling=SamplingLimits(
    max_tokens=64, max_n=4, max_request_tokens=200, max_stops=2, max_stop_chars=5, max_step_draws=400))


def encode(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


def refused(body, status: int = 400, model: api.ModelInfo = CALM) -> api.ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(api.ApiError) as e:
        api.gen_requests(api.parse_request(raw, LIMITS), model, encode, LIMITS)
    assert e.value.status == status and e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    return e.value


def accepted(body, model: api.ModelInfo = CALM) -> list:
    return api.gen_requests(api.parse_request(json.dumps(body).encode(), LIMITS), model, encode, LIMITS)


GOOD = {"model": "calm", "prompt": "the cat", "max_tokens": 8}


def test_each_limit_is_refused_with_the_field_it_concerns():
    assert len(accepted({**GOOD, "prompt": ["a", "b", "c"], "n": 4, "max_tokens": 16})) == 3  # 192 tokens: fits
    assert refused({**GOOD, "prompt": ["a", "b", "c", "d"]}).param == "prompt"  # max_prompts
    assert refused({**GOOD, "prompt": ["a", "b", "c"], "n": 4, "max_tokens": 17}).param == "max_tokens"  # 204 > 200
    assert refused({**GOOD, "stop": ["a", "b", "c"]}).param == "stop"  # max_stops
    assert refused({**GOOD, "stop": "abcdef"}).param == "stop"  # max_stop_chars
    assert accepted({**GOOD, "stop": ["abcde", "x"]})[0].params.stop == ("abcde", "x")
    assert refused({**GOOD, "seed": 1 << 64}).param == "seed"  # beyond what a generator takes
    assert refused({**GOOD, "seed": -(1 << 63) - 1}).param == "seed"
    assert accepted({**GOOD, "seed": (1 << 64) - 1})[0].params.seed == (1 << 64) - 1
    # the per-step work budget: n x candidates (batch sampler) or n x max_draws (exact) decoded samples
    assert refused({**GOOD, "temperature": 0.5, "n": 4, "candidates": 101}).param == "candidates"
    assert accepted({**GOOD, "temperature": 0.5, "n": 4, "candidates": 100})
    assert refused({**GOOD, "temperature": 0.5, "sampler": "exact", "n": 2, "max_draws": 201}).param == "max_draws"
    assert accepted({**GOOD, "temperature": 1.0, "n": 4, "candidates": 2000})  # T = 1 draws one sample per row
    assert refused({**GOOD, "temperature": 1e-6, "sampler": "exact", "max_draws": 10 ** 9}).param == "max_draws"
    assert refused({**GOOD, "temperature": 1e-6, "sampler": "exact", "max_draws": 300}).param == "temperature"


def test_malformed_bodies_are_400_never_an_exception():
    for body, code in [(b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # deeper than the parser recurses
                       (json.dumps({**GOOD, "user": [[[["x"]]]]}).encode(), "invalid_json"),  # over max_json_depth
                       (b'{"model": "calm", "prompt": "a", "temperature": NaN}', "invalid_json"),
                       (b'{"model": "calm", "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", "invalid_json"),
                       (b"\xff\xfe", "invalid_encoding"), (b"[1, 2]", "invalid_json"), (b"", "invalid_json")]:
        assert refused(body).code == code, body[:40]
    assert refused({**GOOD, "max_tokens": True}).param == "max_tokens"  # strict types: a bool is not an int
    assert refused({**GOOD, "temperature": 1e308}).param == "temperature"
    assert refused({**GOOD, "model": "baseline", "temperature": 0.5, "top_p": 0.0}, model=BASE).param == "top_p"


async def _chunks(parts):
    for p in parts:
        yield p


def test_the_body_limit_holds_while_reading():
    read = lambda length, parts: asyncio.run(api.read_body(length, _chunks(parts), 10))  # noqa: E731
    assert read("6", [b"abc", b"def"]) == b"abcdef"
    assert read(None, [b"abc", b"defghij"]) == b"abcdefghij"  # chunked: no length, within the limit
    with pytest.raises(api.ApiError) as e:  # declared too long: refused before a byte is read
        read("11", iter_fail())
    assert e.value.status == 413 and e.value.code == "body_too_large"
    seen = []

    async def endless():
        while True:
            seen.append(1)
            yield b"x" * 4

    with pytest.raises(api.ApiError) as e:  # chunked and endless: refused once past the limit
        asyncio.run(api.read_body(None, endless(), 10))
    assert e.value.status == 413 and len(seen) == 3
    with pytest.raises(api.ApiError) as e:
        read("ten", [b""])
    assert e.value.status == 400 and e.value.code == "invalid_header"


def iter_fail():
    async def gen():
        raise AssertionError("the body was read although its declared length is over the limit")
        yield b""  # noqa: unreachable - makes this an async generator
    return gen()
