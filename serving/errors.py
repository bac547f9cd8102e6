"""API errors: ``{"error": {"code": "stable_code", "message": "..."}}`` with a 4xx status (5xx only for our own faults).

Messages never echo request content (no image bytes, no embeddings, no base64): validation errors
name the field and the rule, not the value.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cdface.core.imaging import ImageError
from cdface.serving.store import Conflict, NotFound, StoreError
from cdface.serving.triton import TritonRejected, TritonUnavailable

log = logging.getLogger("cdface.serving")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def validation_message(errors) -> str:
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ImageError)
    async def _image(request: Request, exc: ImageError):
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        code = "unknown_face" if "face" in str(exc) else "unknown_identity"
        return error_response(404, code, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict):
        return error_response(409, "duplicate_external_id", str(exc))

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError):
        return error_response(422, exc.code, str(exc))

    @app.exception_handler(TritonUnavailable)
    async def _unavailable(request: Request, exc: TritonUnavailable):
        return error_response(503, "model_unavailable", str(exc), {"Retry-After": str(int(round(exc.retry_after)))})

    @app.exception_handler(TritonRejected)
    async def _rejected(request: Request, exc: TritonRejected):
        log.error("Triton rejected a request: %s", exc)
        return error_response(502, "model_error", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "an internal error occurred; it has been logged")
