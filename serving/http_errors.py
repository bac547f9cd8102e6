"""Errors over HTTP: the status of every error code, in this one table, and the handlers that answer them.

Every error is ``{"error": {"code": "stable_code", "message": "..."}}``: 4xx for the caller's
requests; 5xx only for our own faults and for a model or detector that is unavailable. Domain
errors (``cdface.serving.errors``) and image errors (``cdface.core.imaging.ImageError``) carry
their code; their status is looked up here and nowhere else.

Messages never echo request content (no image bytes, no embeddings, no base64): validation errors
name the field and the rule, not the value.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cdface.core.imaging import ImageError
from cdface.serving.errors import InvalidRequest, ServingError
from cdface.serving.request_ids import HEADER as REQUEST_ID_HEADER
from cdface.serving.request_ids import current_request_id
from cdface.serving.schemas import ErrorResponse

log = logging.getLogger("cdface.serving")

STATUS = {
    # the request as sent
    "empty_body": 400, "malformed_json": 400, "malformed_multipart": 400,
    "payload_too_large": 413, "unsupported_media_type": 415,
    # how the request arrived, and how busy the gateway is (serving.middleware.RequestLimits)
    "request_timeout": 408, "request_header_too_large": 431, "overloaded": 503, "deadline_exceeded": 504,
    # who is asking
    "unauthorized": 401, "invalid_api_key": 401, "forbidden": 403,
    "rate_limited": 429, "rate_limiter_unavailable": 503,  # serving.rate_limits
    # the gallery
    "unknown_identity": 404, "unknown_face": 404, "unknown_api_key": 404, "no_retained_crop": 404,
    "duplicate_external_id": 409, "duplicate_api_key": 409,
    # a retained crop this server's crop keys cannot open: its configuration, not the request
    "crop_key_unknown": 500, "crop_undecryptable": 500,
    # images
    "image_too_large": 413, "detector_unavailable": 503,
    # the model server
    "model_error": 502, "model_unavailable": 503,
}
UNPROCESSABLE = 422  # every other code: a well-formed request that cannot be served as asked

# The error statuses the OpenAPI document lists for the /v1 routes: every status in ``STATUS`` (408, 431
# and 504 come from the request limits, 502 from the model server), plus 422.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in sorted({*STATUS.values(), UNPROCESSABLE})}

# Errors FastAPI and Starlette raise themselves (unknown route, wrong method, ...): their codes.
_FRAMEWORK_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                    405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def http_status(error: ServingError | ImageError) -> int:
    return STATUS.get(error.code, UNPROCESSABLE)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def response_for(error: ServingError | ImageError, headers: dict[str, str] | None = None) -> JSONResponse:
    status = http_status(error)
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, ServingError) and error.retry_after is not None:
        headers["Retry-After"] = str(int(round(error.retry_after)))
    if status >= 500 and status != 503:  # our fault (or the model server's), not a passing unavailability
        log.error("%s: %s", error.code, error)
    return error_response(status, error.code, str(error), headers or None)


def validation_message(errors: Iterable[Any]) -> str:
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


def invalid_request(errors: Iterable[Any]) -> InvalidRequest:
    """The error for a body that fails validation: malformed JSON (400) or a rule broken (422), on every route."""
    errors = list(errors)
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidRequest("the request body is not valid JSON", code="malformed_json")
    return InvalidRequest(validation_message(errors))


def install_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, (ServingError, ImageError))
        return response_for(exc)

    app.add_exception_handler(ServingError, domain)
    app.add_exception_handler(ImageError, domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return response_for(invalid_request(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _FRAMEWORK_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this outside every middleware, RequestIds included, which leaves the
        # request's id set when a request fails (cdface.serving.request_ids): the log line carries it
        # and so must the answer, for the client to quote.
        log.exception("internal error on %s %s", request.method, request.url.path)
        request_id = current_request_id()
        return error_response(500, "internal_error", "an internal error occurred; it has been logged",
                              {REQUEST_ID_HEADER: request_id} if request_id else None)
