"""ASGI middleware of the gateway: the request-body size limit, and per-request limits (concurrency,
deadline, clients that go away). The metrics middleware is in ``metrics``; the bounds on reading a
request's head are uvicorn's (``cdface.serving.connections``)."""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio

from cdface.serving import deadline
from cdface.serving.errors import InvalidRequest, ServingError
from cdface.serving.http_errors import response_for

log = logging.getLogger("cdface.serving")


def _too_large(limit: int) -> InvalidRequest:
    return InvalidRequest(f"the request body is over the {limit}-byte limit", code="payload_too_large")


class BodyLimit:
    """Refuse bodies over ``limit`` bytes: by Content-Length at once, and by counting when it is absent."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                response = response_for(_too_large(self.limit), {"Connection": "close"})
                return await response(scope, receive, send)
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _too_large(self.limit)
            return message

        return await self.app(scope, counted, send)


# Paths the concurrency bound does not count: the probes of Kubernetes and Prometheus must still answer
# when the gateway is saturated, to tell "busy" (503 overloaded on the API) from "dead".
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestLimits:
    """Per request: a bound on requests served at once, one deadline end to end, and a client that goes away.

    - Over ``max_concurrent`` requests in flight (``PROBE_PATHS`` not counted): ``503 overloaded`` +
      ``Retry-After`` at once; nothing queues.
    - ``deadline_s`` from the moment the headers arrived (``cdface.serving.deadline`` carries it to the
      Triton client, which stops its retries in time): if it passes before a response has started, the
      request is cancelled and answered ``408 request_timeout`` while its body was still arriving (the
      client is slow), else ``504 deadline_exceeded`` (we are). Work already in a worker thread is
      finished before the answer, not abandoned: a write is whole or absent, but a 504 does not say
      which (as with any timeout, the client reads the resource to find out).
    - A client that disconnects before its response: whatever the request then raises (the body read
      fails) is that disconnect, not a fault of ours: no traceback, no 500; the metrics count it as
      status 499 (``cdface.serving.metrics``).
    """

    def __init__(self, app: Any, *, deadline_s: float, max_concurrent: int, in_flight: Any) -> None:
        self.app, self.deadline_s, self.max_concurrent = app, deadline_s, max_concurrent
        self.in_flight_gauge = in_flight  # a prometheus Gauge: requests being served now
        self.in_flight = 0  # one event loop per process: no lock needed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBE_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_concurrent:
            busy = ServingError(f"the gateway is serving {self.max_concurrent} requests, its limit; retry shortly",
                                code="overloaded")
            busy.retry_after = 1.0
            return await response_for(busy)(scope, receive, send)
        self.in_flight += 1
        self.in_flight_gauge.inc()
        token = deadline.begin(self.deadline_s)
        try:
            await self._serve(scope, receive, send)
        finally:
            deadline.end(token)
            self.in_flight -= 1
            self.in_flight_gauge.dec()

    async def _serve(self, scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        state = {"body_done": headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers,
                 "client_gone": False, "started": False}
        cancel = anyio.CancelScope(deadline=anyio.current_time() + self.deadline_s)

        async def watched_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["body_done"] = True
            elif message["type"] == "http.disconnect":
                state["client_gone"] = True
            return message

        async def watched_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                cancel.deadline = math.inf  # a response under way is not cut off half-sent
            await send(message)

        try:
            with cancel:
                await self.app(scope, watched_receive, watched_send)
        except Exception:
            if not state["client_gone"]:
                raise
            log.info("client went away during %s %s", scope.get("method"), scope.get("path"))
            return
        if cancel.cancelled_caught and not state["started"] and not state["client_gone"]:
            if state["body_done"]:
                late = ServingError(f"the request was not served within its {self.deadline_s:g} s deadline",
                                    code="deadline_exceeded")
                return await response_for(late)(scope, receive, send)
            slow = InvalidRequest(f"the request body did not arrive within {self.deadline_s:g} s",
                                  code="request_timeout")
            return await response_for(slow, {"Connection": "close"})(scope, receive, send)
