"""FastAPI dependencies: the running service and its settings, API-key auth, and JSON-or-multipart bodies.

Request bodies with images are JSON (images as base64) or multipart/form-data (images as files);
both are validated by the same pydantic models (``json_or_form``) and come out as the same plain
``ImageIn`` values for the use cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Awaitable, Callable, Generic, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from cdface.serving import schemas as s
from cdface.serving.auth import authorize
from cdface.serving.errors import InvalidRequest
from cdface.serving.http_errors import invalid_request
from cdface.serving.metrics import Metrics
from cdface.serving.rate_limits import RateLimiter
from cdface.serving.service import FaceService
from cdface.serving.settings import Settings
from cdface.serving.store import ApiKey
from cdface.serving.usecases.images import ImageIn

# -- the service, its settings, the metrics ----------------------------------------------------------
# Dependencies that do not block are ``async def``: FastAPI runs a plain ``def`` dependency in a worker
# thread, a hop that costs more than the dependency itself.


async def get_service(request: Request) -> FaceService:
    return request.app.state.service


async def get_settings(request: Request) -> Settings:
    return request.app.state.service.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[FaceService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

# -- API keys ---------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


def require(scope: str) -> Any:
    """A route dependency: the caller's API key must allow ``scope`` (unless the server runs without keys), and
    the caller must be within its rate limit for the routes of that scope (``cdface.serving.rate_limits``).

    The key (None without keys) is the route's to use: its tenant bounds what the route reads and writes
    (``cdface.serving.auth.tenant_of``; "default" without keys)."""

    def check_blocking(request: Request, service: FaceService, key: str | None) -> ApiKey | None:
        record = None
        if service.settings.auth:
            record = authorize(service.store, key, scope, service.settings.pepper)
        limiter: RateLimiter = request.app.state.rate_limiter
        if limiter.enabled:
            # Counted after authentication, so a stranger's requests never use up a real key's quota.
            caller = f"key:{record.id}" if record else f"address:{request.client.host if request.client else '-'}"
            limiter.hit(scope, caller)
        return record

    async def check(request: Request, service: ServiceDep,
                    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    header: str | None = Depends(_header)) -> ApiKey | None:
        key = (bearer.credentials if bearer else None) or header
        limiter: RateLimiter = request.app.state.rate_limiter
        if service.settings.auth or (limiter.enabled and not limiter.in_process):  # a database or network call
            return await anyio.to_thread.run_sync(check_blocking, request, service, key)
        return check_blocking(request, service, key)

    return Depends(check)


# -- bodies: JSON or multipart/form-data ------------------------------------------------------------

MULTIPART_PLACEHOLDER = "multipart"  # an image's "data" in a form: the bytes come from the file part
R = TypeVar("R", bound=s.ImageRequest)
FormReader = Callable[[FormData], Awaitable[tuple[dict[str, Any], list[bytes]]]]


@dataclass(frozen=True)
class ParsedBody(Generic[R]):
    request: R  # the validated request model
    images: list[ImageIn]  # its images, in request order


def json_or_form(model: type[R], from_form: FormReader) -> Any:
    """A route dependency: the body as ``model``, from JSON or (``from_form`` reads the fields) multipart."""

    async def parse(request: Request, settings: SettingsDep) -> ParsedBody[R]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            body = await request.body()
            if not body.strip():
                raise InvalidRequest("the request body is empty", code="empty_body")
            try:
                req = model.model_validate_json(body)
            except ValidationError as exc:
                raise invalid_request(exc.errors()) from None
            payloads: list[bytes | str] = [image.data for image in req.image_inputs()]
        elif content_type == "multipart/form-data":
            form = await _read_form(request, settings)
            try:
                raw, files = await from_form(form)
                req = model.model_validate(raw)
            except ValidationError as exc:
                raise invalid_request(exc.errors()) from None
            finally:
                await form.close()
            payloads = list(files)
        else:
            raise InvalidRequest("send application/json (base64 images) or multipart/form-data (files)",
                                 code="unsupported_media_type")
        return ParsedBody(req, [image_in(spec, data) for data, spec in zip(payloads, req.image_inputs())])

    return Depends(parse)


def image_in(spec: s.ImageInput, data: bytes | str | None = None) -> ImageIn:
    """A request's image as the use cases take it (``data``: the file's bytes; default: the spec's base64)."""
    return ImageIn(spec.data if data is None else data, spec.mode, spec.format, spec.landmarks, spec.min_face_size,
                   spec.min_score)


