"""Prometheus metrics for the gateway (one registry per app, so tests can build several)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The status label of a request whose client disconnected before its response started (nginx's 499,
# "client closed request"): counted apart, never as a 500 nobody received.
CLIENT_CLOSED = 499


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cdface_http_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("cdface_http_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.gallery_faces = Gauge("cdface_gallery_faces", "Faces in the search index", registry=self.registry)
        self.breaker_open = Gauge("cdface_triton_breaker_open", "1 while the Triton circuit breaker is open",
                                  registry=self.registry)
        self.in_flight = Gauge("cdface_http_requests_in_flight", "Requests being served now (probes not counted); "
                               "set by serving.middleware.RequestLimits", registry=self.registry)

    def render(self, faces_indexed: int, breaker_open: bool) -> tuple[bytes, str]:
        """(body, content type) of the metrics, the gauges set to these values first."""
        self.gallery_faces.set(faces_indexed)
        self.breaker_open.set(1 if breaker_open else 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app):
        metrics = self

        async def asgi(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            started = time.perf_counter()
            # 500: what an exception that escapes every handler becomes.
            status: dict[str, int | bool] = {"code": 500, "started": False}

            async def recording_send(message):
                if message["type"] == "http.response.start" and not status["started"]:
                    status["code"], status["started"] = message["status"], True
                await send(message)

            async def watching_receive():
                message = await receive()
                # Gone before its answer started: whatever is sent now reaches no one (uvicorn drops it).
                if message["type"] == "http.disconnect" and not status["started"]:
                    status["code"], status["started"] = CLIENT_CLOSED, True
                return message

            try:
                await app(scope, watching_receive, recording_send)
            finally:
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                metrics.requests.labels(scope.get("method", ""), path, str(status["code"])).inc()
                metrics.latency.labels(path).observe(time.perf_counter() - started)

        return asgi
