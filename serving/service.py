"""``fedrec serve``: one platform's recommendation and search service over HTTP.

Owns: the ASGI app (:func:`create_app`; FastAPI on Starlette, served by uvicorn: maintained,
already installed with Flower, typed query and body validation, JSON errors), its Prometheus
metrics (``prometheus_client``, a registry per app) and hot reload (:class:`Reloader`).

Endpoints: ``GET /recommend?user=&k=``, ``POST /recommend`` (a history given inline),
``GET /search?q=&user=&k=``, ``GET /health``, ``GET /metrics``. Errors are JSON
``{"error": {"status", "message"}}`` with a 4xx code, never a traceback.

Hot reload: a thread polls the files a load reads (:func:`~fedrec.serving.platform.inputs_stamp`);
when one changes it loads a new :class:`~fedrec.serving.platform.Platform` beside the one
serving, then swaps one reference. A request holds the platform it started with, so no
request is dropped or sees half of each; a load that fails leaves the old one serving.

Privacy: serving runs on the platform with the platform's own data; nothing leaves it. The
request log has method, path (never the query string), status and time: no user ids, queries
or histories.

Must not: import ``fedrec.client``, ``deploy``, ``audit``, ``simulations`` or ``cli``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedrec.serving.platform import BadRequest, Platform, UnknownUser
from fedrec.serving.recommend import RecommendError

log = logging.getLogger("fedrec.serve")

MAX_K = 1000
MAX_HISTORY = 10_000


class InlineHistory(BaseModel):
    """``POST /recommend``'s body: a user the platform has not stored."""

    model_config = ConfigDict(extra="forbid")
    history: list[str] = Field(
        ..., max_length=MAX_HISTORY, description="Item ids the user interacted with, oldest first."
    )
    k: int = Field(10, ge=1, le=MAX_K, description="How many items.")
    channel: str | None = Field(None, description="Optional: the channel meant (checked).")


