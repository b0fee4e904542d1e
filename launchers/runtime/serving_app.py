"""The HTTP face of `derl serve`: a Starlette app (run by uvicorn) over a `serving.Service`.

    GET  /v1/users/{id}/vector[?domain=D]   POST /v1/retrieve   POST /v1/rank
    GET  /healthz                            GET  /metrics (Prometheus text)

The /v1 routes' work runs on one worker thread, one request at a time (the model, the index
and the lookups are fast next to the cores a second thread would contend for); the event loop
only reads, parses and answers. At most --max-in-flight /v1 requests are admitted at once:
one more is answered 503 with Retry-After at once, before its body is read, so overload
costs a queue of bounded length, never a crash or an unbounded wait. /healthz and /metrics
are always answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable, Dict, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from derl.launchers.runtime.serving import BadRequest, Metrics, Service

MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
ROUTES = ("/v1/retrieve", "/v1/rank", "/healthz", "/metrics")


def route_of(path: str) -> str:
    """A path's route template, the metrics' label (never the raw path: one series per route)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/users/") and path.endswith("/vector"):
        return "/v1/users/{id}/vector"
    return "other"


def _json(status: int, body: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


class Admission:
    """ASGI middleware: counts and times every request by route and status, and admits at most
    `limit` /v1 requests at once (the module docstring)."""

    def __init__(self, app, metrics: Metrics, limit: int):
        self.app, self.metrics, self.limit = app, metrics, limit
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        route = route_of(scope["path"])
        status = {"code": 500}

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        admitted = route.startswith("/v1/")
        try:
            if admitted and self.in_flight >= self.limit:
                await _json(503, {"error": f"overloaded: {self.in_flight} requests in flight (--max-in-flight "
                                           f"{self.limit}); retry after {RETRY_AFTER_S} s", "field": None},
                            {"Retry-After": str(RETRY_AFTER_S)})(scope, receive, sending)
                return
            self.in_flight += admitted
            self.metrics.in_flight.set(self.in_flight)
            try:
                await self.app(scope, receive, sending)
            finally:
                self.in_flight -= admitted
                self.metrics.in_flight.set(self.in_flight)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


async def _body(request: Request) -> Any:
    """The request's JSON body, at most MAX_BODY_BYTES; a 4xx naming `body` otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(413, "body", f"{declared} bytes, at most {MAX_BODY_BYTES}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(413, "body", f"more than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, "body", f"malformed JSON ({e})") from None


def build_app(service: Service) -> Starlette:
    """The app over `service`; its lifespan starts the service's refresh and closes it."""
    worker = ThreadPoolExecutor(1, thread_name_prefix="derl-serve")

    async def on_worker(fn: Callable[..., Dict[str, Any]], *args: Any) -> Response:
        try:
            return _json(200, await asyncio.get_running_loop().run_in_executor(worker, fn, *args))
        except BadRequest as e:
            return _json(e.status, e.body())
        except _unavailable() as e:  # the user store went away: the caller may retry
            return _json(503, {"error": f"user store unavailable: {e}", "field": None},
                         {"Retry-After": str(RETRY_AFTER_S)})

    async def vector(request: Request) -> Response:
        return await on_worker(service.user_vector, request.path_params["user_id"],
                               request.query_params.get("domain"))

    def posted(method: Callable[[Any], Dict[str, Any]]):
        async def handler(request: Request) -> Response:
            try:
                body = await _body(request)
            except BadRequest as e:
                return _json(e.status, e.body())
            return await on_worker(method, body)
        return handler

    async def healthz(request: Request) -> Response:
        return _json(200, service.health())

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            worker.shutdown(wait=True)
            service.close()

    app = Starlette(routes=[
        Route("/v1/users/{user_id}/vector", vector, methods=["GET"]),
        Route("/v1/retrieve", posted(service.retrieve), methods=["POST"]),
        Route("/v1/rank", posted(service.rank), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)
    app.add_middleware(Admission, metrics=service.metrics, limit=service.cfg.max_in_flight)
    return app


def _unavailable() -> tuple:
    """The errors of a user store that stopped answering."""
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
