"""ASGI middleware of the gateway: the request-body size limit (the metrics middleware is in ``metrics``)."""

from __future__ import annotations

from typing import Any

from cdface.serving.errors import InvalidRequest
from cdface.serving.http_errors import response_for


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
