"""The client's exceptions: every non-2xx answer is a ``CdfaceAPIError`` of its status family, with the stable code.

The gateway answers errors as ``{"error": {"code": ..., "message": ...}}``; ``code`` is what to branch
on (it never changes for a condition), ``message`` is for people. ``CdfaceConnectionError`` is raised
when no answer came at all (connection refused, timeout) after the retries allowed.
"""

from __future__ import annotations

from cdface.core.errors import CdfaceError


class CdfaceClientError(CdfaceError):
    """Anything the client raises on purpose (a ``CdfaceError``: the CLI prints it as one line)."""


class CdfaceConnectionError(CdfaceClientError):
    """The gateway could not be reached, or did not answer in time, within the retries allowed."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class CdfaceAPIError(CdfaceClientError):
    """A non-2xx answer: ``status`` (HTTP), ``code`` (the gateway's stable error code) and ``message``."""

    def __init__(self, status: int, code: str, message: str, *, method: str, path: str,
                 retry_after: float | None = None, attempts: int = 1) -> None:
        super().__init__(f"{method} {path} answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.path = path
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if it did
        self.attempts = attempts  # requests sent, retries included


class ClientRequestError(CdfaceAPIError):
    """4xx: the request cannot be served as sent; retrying it unchanged will not help (except 429)."""


class BadRequestError(ClientRequestError):
    """400: the body could not be read (malformed JSON or multipart, empty body)."""


class AuthenticationError(ClientRequestError):
    """401: no API key, or one that is unknown or revoked."""


class PermissionDeniedError(ClientRequestError):
    """403: the API key lacks the scope this route needs."""


class NotFoundError(ClientRequestError):
    """404: no such identity, face or retained crop (``code`` says which)."""


class ConflictError(ClientRequestError):
    """409: a uniqueness rule, e.g. ``duplicate_external_id``."""


class PayloadTooLargeError(ClientRequestError):
    """413: the body or one image is over the server's limit."""


class UnprocessableError(ClientRequestError):
    """422: well-formed but not servable, e.g. ``no_face``, ``embedding_size_mismatch``."""


class RateLimitedError(ClientRequestError):
    """429: too many requests; retried while the retry budget lasts."""


class ServerError(CdfaceAPIError):
    """5xx: the gateway or its model server failed."""


class ServiceUnavailableError(ServerError):
    """503: the model server (or detector) is away for now; retried while the retry budget lasts."""


_BY_STATUS: dict[int, type[CdfaceAPIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 422: UnprocessableError, 429: RateLimitedError,
    503: ServiceUnavailableError,
}


def error_class(status: int) -> type[CdfaceAPIError]:
    """The exception class for an HTTP error status: its own, else its family's."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else ClientRequestError if 400 <= status < 500 else CdfaceAPIError
