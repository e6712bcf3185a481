"""The ingress of the Serve application: a FastAPI app (through ``serve.ingress``) that checks the
API key, reads the body within its limits, validates, tokenises and streams from the model
deployments (``pipelines.serve.app.ModelServer``). Every answer, errors included, is in OpenAI's
shape: routing errors (404 / 405 / 422) and unexpected failures go through the handlers below.
"""

import asyncio
import hmac
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from calm_core.config import ServeConfig, config_from_yaml
from calm_core.errors import ArtifactError
from calm_core.tokenizer import CalmTokenizer
from pipelines.serve import api
from pipelines.serve import streams as S
from pipelines.storage import RunDir

app = FastAPI(title="CALM on Ray", description="OpenAI-compatible completions from CALM and its baseline",
              docs_url=None, redoc_url=None, openapi_url=None)  # served by Api only with serve.docs=true
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 422: "invalid_value"}


@app.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):
    """Routing errors (unknown path, wrong method) in OpenAI's error shape."""
    why = {404: f"no route {request.url.path}; this server answers POST /v1/completions, GET /v1/models, "
                "GET /health", 405: f"{request.method} is not allowed on {request.url.path}"}
    err = api.ApiError(e.status_code, why.get(e.status_code, str(e.detail)), code=HTTP_CODES.get(e.status_code))
    return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return JSONResponse(api.ApiError(422, str(e.errors()[:1]), code="invalid_value").body(), status_code=422)


@app.exception_handler(api.ApiError)
async def _api_error(request: Request, e: api.ApiError):
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(Exception)
async def _server_error(request: Request, e: Exception):
    """Whatever else went wrong: a 500 in OpenAI's shape (the traceback stays in the replica's log)."""
    err = api.ApiError(500, f"internal error ({type(e).__name__}); the server logged it", code="internal_error",
                       kind="server_error")
    return JSONResponse(err.body(), status_code=500)


def model_info(run: RunDir, kind: str) -> tuple[api.ModelInfo, str]:
    """The served model's context (from its config, no weights) and its tokenizer.json text."""
    folder = run.local_artifact(kind)
    cfg = config_from_yaml((folder / "config.yaml").read_text(), str(folder / "config.yaml"))
    L, K = cfg.model.block_chunks, cfg.ae.K
    return api.ModelInfo(kind, kind, L * K, K if kind == "calm" else 1), (folder / "tokenizer.json").read_text()


def api_key(s: ServeConfig) -> str | None:
    """The key requests must present: from ``serve.api_key_file`` (a mounted Secret, say) when set,
    else from the environment variable ``serve.api_key_env`` where the replica runs; None: no key."""
    if s.api_key_file:
        path = Path(s.api_key_file).expanduser()
        if not path.is_file():
            raise ArtifactError(f"serve.api_key_file '{path}' does not exist or is not a file; write the key "
                                "there (or mount the Secret) or leave serve.api_key_file empty")
        key = path.read_text().strip()
        if not key:
            raise ArtifactError(f"serve.api_key_file '{path}' is empty: it must hold the API key")
        return key
    return os.environ.get(s.api_key_env) or None


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
        self.limits = api.Limits.of(s)
        self.key = api_key(s)
        self.docs = s.docs

    def _authorised(self, request: Request) -> bool:
        """No key set, or the request's bearer token equals it (compared in constant time)."""
        if not self.key:
            return True
        sent = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(sent, f"Bearer {self.key}".encode())

    def _auth(self, request: Request) -> None:
        if not self._authorised(request):
            raise api.ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key", kind="authentication_error")

    @app.get("/v1/models")
    async def models_list(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": m.name, "object": "model", "owned_by": "calm-on-ray",
                                            "context_tokens": m.context_tokens} for m in self.info.values()]}

    @app.get("/health")
    async def health(self, request: Request):
        """Cheap: each model's replica state (no model step). 503 naming the models that do not
        answer in time or report a dead or stuck step loop. The details need the key when one is set."""
        async def one(handle) -> dict:
            try:
                return await asyncio.wait_for(handle.status.remote(), timeout=5.0)
            except Exception as e:  # noqa: BLE001 - no replica, a dead one, or no answer in time
                return {"ok": False, "problem": f"no answer ({type(e).__name__})"}

        states = dict(zip(self.models, await asyncio.gather(*(one(h) for h in self.models.values()))))
        bad = [kind for kind, st in states.items() if not st["ok"]]
        body: dict[str, Any] = {"status": "ok" if not bad else "unavailable"}
        if bad:
            body["error"] = api.ApiError(503, f"model(s) {', '.join(bad)} not healthy", code="model_unavailable",
                                         kind="server_error").body()["error"]
        if self._authorised(request):
            body["models"] = states
        return JSONResponse(body, status_code=503 if bad else 200)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self):
        if not self.docs:
            raise HTTPException(404)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger(self):
        if not self.docs:
            raise HTTPException(404)
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="openapi.json", title=app.title)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._auth(request)
        body = await api.read_body(request.headers.get("content-length"), request.stream(), self.limits.max_body_bytes)
        req = api.parse_request(body, self.limits)
        if req.model not in self.info:
            raise api.ApiError(404, f"model '{req.model}' is not served here (served: {', '.join(self.info)})",
                               "model", "model_not_found")
        gens = api.gen_requests(req, self.info[req.model], self.tok.encode, self.limits)
        streams = [await S.first(self.models[req.model], g) for g in gens]
        rid, prompt_tokens = api.new_id(), sum(len(g.prompt_ids) for g in gens)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(S.events(rid, req.model, streams, req.n, prompt_tokens, usage),
                                     media_type="text/event-stream")
        return await S.collect(rid, req.model, streams, req.n, prompt_tokens)
