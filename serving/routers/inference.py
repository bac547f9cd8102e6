"""Routes that run the model: embeddings, 1:1 verification, 1:N identification (``/v1``, tag "faces")."""

from __future__ import annotations

from fastapi import APIRouter

from cdface.serving import schemas as s
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
from cdface.serving.routers import responses
from cdface.serving.usecases import recognition

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["faces"])


@router.post("/embeddings", response_model=s.EmbeddingsResponse, summary="Embeddings of the faces in images",
             openapi_extra=body_doc(s.EmbeddingsRequest, {"images": "files"}, ["images"]),
             dependencies=[require("embed")])
async def embeddings(service: ServiceDep, body: ParsedBody[s.EmbeddingsRequest] = json_or_form(
        s.EmbeddingsRequest, form_images)) -> s.EmbeddingsResponse:
    return responses.embeddings(service, await recognition.embed(service, body.images))


@router.post("/verify", response_model=s.VerifyResponse, summary="1:1 - are these the same person?",
             openapi_extra=body_doc(s.VerifyRequest, {"image": "file", "other": "file",
                                                      "identity_id": {"type": "string"},
                                                      "far": {"type": "number"}}, ["image"]),
             dependencies=[require("verify")])
async def verify(service: ServiceDep, body: ParsedBody[s.VerifyRequest] = json_or_form(
        s.VerifyRequest, form_verify)) -> s.VerifyResponse:
    req, images = body.request, body.images
    other = images[1] if len(images) > 1 else None
    result = await recognition.verify(service, images[0], other, req.identity_id, req.far)
    return responses.verification(service, result)


@router.post("/identify", response_model=s.IdentifyResponse, summary="1:N - who is this?",
             openapi_extra=body_doc(s.IdentifyRequest, {"image": "file", "top_k": {"type": "integer"},
                                                        "far": {"type": "number"}}, ["image"]),
             dependencies=[require("identify")])
async def identify(service: ServiceDep, body: ParsedBody[s.IdentifyRequest] = json_or_form(
        s.IdentifyRequest, form_identify)) -> s.IdentifyResponse:
    req = body.request
    result = await recognition.identify(service, body.images[0], req.top_k, req.far)
    return responses.identification(service, result)