class Reloader:
    """Holds the platform being served; :meth:`check` swaps in a newer one when its inputs
    changed. ``load`` builds a platform (reusing the warm encoder)."""

    def __init__(self, platform: Platform, load: Callable[[Platform], Platform]) -> None:
        self.platform = platform
        self._load = load
        self._failed: tuple[Any, ...] | None = None  # inputs whose load failed: not retried
        self.last_error: str | None = None
        self.reloads = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Reload if the inputs changed; True if a new platform now serves."""
        from fedrec.serving.platform import inputs_stamp

        current = self.platform
        stamp = inputs_stamp(current.run_dir, current.channel, current.data_dir)
        if stamp == current.stamp or stamp == self._failed:
            return False
        try:
            fresh = self._load(current)
        except Exception as exc:  # keep serving the old model, whatever went wrong
            self._failed, self.last_error = stamp, f"{type(exc).__name__}: {exc}"
            self.failures += 1
            log.error("reload failed, still serving %s: %s", current.version.checkpoint, exc)
            return False
        self.platform, self._failed, self.last_error = fresh, None, None
        self.reloads += 1
        log.info(
            "now serving %s (%d items), was %s",
            fresh.version.checkpoint,
            fresh.version.items,
            current.version.checkpoint,
        )
        return True

    def start(self, every: float) -> None:
        def loop() -> None:
            while not self._stop.wait(every):
                self.check()

        self._thread = threading.Thread(target=loop, name="fedrec-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def create_app(reloader: Reloader, reload_every: float | None = None) -> Any:
    """The ASGI app serving ``reloader.platform``; with ``reload_every`` (seconds) the
    reloader polls while the app runs."""
    from contextlib import asynccontextmanager

    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )

    registry = CollectorRegistry()
    requests = Counter(
        "fedrec_requests", "Requests served", ["endpoint", "status"], registry=registry
    )
    latency = Histogram(
        "fedrec_request_seconds",
        "Time to answer a request",
        ["endpoint"],
        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        registry=registry,
    )
    model_round = Gauge("fedrec_model_round", "Round of the checkpoint served", registry=registry)
    model_info = Gauge(
        "fedrec_model_info",
        "The model served (1 for the current one)",
        ["channel", "checkpoint"],
        registry=registry,
    )
    items = Gauge("fedrec_catalogue_items", "Items in the catalogue served", registry=registry)
    reloads = Gauge("fedrec_reloads", "Hot reloads done since start", registry=registry)
    failures = Gauge(
        "fedrec_reload_failures", "Hot reloads that failed since start", registry=registry
    )
    endpoints = {"/recommend", "/search", "/health", "/metrics"}

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        if reload_every:
            reloader.start(reload_every)
        yield
        reloader.stop()

    app = FastAPI(
        title="fedrec",
        summary="A platform's recommendations and search from a federated run",
        lifespan=lifespan,
    )

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"status": status, "message": message}}, status)

    class Measure:
        """Counts, times and logs every request (a plain ASGI middleware: Starlette's
        ``BaseHTTPMiddleware`` costs a task and a stream per request)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            t, status = time.perf_counter(), 500  # 500 unless a response starts

            async def sending(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, sending)
            finally:
                took = time.perf_counter() - t
                path = scope["path"]
                endpoint = path if path in endpoints else "other"
                requests.labels(endpoint, str(status)).inc()
                latency.labels(endpoint).observe(took)
                # never the query string: it holds user ids and queries
                log.info("%s %s %d %.1fms", scope["method"], path, status, 1000 * took)

    app.add_middleware(Measure)

    @app.exception_handler(UnknownUser)
    async def unknown_user(_: Request, exc: UnknownUser) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(RecommendError)
    async def bad_request(_: Request, exc: RecommendError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body"))
            problems.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        return error(422, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return error(500, f"internal error ({type(exc).__name__}); see the service's log")

    class HTTPErrorNotFound(StarletteHTTPException):
        def __init__(self, message: str) -> None:
            super().__init__(404, message)

    def served(channel: str | None) -> Platform:
        platform = reloader.platform  # one reference for the whole request
        if channel is not None and channel != platform.channel:
            raise HTTPErrorNotFound(
                f"channel {channel!r} is not served here; this service serves "
                f"{platform.channel!r}. Fix: send it to that platform's service."
            )
        return platform

    def answer(platform: Platform, ranked: list[tuple[int, float]], **extra: Any) -> Any:
        return {
            "channel": platform.channel,
            "model": {"round": platform.version.round, "checkpoint": platform.version.checkpoint},
            **extra,
            "items": platform.items(ranked),
        }

    k_query = Query(10, ge=1, le=MAX_K, description="How many items.")
    channel_query = Query(None, description="Optional: the channel meant (checked).")

    @app.get("/recommend")
    def recommend(
        user: str = Query(..., min_length=1, description="A user id of this platform."),
        k: int = k_query,
        channel: str | None = channel_query,
    ) -> Any:
        platform = served(channel)
        history = platform.history(user)
        return answer(platform, platform.recommend(history, k), history=len(history))

    @app.post("/recommend")
    def recommend_inline(body: InlineHistory) -> Any:
        platform = served(body.channel)
        rows = platform.rows_of(body.history)
        return answer(platform, platform.recommend(rows, body.k), history=len(rows))

    @app.get("/search")
    def search(
        q: str = Query(..., max_length=1000, description="What to search for."),
        user: str | None = Query(None, min_length=1),
        k: int = k_query,
        channel: str | None = channel_query,
    ) -> Any:
        platform = served(channel)
        if not q.strip():
            raise BadRequest("the query q is empty. Fix: give words to search for.")
        history = platform.history(user) if user is not None else np.zeros(0, np.int64)
        return answer(platform, platform.search(q, history, k), history=len(history))

    @app.get("/health")
    def health() -> Any:
        platform = reloader.platform
        return {
            "status": "ok",
            "channel": platform.channel,
            "model": platform.version.as_dict(),
            "incomplete_run": platform.incomplete,
            "index": platform.recommender.index.kind,
            "reloads": reloader.reloads,
            "last_reload_error": reloader.last_error,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        platform = reloader.platform
        model_round.set(platform.version.round)
        model_info.clear()
        model_info.labels(platform.channel, platform.version.checkpoint).set(1)
        items.set(platform.version.items)
        reloads.set(reloader.reloads)
        failures.set(reloader.failures)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
