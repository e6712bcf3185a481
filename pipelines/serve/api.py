"""The HTTP API as OpenAI defines it (``POST /v1/completions``): the request schema, its validation
against a served model, the response and server-sent-event shapes, and OpenAI's error shape.

Plain pydantic; no Ray. Every rejection is an ``ApiError`` that becomes
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from calm_core.engine import GenRequest
from calm_core.sampling import SamplingError, SamplingLimits, SamplingParams

# OpenAI fields this server does not implement: (is it asked for?, why not); a clear 400, never ignored
UNSUPPORTED = {
    "logprobs": (lambda v: v is not None, "CALM has no likelihoods to report; leave logprobs out"),
    "echo": (bool, "echo is not supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of is not supported; use n"),
    "suffix": (lambda v: v is not None, "suffix (insertion) is not supported"),
    "logit_bias": (bool, "logit_bias is not supported"),
    "presence_penalty": (lambda v: v not in (None, 0), "presence_penalty is not supported"),
    "frequency_penalty": (lambda v: v not in (None, 0), "frequency_penalty is not supported"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``; CALM's own sampling parameters are the last three fields."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | list[str]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    candidates: int = Field(200, description="CALM, temperature < 1: head samples per step")
    sampler: Literal["batch", "exact"] = "batch"
    max_draws: int = 2000


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``serve.*``; docs/SERVING.md "Limits and failure behaviour"):
    the body and prompts here, the sampling settings in ``sampling``."""

    max_body_bytes: int = 1 << 20
    max_json_depth: int = 8
    max_prompts: int = 16
    max_prompt_tokens: int = 4096
    sampling: SamplingLimits = SamplingLimits()

    @classmethod
    def of(cls, s) -> "Limits":
        """The limits of a ``ServeConfig``."""
        names = [f.name for f in dataclasses.fields(SamplingLimits) if f.name != "max_candidates"]
        return cls(s.max_body_bytes, s.max_json_depth, s.max_prompts, s.max_prompt_tokens,
                   SamplingLimits(**{n: getattr(s, n) for n in names}))


async def read_body(content_length: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes: from the
    declared Content-Length before anything is read, else while counting the chunks as they arrive
    (a chunked body, or one longer than it said)."""
    if content_length is not None:
        if not content_length.strip().isdigit():
            raise ApiError(400, f"Content-Length is not a number: {content_length[:40]!r}", code="invalid_header")
        if int(content_length) > limit:
            raise _too_large(int(content_length), limit)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, limit, at_least=True)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(size: int, limit: int, at_least: bool = False) -> ApiError:
    return ApiError(413, f"the request body has {'more than ' if at_least else ''}{size:,} bytes; "
                         f"this server takes at most {limit:,}", code="body_too_large")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d + 1)
            todo += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_request(body: bytes, limits: Limits) -> CompletionRequest:
    """Bytes of the body -> a schema-valid request (400 for invalid UTF-8, JSON, nesting or fields;
    413 when the body is over the limit)."""
    if len(body) > limits.max_body_bytes:
        raise _too_large(len(body), limits.max_body_bytes)
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8", code="invalid_encoding") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {limits.max_json_depth} levels",
                       code="invalid_json") from None
    except ValueError as e:  # NaN / Infinity, or an integer of more digits than Python converts
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    if _depth(data) > limits.max_json_depth:
        raise ApiError(400, f"the request body nests deeper than {limits.max_json_depth} levels", code="invalid_json")
    for name, (asked, why) in UNSUPPORTED.items():
        if name in data and asked(data.pop(name)):
            raise ApiError(400, why, param=name, code="unsupported_parameter")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                       code="invalid_value") from None


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a served model."""

    name: str
    kind: str  # "calm" | "baseline"
    context_tokens: int
    step_tokens: int

    def room(self, prompt_tokens: int) -> int:
        return self.context_tokens - self.step_tokens - prompt_tokens


def gen_requests(r: CompletionRequest, m: ModelInfo, encode, limits: Limits) -> list[GenRequest]:
    """One GenRequest per prompt, checked against the model and the limits before any work:
    the sampling settings (``SamplingParams.check``), the prompts, the context."""
    prompts = [r.prompt] if isinstance(r.prompt, str) else r.prompt
    if not prompts or any(not p for p in prompts):
        raise ApiError(400, "prompt must be a non-empty string or a list of non-empty strings", "prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"prompt is a list of {len(prompts)} strings; this server takes at most "
                            f"{limits.max_prompts} per request", "prompt")
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    params = SamplingParams(r.max_tokens, r.temperature, r.top_p, r.n, r.seed, stop, r.candidates, r.sampler,
                            r.max_draws)
    try:
        params.check(m.kind, limits.sampling, prompts=len(prompts))
    except SamplingError as e:
        raise ApiError(400, str(e), e.param) from None
    out = []
    for p in prompts:
        ids = encode(p)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens}", "prompt", "prompt_too_long")
        if r.max_tokens > m.room(len(ids)):
            raise ApiError(400, f"{m.name}'s context is {m.context_tokens} tokens; the prompt ({len(ids)} tokens) "
                                f"and max_tokens ({r.max_tokens}) need {len(ids) + r.max_tokens + m.step_tokens} "
                                "with the document boundary; shorten the prompt or lower max_tokens",
                           "max_tokens", "context_length_exceeded")
        out.append(GenRequest(ids, params))
    return out


# ----------------------------------------------------------------------------- responses


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion(rid: str, model: str, texts: list[tuple[str, str | None]], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(texts)],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chunk_event(rid: str, model: str, index: int, text: str, finish: str | None) -> bytes:
    return sse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]})