def _malformed_multipart(why: str) -> InvalidRequest:
    return InvalidRequest(f"the multipart body cannot be parsed: {why}", code="malformed_multipart")


async def _read_form(request: Request, settings: Settings) -> FormData:
    """The multipart form; a body without its boundary, cut short or unparsable is ``malformed_multipart``."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise _malformed_multipart("the content-type names no boundary")
    # The parser takes a body that stops before its closing delimiter as complete (the parts read so
    # far, possibly none), so a cut-short upload would be answered as if fields were missing. The
    # body is already bounded by max_request_bytes, and the parser reads it from this cached copy.
    if b"--" + boundary + b"--" not in await request.body():
        raise _malformed_multipart("the body ends before the closing boundary")
    try:
        return await request.form(max_files=settings.max_images + 2, max_fields=32, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise _malformed_multipart(exc.message) from None
    except StarletteHTTPException as exc:  # Starlette reports the parser's own errors as a plain 400
        raise _malformed_multipart(str(exc.detail)) from None


async def _files(form: FormData, name: str) -> list[bytes]:
    out = []
    for value in form.getlist(name):
        if not isinstance(value, UploadFile):
            raise InvalidRequest(f"form field '{name}' must be a file upload", code="expected_file")
        out.append(await value.read())
    return out


def _text(form: FormData, key: str) -> Any:
    value = form.get(key)
    if isinstance(value, UploadFile):
        raise InvalidRequest(f"form field '{key}' must be text, not a file")
    return value


def _copy_fields(form: FormData, raw: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if form.get(key) is not None:
            raw[key] = _text(form, key)


def _image_spec(form: FormData) -> dict[str, Any]:
    """The fields that say how to find the face, shared by every image of a form."""
    spec: dict[str, Any] = {"data": MULTIPART_PLACEHOLDER}
    for key in ("mode", "format", "min_face_size", "min_score"):
        if form.get(key) is not None:
            spec[key] = form.get(key)
    if form.get("landmarks") is not None:
        try:
            spec["landmarks"] = json.loads(form.get("landmarks"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidRequest("form field 'landmarks' must be JSON: [[x, y], ... five pairs]",
                                 code="invalid_landmarks") from None
    return spec


async def form_images(form: FormData) -> tuple[dict[str, Any], list[bytes]]:
    """``images`` files (embeddings, enrolment), and ``retain_crop``."""
    files = await _files(form, "images")
    spec = _image_spec(form)
    raw: dict[str, Any] = {"images": [dict(spec) for _ in files]}
    _copy_fields(form, raw, ("retain_crop",))
    return raw, files


async def form_verify(form: FormData) -> tuple[dict[str, Any], list[bytes]]:
    """One ``image`` file and one ``other`` file or an ``identity_id``; ``far``."""
    spec = _image_spec(form)
    image, other = await _files(form, "image"), await _files(form, "other")
    if len(image) > 1 or len(other) > 1:
        raise InvalidRequest("send one 'image' file and at most one 'other' file")
    raw: dict[str, Any] = {"image": dict(spec) if image else None}
    if other:
        raw["other"] = dict(spec)
    _copy_fields(form, raw, ("identity_id", "far"))
    return raw, image + other


async def form_identify(form: FormData) -> tuple[dict[str, Any], list[bytes]]:
    """One ``image`` file; ``top_k``, ``far``."""
    image = await _files(form, "image")
    if len(image) > 1:
        raise InvalidRequest("send one 'image' file")
    raw: dict[str, Any] = {"image": _image_spec(form) if image else None}
    _copy_fields(form, raw, ("top_k", "far"))
    return raw, image
