"""The serving stage's domain errors: each carries a stable ``code``, set where it is raised.

What HTTP status a code is answered with is decided in one place, ``cdface.serving.http_errors``;
nothing here knows about HTTP. Every error is a ``CdfaceError``, so the command line prints it as
one line too. Image errors are ``cdface.core.imaging.ImageError`` (same ``code`` convention).
"""

from __future__ import annotations

from cdface.core.errors import CdfaceError


class ServingError(CdfaceError):
    """A request the gateway cannot serve as asked; ``code`` is stable (the API returns it)."""

    code = "serving_error"
    retry_after: float | None = None  # seconds worth waiting before the same request may succeed

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidRequest(ServingError):
    """The request is malformed, or well-formed but asks for something this server cannot do."""

    code = "invalid_request"


class NotFound(ServingError):
    """An identity, face or API key that does not exist (code: ``unknown_identity``, ``unknown_face``, ...)."""

    code = "not_found"


class Conflict(ServingError):
    """A write that would break a uniqueness rule (code: ``duplicate_external_id``, ``duplicate_api_key``)."""

    code = "conflict"


class Unauthorized(ServingError):
    """No API key, or one that is unknown or revoked (code: ``unauthorized``, ``invalid_api_key``)."""

    code = "unauthorized"


class Forbidden(ServingError):
    """A valid API key without the scope the request needs."""

    code = "forbidden"
