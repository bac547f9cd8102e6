"""The deadline of the request being served: set once per request, read where the request waits.

``cdface.serving.middleware.RequestLimits`` starts it when a request's headers have arrived
(setting ``request_deadline_s``) and answers for the request when it passes; the Triton client
reads it so that its attempts and retries stop while there is still time to answer, instead of
running past it. A context variable carries it: every await, task and worker thread of the request
sees the same value, and no other request does.
"""

from __future__ import annotations

import contextvars
import time

_expires_at: contextvars.ContextVar[float | None] = contextvars.ContextVar("cdface_request_deadline", default=None)


def begin(seconds: float) -> contextvars.Token[float | None]:
    """Start the current request's deadline ``seconds`` from now (``time.monotonic``); returns the token to reset it."""
    return _expires_at.set(time.monotonic() + seconds)


def end(token: contextvars.Token[float | None]) -> None:
    _expires_at.reset(token)


def expires_at() -> float | None:
    """The ``time.monotonic()`` instant the current request's deadline passes; None outside a request."""
    return _expires_at.get()
