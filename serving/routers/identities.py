"""Routes of the gallery: identities and their faces (``/v1/identities``, tag "gallery").

Every route acts within the caller's tenant (``cdface.serving.auth``): reads take ``tenant_of(key)``,
writes ``actor(key)``, which carries it.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Response

from cdface.serving import schemas as s
from cdface.serving.auth import tenant_of
from cdface.serving.dependencies import ParsedBody, ServiceDep, form_images, image_in, json_or_form, require
from cdface.serving.http_errors import ERROR_RESPONSES
from cdface.serving.openapi import body_doc
from cdface.serving.request_ids import actor
from cdface.serving.routers import responses
from cdface.serving.store import ApiKey
from cdface.serving.usecases import identities

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["gallery"])


@router.post("/identities", response_model=s.IdentityCreated, status_code=201, operation_id="create_identity",
             summary="Create an identity, optionally with its faces (one transaction)")
async def create_identity(body: s.IdentityCreate, service: ServiceDep,
                          key: ApiKey | None = require("enroll")) -> s.IdentityCreated:
    created = await identities.create_identity(service, body.external_id, body.name, body.metadata,
                                               [image_in(spec) for spec in body.images], body.retain_crop,
                                               actor(key))
    return responses.created_identity(created.identity, created.faces, service.active.key)


@router.get("/identities", response_model=s.IdentityPage, operation_id="list_identities",
            summary="List identities (by id, paginated), optionally by external id or a text search")
def list_identities(service: ServiceDep, key: ApiKey | None = require("identify"),
                    limit: int = Query(50, ge=1, le=1000),
                    cursor: str | None = Query(None, max_length=64, description="next_cursor of the previous page"),
                    external_id: str | None = Query(None, min_length=1, max_length=256,
                                                    description="Only the identity with exactly this external id."),
                    q: str | None = Query(None, min_length=1, max_length=256,
                                          description="Only identities whose name or external id contains this "
                                                      "text (case-insensitive)."),
                    ) -> s.IdentityPage:
    page = identities.list_identities(service, limit, cursor, external_id=external_id, contains=q,
                                      tenant=tenant_of(key))
    return s.IdentityPage(items=[responses.identity(i) for i in page.items], next_cursor=page.next_cursor)


@router.get("/identities/{identity_id}", response_model=s.IdentityOut, operation_id="get_identity",
            summary="Get an identity")
def get_identity(identity_id: str, service: ServiceDep, key: ApiKey | None = require("identify")) -> s.IdentityOut:
    found = identities.get_identity(service, identity_id, tenant_of(key))
    return responses.identity(found.identity, found.faces_needing_reenrolment)


@router.patch("/identities/{identity_id}", response_model=s.IdentityOut, operation_id="update_identity",
              summary="Update an identity's external id, name or metadata")
def update_identity(identity_id: str, body: s.IdentityUpdate, service: ServiceDep,
                    key: ApiKey | None = require("enroll")) -> s.IdentityOut:
    return responses.identity(identities.update_identity(service, identity_id, body.model_dump(exclude_unset=True),
                                                         actor(key)))


@router.delete("/identities/{identity_id}", status_code=204, operation_id="delete_identity",
               summary="Delete an identity and all its faces (erased from search at once)")
def delete_identity(identity_id: str, service: ServiceDep, key: ApiKey | None = require("delete")) -> Response:
    identities.delete_identity(service, identity_id, actor(key))
    return Response(status_code=204)


@router.post("/identities/{identity_id}/faces", response_model=s.EnrollResponse, status_code=201,
             operation_id="enroll_faces", summary="Enroll faces (one transaction)",
             openapi_extra=body_doc(s.EnrollRequest, {"images": "files", "retain_crop": {"type": "boolean"}},
                                    ["images"]))
async def enroll(identity_id: str, service: ServiceDep, key: ApiKey | None = require("enroll"),
                 body: ParsedBody[s.EnrollRequest] = json_or_form(s.EnrollRequest, form_images)) -> s.EnrollResponse:
    faces = await identities.enroll(service, identity_id, body.images, body.request.retain_crop, actor(key))
    return s.EnrollResponse(faces=responses.faces(faces, service.active.key))


@router.get("/identities/{identity_id}/faces", response_model=s.FaceList, operation_id="list_faces",
            summary="List an identity's faces (by id, paginated)")
def list_faces(identity_id: str, service: ServiceDep, key: ApiKey | None = require("identify"),
               limit: int = Query(100, ge=1, le=1000),
               cursor: str | None = Query(None, pattern=r"^[0-9]{1,18}$",
                                          description="next_cursor of the previous page"),
               ) -> s.FaceList:
    page = identities.list_faces(service, identity_id, limit, int(cursor) if cursor is not None else None,
                                 tenant_of(key))
    return s.FaceList(items=responses.faces(page.items, service.active.key), next_cursor=page.next_cursor)


@router.get("/identities/{identity_id}/faces/{face_id}/crop", operation_id="get_face_crop", response_class=Response,
            summary="The face's retained aligned 112x112 crop (PNG; 'crops' scope)",
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The aligned crop the face's embedding was made from."}})
def get_face_crop(identity_id: str, service: ServiceDep, key: ApiKey | None = require("crops"),
                  face_id: int = Path(ge=1, le=2**63 - 1)) -> Response:
    png = identities.face_crop(service, identity_id, face_id, tenant_of(key))
    # A face image is personal data: no shared or browser cache may keep it.
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.delete("/identities/{identity_id}/faces/{face_id}", status_code=204, operation_id="delete_face",
               summary="Delete a face")
def delete_face(identity_id: str, service: ServiceDep, key: ApiKey | None = require("delete"),
                face_id: int = Path(ge=1, le=2**63 - 1)) -> Response:
    identities.delete_face(service, identity_id, face_id, actor(key))
    return Response(status_code=204)
