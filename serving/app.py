"""The FastAPI gateway: ``create_app(settings)``. Routes stay thin; the work is in ``serving.service``.

Request bodies are JSON (images as base64) or multipart/form-data (images as files); both are
described in the OpenAPI document and validated by the same pydantic models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from cdface.serving import schemas as s
from cdface.serving.auth import allows, verify_key
from cdface.serving.errors import ApiError, install_error_handlers, validation_message
from cdface.serving.metrics import Metrics
from cdface.serving.service import FaceService
from cdface.serving.settings import Settings
from cdface.serving.store import ApiKey, Face

log = logging.getLogger("cdface.serving")

API_TITLE = "cdface face recognition API"
_MULTIPART_PLACEHOLDER = "multipart"
_ERRORS = {code: {"model": s.ErrorResponse} for code in (401, 403, 404, 409, 413, 415, 422, 503)}


# --------------------------------------------------------------------------------------------------
# Plumbing: services, auth, bodies
# --------------------------------------------------------------------------------------------------


def get_service(request: Request) -> FaceService:
    return request.app.state.service


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


def require(scope: str) -> Any:
    def check(request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
              header: str | None = Depends(_header)) -> ApiKey | None:
        service: FaceService = request.app.state.service
        if not service.settings.auth:
            return None
        key = (bearer.credentials if bearer else None) or header
        if not key:
            raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer <key> or X-API-Key)",
                           {"WWW-Authenticate": "Bearer"})
        pepper = service.settings.key_pepper.get_secret_value() if service.settings.key_pepper else None
        record = verify_key(service.store, key, pepper)
        if record is None:
            raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked", {"WWW-Authenticate": "Bearer"})
        if not allows(record, scope):
            raise ApiError(403, "forbidden", f"the API key lacks the '{scope}' scope")
        return record

    return Depends(check)


class PayloadTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"the request body is over the {limit}-byte limit")


class BodyLimit:
    """Refuse bodies over ``limit`` bytes: by Content-Length at once, and by counting when it is absent."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                response = JSONResponse({"error": {"code": "payload_too_large",
                                                   "message": f"the request body is over the {self.limit}-byte limit"}},
                                        status_code=413, headers={"Connection": "close"})
                return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(self.limit)
            return message

        return await self.app(scope, counted, send)


def _invalid(exc: ValidationError) -> ApiError:
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        return ApiError(400, "malformed_json", "the request body is not valid JSON")
    return ApiError(422, "invalid_request", validation_message(exc.errors()))


def _parse_json(model: type[BaseModel], body: bytes) -> BaseModel:
    if not body.strip():
        raise ApiError(400, "empty_body", "the request body is empty")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from None


async def _files(form, name: str) -> list[bytes]:
    out = []
    for value in form.getlist(name):
        if not isinstance(value, UploadFile):
            raise ApiError(422, "expected_file", f"form field '{name}' must be a file upload")
        out.append(await value.read())
    return out


def _image_spec(form) -> dict[str, Any]:
    spec: dict[str, Any] = {"data": _MULTIPART_PLACEHOLDER}
    for key in ("mode", "min_face_size", "min_score"):
        if form.get(key) is not None:
            spec[key] = form.get(key)
    if form.get("landmarks") is not None:
        try:
            spec["landmarks"] = json.loads(form.get("landmarks"))
        except (TypeError, ValueError):
            raise ApiError(422, "invalid_landmarks", "form field 'landmarks' must be JSON: [[x, y], ... five pairs]")
    return spec


