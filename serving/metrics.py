"""Prometheus metrics for the gateway (one registry per app, so tests can build several).

Besides requests by route and status, ``cdface_stage_seconds{stage=...}`` splits a request's time into
the stages of its work (``STAGES``): the use cases mark a stage with ``stage(name)`` (or ``timed``), the
time is added up per request (a request with three images decodes three times: one observation, their
sum) and observed when the request ends, so each histogram's count is the number of requests that went
through that stage. Outside a request (the command line, start-up) ``stage`` measures nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from cdface.serving.usecases.operations import Gauges

# The status label of a request whose client disconnected before its response started (nginx's 499,
# "client closed request"): counted apart, never as a 500 nobody received.
CLIENT_CLOSED = 499

STAGES = {
    "decode": "base64 and image decoding (header checks included)",
    "detect": "YuNet on the photo (modes detect and detect_all)",
    "align": "the similarity warp of each face and its sharpness (what face extraction spends outside detection "
             "and the crop gate)",
    "quality": "the crop gate: YuNet on each aligned crop, upright and turned over",
    "triton": "the embedding calls to Triton, retries and waiting included",
    "search": "the FAISS search of identify",
    "store": "gallery database reads and writes on the request's path (writes with their index update, audit rows)",
}
# Fine at the low end: a FAISS search or a SQLite read takes well under a millisecond.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# The current request's time per stage. A dict shared by reference: anyio copies the context into worker
# threads, so a stage timed in a thread adds to the request's own dict.
_spent: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("cdface_stage_seconds",
                                                                                 default=None)
T = TypeVar("T")


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the time spent in the block to the current request's stage ``name`` (one of ``STAGES``)."""
    spent = _spent.get()
    if spent is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - started


def timed(name: str, function: Callable[..., T]) -> Callable[..., T]:
    """``function`` timed as stage ``name`` where it runs (e.g. in the worker thread of ``to_thread.run_sync``,
    so that waiting for a free thread is not counted)."""

    def run(*args: Any, **kwargs: Any) -> T:
        with stage(name):
            return function(*args, **kwargs)

    return run


def stage_seconds(*names: str) -> float:
    """The current request's time so far in the stages ``names`` (0 outside a request)."""
    spent = _spent.get() or {}
    return sum(spent.get(name, 0.0) for name in names)


def add_stage_seconds(name: str, seconds: float) -> None:
    """Add ``seconds`` to the current request's stage ``name`` (for a stage measured as a difference)."""
    spent = _spent.get()
    if spent is not None:
        spent[name] = spent.get(name, 0.0) + max(0.0, seconds)


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
        self.stage_seconds = Histogram("cdface_stage_seconds", "Time one request spent in a stage of its work, "
                                       "summed over its images and faces: " +
                                       "; ".join(f"{name}: {what}" for name, what in STAGES.items()),
                                       ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.served_model = Gauge("cdface_served_model", "1 for the Triton model:version answering requests now",
                                  ["model"], registry=self.registry)
        # Shadow mode (cdface.serving.shadow): this gateway's counts since it started; the store holds all gateways'.
        self.shadow_compared = Gauge("cdface_shadow_compared", "Faces answered by both the active and the candidate "
                                     "model (shadow mode)", ["active", "candidate"], registry=self.registry)
        self.shadow_agreed = Gauge("cdface_shadow_agreed", "Of the faces compared, those on which the candidate "
                                   "agreed with the active model: on the match decision, or on the top-1 identity",
                                   ["active", "candidate", "on"], registry=self.registry)
        self.shadow_failed = Gauge("cdface_shadow_failed", "Shadow answers the candidate could not make",
                                   ["active", "candidate"], registry=self.registry)
        for name in STAGES:  # every stage's series exists from the start, at count 0
            self.stage_seconds.labels(name)

    def render(self, gauges: Gauges) -> tuple[bytes, str]:
        """(body, content type) of the metrics, the gauges set to these values first."""
        self.gallery_faces.set(gauges.faces_indexed)
        self.breaker_open.set(1 if gauges.breaker_open else 0)
        self.served_model.clear()
        self.served_model.labels(gauges.active).set(1)
        for (active, candidate), counts in gauges.shadow.items():
            labels = {"active": str(active), "candidate": str(candidate)}
            self.shadow_compared.labels(**labels).set(counts.compared)
            self.shadow_failed.labels(**labels).set(counts.failed)
            self.shadow_agreed.labels(**labels, on="decision").set(counts.same_decision)
            self.shadow_agreed.labels(**labels, on="top1").set(counts.same_top1)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app: Any) -> Any:
        metrics = self

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            started = time.perf_counter()
            # 500: what an exception that escapes every handler becomes.
            status: dict[str, int | bool] = {"code": 500, "started": False}

            async def recording_send(message: Any) -> None:
                if message["type"] == "http.response.start" and not status["started"]:
                    status["code"], status["started"] = message["status"], True
                await send(message)

            async def watching_receive() -> Any:
                message = await receive()
                # Gone before its answer started: whatever is sent now reaches no one (uvicorn drops it).
                if message["type"] == "http.disconnect" and not status["started"]:
                    status["code"], status["started"] = CLIENT_CLOSED, True
                return message

            spent: dict[str, float] = {}
            token = _spent.set(spent)
            try:
                await app(scope, watching_receive, recording_send)
            finally:
                _spent.reset(token)
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                metrics.requests.labels(scope.get("method", ""), path, str(status["code"])).inc()
                metrics.latency.labels(path).observe(time.perf_counter() - started)
                for name, seconds in list(spent.items()):
                    metrics.stage_seconds.labels(name).observe(seconds)

        return asgi
