"""The ingress side of a completion: start the model streams, turn them into server-sent events or
one JSON response (OpenAI's shapes, ``pipelines.serve.api``). A model stream that ends with an
error message (``{"error": {status, message, code, type}}``, ``pipelines.serve.app.error_message``)
becomes that HTTP status when nothing has been sent yet, else a last event ``{"error": ...}``."""

from typing import Any, AsyncIterator

from pipelines.serve import api


async def first(handle, g) -> tuple[list, Any]:
    """Start a model stream and wait for its first message, so that overload and model errors become
    an HTTP status before any byte is sent: (first message, the rest of the stream). A message is a
    list of model steps (several when the model ran ahead of the transport), a step a list of deltas."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    gen = handle.options(stream=True).stream.remote(g)
    try:
        first = await gen.__anext__()
    except BackPressureError:
        raise api.ApiError(503, "the server is at capacity; retry shortly", code="overloaded",
                           kind="server_error") from None
    except (ActorDiedError, ActorUnavailableError):
        raise api.ApiError(503, "the model replica went away; retry shortly", code="model_unavailable",
                           kind="server_error") from None
    except StopAsyncIteration:
        first = []
    if isinstance(first, dict):
        raise failure(first)
    return first, gen


def failure(msg: dict) -> api.ApiError:
    e = msg["error"]
    return api.ApiError(e["status"], e["message"], code=e["code"], kind=e["type"])


async def messages(stream) -> AsyncIterator[list[list[dict]]]:
    first, gen = stream
    yield first
    async for msg in gen:
        yield msg


async def steps(stream) -> AsyncIterator[list[dict]]:
    async for msg in messages(stream):
        if isinstance(msg, dict):
            raise failure(msg)
        for step in msg:
            yield step


async def events(rid: str, model: str, streams: list, n: int, prompt_tokens: int, with_usage: bool):
    """Server-sent events: one per completion per model step with new text, then the usage, then [DONE].
    The events of one message go out as one write (fewer hops through the proxy under load)."""
    tokens = 0
    for p, stream in enumerate(streams):
        async for msg in messages(stream):
            if isinstance(msg, dict):  # the model could not finish: say so in OpenAI's error shape, and end
                yield api.sse(failure(msg).body())
                return
            out = []
            for step in msg:
                for d in step:
                    if d["text"] or d["finish"]:
                        out.append(api.chunk_event(rid, model, p * n + d["index"], d["text"], d["finish"]))
                    if d["finish"]:
                        tokens += d["tokens"]
            if out:
                yield b"".join(out)
    if with_usage:
        yield api.sse({"id": rid, "object": "text_completion", "model": model, "choices": [],
                       "usage": api.usage(prompt_tokens, tokens)})
    yield api.sse("[DONE]")


async def collect(rid: str, model: str, streams: list, n: int, prompt_tokens: int) -> dict:
    texts: list[tuple[str, str | None]] = []
    tokens = 0
    for stream in streams:
        parts, finish = [[] for _ in range(n)], [None] * n
        async for step in steps(stream):
            for d in step:
                parts[d["index"]].append(d["text"])
                if d["finish"]:
                    finish[d["index"]], tokens = d["finish"], tokens + d["tokens"]
        texts += [("".join(p), f) for p, f in zip(parts, finish)]
    return api.completion(rid, model, texts, prompt_tokens, tokens)
