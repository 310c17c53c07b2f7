"""The HTTP routes: KServe V1, the Open Inference Protocol (V2), /metrics and the web page.

- V1: ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}:predict`` and
  ``:explain`` with ``{"instances": [...], "parameters": {...}}``;
- V2: ``POST /v2/models/{name}/infer`` (explanations as extra outputs named like the explainable
  model's: ``explainrt.maps``, ``explainrt.resolved_targets``, ``explainrt.activations.<i>``,
  ``explainrt.gradients.<i>``), with the binary tensor extension both ways (``Inference-Header-Content-Length``,
  raw little-endian tensors, ``binary_data_size`` / ``binary_data`` / ``binary_data_output``) and maps as
  FP32, FP16, UINT8, PNG (8-bit grayscale) or OVERLAY (output parameter ``format``; OVERLAY: one colour PNG per
  image, its map drawn over it exactly as V1's ``"return": ["overlay"]``, captioned with ``"caption": true``; UINT8
  image input only), ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{name}``; targets as input
  ``explainrt.targets`` (class indices, [N] or [N, K]) or as V1's ``parameters.targets`` (class indices or
  ``explainrt.targets`` objects as JSON: then output ``explainrt.objective`` holds each instance's objective;
  a list of K per instance gives K maps each: ``explainrt.maps`` [N, K, H, W]);
- ``/metrics`` (Prometheus), ``/`` (the page) and ``/api/methods`` (the registered methods, each
  option with its type, default, allowed values and help: ``Option.describe``).

What each endpoint takes and answers is ``protocol``'s, shared with the KServe adapter; ``GET /v2/models/{name}``
declares the tensors as one target per instance has them, and in parameter ``k_target_shapes`` those that gain a K
axis with K targets per instance. Every error is JSON ``{"error": message, "type": class}`` with a 4xx status for
the client's mistakes (413 over a limit, 404 unknown model, 503 queue full) and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from explainrt.errors import (
    ClientGoneError,
    ExplainrtError,
    ExplanationCancelled,
    InvalidInputError,
    RequestTooLargeError,
    ServerBusyError,
    UnknownModelError,
    UnsupportedMediaTypeError,
)
from explainrt.explainer import Explainer
from explainrt.methods import METHODS
from explainrt.serve import codec, protocol
from explainrt.serve.metrics import ServerMetrics
from explainrt.serve.models import ServedModel
from explainrt.serve.protocol import ServeConfig
from explainrt.version import __version__

log = logging.getLogger(__name__)

_STATUS = ((UnsupportedMediaTypeError, 415), (RequestTooLargeError, 413), (UnknownModelError, 404),
           (ServerBusyError, 503), (ClientGoneError, 499), (ExplanationCancelled, 503), (InvalidInputError, 400))
JSON_TYPES = ("application/json", "text/json")
"""Content-Types a body may be sent as (also ``application/<anything>+json``, or none at all)."""


def create_app(explainers: dict[str, Explainer], config: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving ``explainers`` by name."""
    config = config or ServeConfig()
    metrics = ServerMetrics()
    models = {name: ServedModel(name, explainer, config.max_batch, config.max_wait, config.max_queue, metrics)
              for name, explainer in explainers.items()}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for model in models.values():
            model.batcher.start()
        yield
        for model in models.values():
            await model.batcher.stop()

    app = FastAPI(title="explainrt", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_middleware(_Metered, metrics=metrics)
    static = resources.files("explainrt.serve").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.exception_handler(ExplainrtError)
    async def explainrt_error(_: Request, error: ExplainrtError) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(error, kind)), 500)
        if status == 500:
            log.error("request failed: %s", error)
        elif status == 499:
            log.info("%s: its work was dropped", error)
        response = _error(status, str(error), type(error).__name__)
        if isinstance(error, ServerBusyError):
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), "HTTPError")

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error: {type(error).__name__}: {error}", "InternalError")

    def served(name: str) -> ServedModel:
        if name not in models:
            raise UnknownModelError(f"unknown model {name!r}; this server serves {', '.join(map(repr, models))}")
        return models[name]

    async def body_of(request: Request) -> Any:
        _check_json_content_type(request.headers.get("content-type"))
        return await codec.read_json(request.headers.get("content-length"), request.stream(), config.limits)

    # -- page and discovery ---------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static.joinpath("index.html")), media_type="text/html")

    @app.get("/api/methods")
    async def methods() -> dict[str, Any]:
        return {"methods": [{"name": m.name, "summary": m.summary, "options": [o.describe() for o in m.options]}
                            for m in METHODS.values()]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    # -- KServe V1 ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def v1_models() -> dict[str, Any]:
        return {"models": list(models)}

    @app.get("/v1/models/{name}:{verb}")
    async def v1_verb_needs_post(name: str, verb: str) -> JSONResponse:
        served(name)
        return _error(405, f"{verb!r} takes a POST with a JSON body, e.g. "
                           f'{{"instances": [{{"image": {{"b64": "..."}}}}]}}, not a GET', "MethodNotAllowed")

    @app.get("/v1/models/{name}")
    async def v1_model(name: str) -> dict[str, Any]:
        return {"name": served(name).name, "ready": True}

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> dict[str, Any]:
        model = served(name)
        return await protocol.v1_predict(model, await body_of(request), config.limits)

    @app.post("/v1/models/{name}:explain")
    async def v1_explain(name: str, request: Request) -> dict[str, Any]:
        model = served(name)
        return await protocol.v1_explain(model, await body_of(request), config.limits, _disconnected(request))

    # -- Open Inference Protocol (V2) -----------------------------------------------------------
    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        return {"name": "explainrt", "version": __version__, "extensions": ["explain"]}

    @app.get("/v2/health/live")
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready() -> dict[str, bool]:
        return {"ready": bool(models)}

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str) -> dict[str, Any]:
        return {"name": served(name).name, "ready": True}

    @app.get("/v2/models/{name}")
    async def v2_metadata(name: str) -> dict[str, Any]:
        return protocol.metadata(served(name))

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request) -> Any:
        model = served(name)
        if codec.HEADER_LENGTH not in request.headers:  # binary tensor bodies are octet streams
            _check_json_content_type(request.headers.get("content-type"))
        body, binary = await codec.read_v2(request.headers.get("content-length"),
                                           request.headers.get(codec.HEADER_LENGTH), request.stream(), config.limits)
        tensors = await run_in_threadpool(codec.decode_v2_inputs, body, config.limits, binary)
        answers = await protocol.v2_infer(model, tensors, protocol.request_parameters(body), body.get("outputs"),
                                          config.limits, _disconnected(request))
        encoded = await run_in_threadpool(lambda: [codec.v2_output(output.name, array, output.binary)
                                                    for output, array in answers])
        response = {"model_name": name, "model_version": "1", "id": body.get("id"),
                    "outputs": [header for header, _ in encoded]}
        if not any(output.binary for output, _ in answers):
            return response
        header = json.dumps(response, separators=(",", ":")).encode()
        return Response(header + b"".join(raw for _, raw in encoded), media_type=codec.BINARY_CONTENT_TYPE,
                        headers={codec.HEADER_LENGTH: str(len(header))})

    return app


class _Metered:
    """ASGI middleware: count and time every HTTP request by route template and status."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "unmatched")
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)


def _check_json_content_type(value: str | None) -> None:
    """Refuse a body declared as something other than JSON (a form, an image file, text) with 415."""
    if value is None:
        return
    media = value.split(";")[0].strip().lower()
    if media and media not in JSON_TYPES and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaTypeError(
            f"request body has Content-Type {media!r}; send JSON with Content-Type: application/json "
            "(curl: -H 'Content-Type: application/json')")


def _disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A coroutine function returning once ``request``'s client has disconnected (its body is already read)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status)
