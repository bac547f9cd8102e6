"""Request ids: one per request, taken from the client's ``X-Request-ID`` when it is well formed, else made.

The id is returned in the ``X-Request-ID`` header of every response, error responses of the other
middleware included (413, 408, 429, 503 ...: ``RequestIds`` is installed outermost), written into each
log record made while the request is served (``cdface.serving.logs``) and into the audit rows of its
writes and searches (``actor``), so one id ties a client's report, the logs and the audit log together.

A client's id is used only when it is 1-128 characters of ``[A-Za-z0-9._:-]``: anything else (too long,
spaces, control characters) could forge or split log lines, so it is replaced by a fresh uuid4 hex.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from typing import Any

from cdface.serving.store import Actor, ApiKey

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode("latin-1")
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("cdface_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served (None outside a request: start-up, the command line)."""
    return _current.get()


def request_id_from(value: bytes | str | None) -> str:
    """The client's id when it is well formed, else a new one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value is not None and _WELL_FORMED.fullmatch(value):
        return value
    return uuid.uuid4().hex


def actor(key: ApiKey | None) -> Actor:
    """Who makes the current request (``Actor.of``), with the request's id for its audit rows."""
    return Actor.of(key, current_request_id())


class RequestIds:
    """ASGI middleware: sets the request's id for its duration and puts it on the response's headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = [value for name, value in scope.get("headers") or [] if name == _HEADER_KEY]
        # Two X-Request-ID headers: which one the client meant is unknown, so neither is trusted.
        request_id = request_id_from(given[0] if len(given) == 1 else None)
        header = (_HEADER_KEY, request_id.encode("latin-1"))

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers") or [] if h[0].lower() != _HEADER_KEY]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        token = _current.set(request_id)
        await self.app(scope, receive, send_with_id)
        # Reset after a normal return only. An exception goes on to Starlette's ServerErrorMiddleware, which
        # is outside every middleware: its handler (cdface.serving.http_errors) logs the error and answers
        # 500 with the id still set. The context is the request's own (uvicorn runs each request as a task
        # of its own), so the id does not outlive the request.
        _current.reset(token)
