"""Routes that run the detector or the model: detection, embeddings, 1:1 verification, 1:N identification
(``/v1``, tag "faces")."""

from __future__ import annotations

from fastapi import APIRouter

from cdface.serving import schemas as s
from cdface.serving.auth import allows
from cdface.serving.dependencies import (
    ParsedBody,
    ServiceDep,
    form_identify,
    form_images,
    form_verify,
    json_or_form,
    require,
)
from cdface.serving.http_errors import ERROR_RESPONSES
from cdface.serving.openapi import body_doc
from cdface.serving.request_ids import actor
from cdface.serving.routers import responses
from cdface.serving.store import ApiKey
from cdface.serving.usecases import recognition

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["faces"])


@router.post("/detect", response_model=s.DetectResponse, operation_id="detect",
             summary="Find the faces in images: boxes, landmarks, quality (no embedding, no model call)",
             openapi_extra=body_doc(s.DetectRequest, {"images": "files"}, ["images"]),
             dependencies=[require("embed")])
async def detect(service: ServiceDep, body: ParsedBody[s.DetectRequest] = json_or_form(
        s.DetectRequest, form_images)) -> s.DetectResponse:
    return responses.detection(await recognition.detect(service, body.images))


@router.post("/embeddings", response_model=s.EmbeddingsResponse, operation_id="embed",
             summary="Embeddings of the faces in images",
             openapi_extra=body_doc(s.EmbeddingsRequest, {"images": "files"}, ["images"]),
             dependencies=[require("embed")])
async def embeddings(service: ServiceDep, body: ParsedBody[s.EmbeddingsRequest] = json_or_form(
        s.EmbeddingsRequest, form_images)) -> s.EmbeddingsResponse:
    return responses.embeddings(await recognition.embed(service, body.images))


@router.post("/verify", response_model=s.VerifyResponse, operation_id="verify",
             summary="1:1 - are these the same person? (images or embeddings)",
             openapi_extra=body_doc(s.VerifyRequest, {"image": "file", "other": "file",
                                                      "identity_id": {"type": "string"},
                                                      "far": {"type": "number"}}, ["image"]))
async def verify(service: ServiceDep, key: ApiKey | None = require("verify"),
                 body: ParsedBody[s.VerifyRequest] = json_or_form(s.VerifyRequest, form_verify)) -> s.VerifyResponse:
    req, images = body.request, iter(body.images)  # the images in request order: 'image', then 'other'
    image = next(images) if req.image is not None else None
    target = recognition.VerifyTarget(next(images) if req.other is not None else None, req.other_embedding,
                                      req.identity_id)
    return responses.verification(await recognition.verify(service, image, req.embedding, target, req.far,
                                                                           actor(key)))


@router.post("/identify", response_model=s.IdentifyResponse, operation_id="identify",
             summary="1:N - who is this? (an image or an embedding)",
             openapi_extra=body_doc(s.IdentifyRequest, {"image": "file", "top_k": {"type": "integer"},
                                                        "far": {"type": "number"}}, ["image"]))
async def identify(service: ServiceDep, key: ApiKey | None = require("identify"),
                   body: ParsedBody[s.IdentifyRequest] = json_or_form(s.IdentifyRequest, form_identify),
                   ) -> s.IdentifyResponse:
    req = body.request
    image = body.images[0] if body.images else None
    result = await recognition.identify(service, image, req.embedding, req.top_k, req.far, actor(key),
                                        non_matches=key is None or allows(key, "candidates"))
    return responses.identification(result)
