"""The FastAPI gateway: ``create_app(settings)`` builds it from routers (``cdface.serving.routers``).

Routes stay thin; the work is in ``cdface.serving.usecases``; errors become HTTP answers in
``cdface.serving.http_errors``. Middleware, outermost first: request ids (``cdface.serving.request_ids``),
metrics (``cdface.serving.metrics``), per-request limits and the body limit (``cdface.serving.middleware``),
CORS when configured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from cdface.serving.http_errors import install_error_handlers
from cdface.serving.metrics import Metrics
from cdface.serving.middleware import BodyLimit, RequestLimits
from cdface.serving.openapi import openapi_builder
from cdface.serving.rate_limits import RateLimiter
from cdface.serving.request_ids import RequestIds
from cdface.serving.routers import identities, inference, operations, ui
from cdface.serving.service import FaceService
from cdface.serving.settings import Settings
from cdface.serving.usecases.recognition import decide

log = logging.getLogger("cdface.serving")

API_TITLE = "cdface face recognition API"


def create_app(settings: Settings | None = None, service: FaceService | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("cdface gateway settings: %s", json.dumps(settings.describe(), default=str))
        svc = service if service is not None else await run_in_threadpool(FaceService.create, settings)
        app.state.service = svc
        started = time.perf_counter()
        await run_in_threadpool(svc.start)
        decision = decide(settings, svc.active.manifest, None)
        log.info("serving model %s (Triton %s), %d faces indexed in %.2f s; threshold %.3f (%s)",
                 svc.active.key, svc.active.ref, svc.active.gallery.faces_indexed,
                 time.perf_counter() - started, decision.threshold, decision.source)
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(title=API_TITLE, version="1", lifespan=lifespan,
                  description="Embeddings, 1:1 verification, 1:N identification and an identity gallery, "
                              "in front of Triton Inference Server. Errors are JSON: "
                              "`{\"error\": {\"code\": ..., \"message\": ...}}`.")
    app.state.metrics = Metrics()
    app.state.rate_limiter = RateLimiter(settings)
    install_error_handlers(app)
    for router in (inference.router, identities.router, operations.router, ui.router):
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    # Inside the metrics middleware, so that requests it refuses, cuts off or finds abandoned are counted.
    app.add_middleware(RequestLimits, deadline_s=settings.request_deadline_s,
                       max_concurrent=settings.max_concurrent_requests, in_flight=app.state.metrics.in_flight)
    app.add_middleware(app.state.metrics.middleware)
    # Outermost: every response carries X-Request-ID, the other middleware's refusals included.
    app.add_middleware(RequestIds)
    app.openapi = openapi_builder(app)  # type: ignore[method-assign]
    return app
