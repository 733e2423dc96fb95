"""The FastAPI app around one replica's `ModelServer`: routes, API-key check, OpenAI-style errors, request metrics.

Every error a client can cause is a 4xx with OpenAI's error body (`{"error": {"message", "type", "param",
"code"}}`); an unexpected failure is a 500 with the same shape that names only a request id (the exception is
logged under it), and the replica keeps serving. No schema or docs routes are published.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from pipeline.metrics import record
from pipeline.serving.auth import check_api_key
from pipeline.serving.engine import EngineError
from pipeline.serving.model_server import ModelServer
from pipeline.serving.openai_format import ModelList
from pipeline.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, internal_error
from pipeline.serving.request_checks import CHAT, COMPLETIONS

log = logging.getLogger(__name__)
MAX_PROBLEMS = 5  # validation problems named in one error message


class CountRequests:
    """ASGI middleware counting answered requests by route template and status (`moeforge_serve_requests`).

    Plain ASGI rather than `BaseHTTPMiddleware`, which would buffer streams and hide client disconnects.
    """

    def __init__(self, app, model: str):
        self.app, self.model = app, model

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                record("moeforge_serve_requests", 1, model=self.model, route=route, status=message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class GuardRequests:
    """ASGI middleware that refuses before any body is parsed: first a missing or wrong API key (401, read from the
    headers alone, whatever the body's size), then a body over `max_bytes` (413, by Content-Length or by counting a
    chunked body).

    Plain ASGI: the body is read here, at most `max_bytes` of it, and handed on unchanged.
    """

    OPEN = frozenset({"/healthz"})  # probes need no key

    def __init__(self, app, max_bytes: int, api_key: str | None):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_headers(scope)
            body = await self._read_body(receive)
        except ApiError as e:
            return await error_response(e)(scope, receive, send)
        if body is None:  # the client went away before the whole body came
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, scope) -> None:
        """The API key (unless the route is open), then the declared Content-Length."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope.get("path") not in self.OPEN:
            check_api_key(self.api_key, headers.get("authorization"))
        try:
            declared = int(headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "Invalid Content-Length header.") from None
        if declared > self.max_bytes:
            raise self._too_large()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, counted as it arrives (a chunked body declares no length); None: the client went away."""
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                raise self._too_large()
        return bytes(body)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )


def _replay(body: bytes, receive):
    """An ASGI `receive` that gives the app the body already read, then whatever the client sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, when it comes

    return replay


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def invalid_request(e: RequestValidationError) -> ApiError:
    """A request that failed validation: a 400 naming its first few problems and, as `param`, the first field."""
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "not JSON")
        return ApiError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")
    # a list of 60,000 bad token ids is 60,000 errors (times the union's branches): name the first few only
    problems = []
    for err in errors[:MAX_PROBLEMS]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")[:200]
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"... {len(errors) - MAX_PROBLEMS} more")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    return ApiError(400, "Invalid request: " + "; ".join(problems), param=loc[0][:200] if loc else None)


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /healthz, /stats, OpenAI-style errors.

    The API key is checked once, by `GuardRequests`, for every route but /healthz.
    """
    # no /docs, /redoc or /openapi.json: a public endpoint does not publish its schema to anyone who asks
    app = FastAPI(
        title="moeforge",
        description="OpenAI-compatible API of a moeforge student",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    # outermost last: requests are counted (whatever their answer), then guarded before anything reads the body
    app.add_middleware(GuardRequests, max_bytes=server.settings.max_request_bytes, api_key=server.api_key)
    app.add_middleware(CountRequests, model=server.metric_model)
    add_error_handlers(app)
    add_routes(app, server)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's body: a client's as its 4xx, an unexpected one as a 5xx naming only a request id."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        return error_response(invalid_request(e))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return error_response(
            ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        )

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError):
        return error_response(
            internal_error(e, f"{request.method} {request.url.path}", 503, "The model is unavailable")
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return error_response(internal_error(e, f"{request.method} {request.url.path}", 500, "Internal error"))


def respond(result: BaseModel | AsyncIterator[str]) -> JSONResponse | StreamingResponse:
    """A whole response as JSON, a stream as Server-Sent Events."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(
        result, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def add_routes(app: FastAPI, server: ModelServer) -> None:
    @app.post(CHAT.route)
    async def chat_completions(body: ChatCompletionRequest):
        return respond(await server.answer(body))

    @app.post(COMPLETIONS.route)
    async def completions(body: CompletionRequest):
        return respond(await server.answer(body))

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[server.card()]).model_dump(mode="json")

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if not server.accepts(model):
            raise ApiError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return server.card().model_dump(mode="json")

    @app.get("/healthz")
    async def healthz():
        # open to anyone (probes carry no key), so it says ok or not and nothing else: no model, no load, no error
        if server.healthy():
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/stats")
    async def stats():
        return server.stats()