async def read_body(request: Request, model: type[BaseModel],
                    from_form: Callable[[Any, Callable], Any]) -> tuple[Any, list[bytes | str]]:
    """(validated request model, image payloads in request order: bytes from files or base64 text)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        req = _parse_json(model, await request.body())
        return req, [img.data for img in _images_of(req)]
    if content_type == "multipart/form-data":
        settings = request.app.state.service.settings
        try:
            form = await request.form(max_files=settings.max_images + 2, max_fields=32, max_part_size=64 * 1024)
        except MultiPartException as exc:
            raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {exc.message}") from None
        async with _closing(form):
            raw, files = await from_form(form)
            try:
                req = model.model_validate(raw)
            except ValidationError as exc:
                raise _invalid(exc) from None
            return req, files
    raise ApiError(415, "unsupported_media_type", "send application/json (base64 images) or multipart/form-data (files)")


@contextlib.asynccontextmanager
async def _closing(form):
    try:
        yield form
    finally:
        await form.close()


def _images_of(req: BaseModel) -> list[s.ImageInput]:
    if isinstance(req, (s.EmbeddingsRequest, s.EnrollRequest)):
        return list(req.images)
    if isinstance(req, s.VerifyRequest):
        return [req.image] + ([req.other] if req.other is not None else [])
    if isinstance(req, s.IdentifyRequest):
        return [req.image]
    return []


def _form_value(form, key: str) -> str | None:
    value = form.get(key)
    if isinstance(value, UploadFile):
        raise ApiError(422, "invalid_request", f"form field '{key}' must be text, not a file")
    return value


async def _form_images(form) -> tuple[dict, list[bytes]]:
    files = await _files(form, "images")
    spec = _image_spec(form)
    raw: dict[str, Any] = {"images": [dict(spec) for _ in files]}
    if form.get("retain_crop") is not None:
        raw["retain_crop"] = _form_value(form, "retain_crop")
    return raw, files


async def _form_verify(form) -> tuple[dict, list[bytes]]:
    spec = _image_spec(form)
    image, other = await _files(form, "image"), await _files(form, "other")
    if len(image) > 1 or len(other) > 1:
        raise ApiError(422, "invalid_request", "send one 'image' file and at most one 'other' file")
    raw: dict[str, Any] = {"image": dict(spec) if image else None}
    if other:
        raw["other"] = dict(spec)
    for key in ("identity_id", "far"):
        if form.get(key) is not None:
            raw[key] = _form_value(form, key)
    return raw, image + other


async def _form_identify(form) -> tuple[dict, list[bytes]]:
    image = await _files(form, "image")
    if len(image) > 1:
        raise ApiError(422, "invalid_request", "send one 'image' file")
    raw: dict[str, Any] = {"image": _image_spec(form) if image else None}
    for key in ("top_k", "far"):
        if form.get(key) is not None:
            raw[key] = _form_value(form, key)
    return raw, image


def _face_spec_doc() -> dict[str, Any]:
    return {
        "mode": {"type": "string", "enum": ["aligned", "landmarks", "detect", "detect_all"], "default": "detect"},
        "landmarks": {"type": "string", "description": "JSON: five [x, y] pairs (mode 'landmarks')."},
        "min_face_size": {"type": "number", "minimum": 0},
        "min_score": {"type": "number", "minimum": 0, "maximum": 1},
    }


def _body_doc(model: type[BaseModel], form_properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    properties = {name: ({"type": "array", "items": binary} if spec == "files" else binary if spec == "file" else spec)
                  for name, spec in form_properties.items()}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
        "multipart/form-data": {"schema": {"type": "object", "required": required,
                                           "properties": {**properties, **_face_spec_doc()}}},
    }}}


# --------------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------------

v1 = APIRouter(prefix="/v1", responses=_ERRORS)


def _faces_out(service: FaceService, faces: list[Face]) -> list[s.FaceOut]:
    return [s.FaceOut(id=f.id, identity_id=f.identity_id, model=str(f.model), current=f.model == service.model_key,
                      created=f.created, has_crop=f.has_crop, box=f.box, quality=f.quality) for f in faces]


def _detected(p) -> dict[str, Any]:
    return {"image": p.image, "box": p.face.box, "landmarks": p.face.landmarks, "quality": p.face.quality}


async def _items(service: FaceService, req, payloads) -> list:
    return await service.prepare(list(zip(payloads, _images_of(req))))


@v1.post("/embeddings", response_model=s.EmbeddingsResponse, summary="Embeddings of the faces in images",
         openapi_extra=_body_doc(s.EmbeddingsRequest, {"images": "files"}, ["images"]), tags=["faces"])
async def embeddings(request: Request, _: Any = require("embed")) -> s.EmbeddingsResponse:
    service = get_service(request)
    req, payloads = await read_body(request, s.EmbeddingsRequest, _form_images)
    prepared = await _items(service, req, payloads)
    vectors = await service.embed(prepared)
    return s.EmbeddingsResponse(model=service.model_info, faces=[
        s.FaceEmbedding(**_detected(p), embedding=v.tolist()) for p, v in zip(prepared, vectors)])


@v1.post("/verify", response_model=s.VerifyResponse, summary="1:1 - are these the same person?",
         openapi_extra=_body_doc(s.VerifyRequest, {"image": "file", "other": "file",
                                                   "identity_id": {"type": "string"},
                                                   "far": {"type": "number"}}, ["image"]), tags=["faces"])
async def verify(request: Request, _: Any = require("verify")) -> s.VerifyResponse:
    service = get_service(request)
    req, payloads = await read_body(request, s.VerifyRequest, _form_verify)
    threshold, source, far = service.decision(req.far)
    if req.identity_id is not None:
        await run_in_threadpool(service.store.get_identity, req.identity_id)  # 404 before any inference
    prepared = await _items(service, req, payloads)
    first = [p for p in prepared if p.image == 0][:1]
    second = [p for p in prepared if p.image == 1][:1]
    vectors = await service.embed(first + second)
    if req.identity_id is not None:
        gallery = await run_in_threadpool(service.gallery.identity_embeddings, req.identity_id)
        if gallery.size == 0:
            raise ApiError(422, "identity_has_no_faces",
                           f"identity {req.identity_id!r} has no faces made by the served model {service.model_key}")
        similarity = float((gallery @ vectors[0]).max())
    else:
        similarity = float(vectors[0] @ vectors[1])
    return s.VerifyResponse(match=similarity > threshold, similarity=similarity, threshold=threshold,
                            threshold_source=source, far=far, model=service.model_info, identity_id=req.identity_id,
                            faces=[s.DetectedFace(**_detected(p)) for p in first + second])


@v1.post("/identify", response_model=s.IdentifyResponse, summary="1:N - who is this?",
         openapi_extra=_body_doc(s.IdentifyRequest, {"image": "file", "top_k": {"type": "integer"},
                                                     "far": {"type": "number"}}, ["image"]), tags=["faces"])
async def identify(request: Request, _: Any = require("identify")) -> s.IdentifyResponse:
    service = get_service(request)
    req, payloads = await read_body(request, s.IdentifyRequest, _form_identify)
    if req.top_k > service.settings.max_top_k:
        raise ApiError(422, "invalid_request", f"top_k must be at most {service.settings.max_top_k}")
    threshold, source, far = service.decision(req.far)
    prepared = await _items(service, req, payloads)
    vectors = await service.embed(prepared)
    found = await run_in_threadpool(service.gallery.search, vectors, req.top_k)
    identities = await run_in_threadpool(service.store.identities_by_id,
                                         [c.identity_id for row in found for c in row])
    faces = []
    for p, row in zip(prepared, found):
        candidates = [s.CandidateOut(identity_id=c.identity_id, external_id=identities[c.identity_id].external_id,
                                     name=identities[c.identity_id].name, face_id=c.face_id,
                                     similarity=c.similarity, match=c.similarity > threshold)
                      for c in row if c.identity_id in identities]
        best = candidates[0] if candidates and candidates[0].match else None
        faces.append(s.IdentifiedFace(**_detected(p), candidates=candidates, match=best))
    return s.IdentifyResponse(threshold=threshold, threshold_source=source, far=far, model=service.model_info,
                              faces=faces)


def _identity_out(identity, needing: int | None = None) -> s.IdentityOut:
    return s.IdentityOut(id=identity.id, external_id=identity.external_id, name=identity.name,
                         metadata=identity.metadata, created=identity.created, updated=identity.updated,
                         face_count=identity.face_count, faces_needing_reenrolment=needing)


@v1.post("/identities", response_model=s.IdentityOut, status_code=201, tags=["gallery"],
         summary="Create an identity")
def create_identity(body: s.IdentityCreate, request: Request, _: Any = require("enroll")) -> s.IdentityOut:
    return _identity_out(get_service(request).store.create_identity(body.external_id, body.name, body.metadata), 0)


@v1.get("/identities", response_model=s.IdentityPage, tags=["gallery"], summary="List identities (by id, paginated)")
def list_identities(request: Request, limit: int = Query(50, ge=1, le=1000),
                    cursor: str | None = Query(None, max_length=64, description="next_cursor of the previous page"),
                    _: Any = require("identify")) -> s.IdentityPage:
    items = get_service(request).store.list_identities(limit + 1, cursor)
    page = items[:limit]
    return s.IdentityPage(items=[_identity_out(i) for i in page],
                          next_cursor=page[-1].id if len(items) > limit else None)


@v1.get("/identities/{identity_id}", response_model=s.IdentityOut, tags=["gallery"], summary="Get an identity")
def get_identity(identity_id: str, request: Request, _: Any = require("identify")) -> s.IdentityOut:
    service = get_service(request)
    identity = service.store.get_identity(identity_id)
    stale = sum(f.model != service.model_key for f in service.store.list_faces(identity_id))
    return _identity_out(identity, stale)


@v1.patch("/identities/{identity_id}", response_model=s.IdentityOut, tags=["gallery"],
          summary="Update an identity's external id, name or metadata")
def update_identity(identity_id: str, body: s.IdentityUpdate, request: Request,
                    _: Any = require("enroll")) -> s.IdentityOut:
    changes = body.model_dump(exclude_unset=True)
    if "metadata" in changes and changes["metadata"] is None:
        changes["metadata"] = {}  # null clears it, like name and external_id
    return _identity_out(get_service(request).store.update_identity(identity_id, changes))


@v1.delete("/identities/{identity_id}", status_code=204, tags=["gallery"],
           summary="Delete an identity and all its faces (erased from search at once)")
def delete_identity(identity_id: str, request: Request, _: Any = require("delete")) -> Response:
    get_service(request).gallery.delete_identity(identity_id)
    return Response(status_code=204)


@v1.post("/identities/{identity_id}/faces", response_model=s.EnrollResponse, status_code=201, tags=["gallery"],
         summary="Enroll faces (one transaction)",
         openapi_extra=_body_doc(s.EnrollRequest, {"images": "files", "retain_crop": {"type": "boolean"}}, ["images"]))
async def enroll(identity_id: str, request: Request, _: Any = require("enroll")) -> s.EnrollResponse:
    service = get_service(request)
    req, payloads = await read_body(request, s.EnrollRequest, _form_images)
    await run_in_threadpool(service.store.get_identity, identity_id)  # 404 before any inference
    prepared = await _items(service, req, payloads)
    vectors = await service.embed(prepared)
    retain = service.settings.retain_crops if req.retain_crop is None else req.retain_crop
    faces = await service.enroll(identity_id, prepared, vectors, retain)
    return s.EnrollResponse(faces=_faces_out(service, faces))


@v1.get("/identities/{identity_id}/faces", response_model=s.FaceList, tags=["gallery"], summary="List faces")
def list_faces(identity_id: str, request: Request, _: Any = require("identify")) -> s.FaceList:
    service = get_service(request)
    return s.FaceList(items=_faces_out(service, service.store.list_faces(identity_id)))


@v1.delete("/identities/{identity_id}/faces/{face_id}", status_code=204, tags=["gallery"], summary="Delete a face")
def delete_face(identity_id: str, request: Request, face_id: int = Path(ge=1, le=2**63 - 1),
                _: Any = require("delete")) -> Response:
    get_service(request).gallery.delete_face(identity_id, face_id)
    return Response(status_code=204)


@v1.get("/gallery", response_model=s.GalleryStatusOut, tags=["operations"],
        summary="Gallery status: index size, faces needing re-enrolment, index = store check")
def gallery_status(request: Request, _: Any = require("admin")) -> s.GalleryStatusOut:
    gallery = get_service(request).gallery
    status, check = gallery.status(), gallery.check()
    return s.GalleryStatusOut(**status.__dict__, consistent=check["consistent"], store_faces=check["store_faces"])


ops = APIRouter(tags=["operations"])


class SyncStatus(BaseModel):
    """A replica's place in the shared store's change log (PostgreSQL only)."""

    applied_seq: int
    store_seq: int
    behind: int
    seconds_since_sync: float | None


class ReadinessOut(s.Readiness):
    sync: SyncStatus | None = None


@ops.get("/healthz", response_model=s.Health, summary="Liveness: the process answers")
async def healthz() -> s.Health:
    return s.Health(status="ok")


@ops.get("/readyz", response_model=ReadinessOut, responses={503: {"model": ReadinessOut}},
         summary="Readiness: the Triton model is ready and the gallery is loaded (and, on PostgreSQL, in step)")
async def readyz(request: Request) -> Any:
    service = get_service(request)
    triton = await service.embedder.model_ready()
    ready = triton and service.gallery.loaded
    sync = None
    if service.follower is not None:
        try:
            sync = SyncStatus(**await run_in_threadpool(service.gallery.lag))
        except Exception as exc:  # the database does not answer: this replica cannot be trusted to be in step
            log.warning("readiness: the gallery database does not answer: %s", exc)
            ready = False
        else:
            since = sync.seconds_since_sync
            ready = ready and since is not None and since <= service.settings.sync_stale_s
    body = ReadinessOut(status="ready" if ready else "not_ready", triton=triton, gallery=service.gallery.loaded,
                        model=service.model_info, sync=sync)
    return body if ready else JSONResponse(body.model_dump(), status_code=503)


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    service = get_service(request)
    m: Metrics = request.app.state.metrics
    m.gallery_faces.set(len(service.gallery.index))
    m.breaker_open.set(0 if service.embedder.breaker.state == "closed" else 1)
    body, content_type = m.render()
    return Response(body, media_type=content_type)


# --------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, service: FaceService | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("cdface gateway settings: %s", json.dumps(settings.describe(), default=str))
        svc = service or await run_in_threadpool(FaceService.create, settings)
        app.state.service = svc
        started = time.perf_counter()
        await run_in_threadpool(svc.gallery.load)
        svc.follow()
        log.info("serving model %s (Triton %r version %d), %d faces indexed in %.2f s; threshold %.3f (%s)",
                 svc.model_key, settings.model, svc.triton_version, len(svc.gallery.index),
                 time.perf_counter() - started, *svc.decision(None)[:2])
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(title=API_TITLE, version="1", lifespan=lifespan,
                  description="Embeddings, 1:1 verification, 1:N identification and an identity gallery, "
                              "in front of Triton Inference Server. Errors are JSON: "
                              "`{\"error\": {\"code\": ..., \"message\": ...}}`.")
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(ops)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(app.state.metrics.middleware)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (s.EmbeddingsRequest, s.VerifyRequest, s.IdentifyRequest, s.EnrollRequest):
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
