"""The identity gallery: identities, and the faces enrolled for them.

Writes that touch faces go through the gallery (store first, then the index; see
``cdface.serving.gallery``); the rest reads and writes the store.

Every use case acts within one tenant: writes within ``actor.tenant``, reads within ``tenant`` (the
caller's key's, ``cdface.serving.auth.tenant_of``). Another tenant's identity is answered exactly
like one that does not exist (``unknown_identity``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from anyio import to_thread

from cdface.core.imaging import encode_png
from cdface.serving.errors import InvalidRequest, ServingError
from cdface.serving.gallery import Mirrors
from cdface.serving.metrics import stage, timed
from cdface.serving.store import DEFAULT_TENANT, NO_ACTOR, Actor, Face, Identity
from cdface.serving.usecases.images import FoundFace, ImageIn, embed_faces, enrollable, find_faces

if TYPE_CHECKING:
    from cdface.serving.service import FaceService, ServedModel

log = logging.getLogger("cdface.serving.identities")


@dataclass(frozen=True)
class IdentityDetail:
    identity: Identity
    faces_needing_reenrolment: int  # faces without the served model's embedding


@dataclass(frozen=True)
class IdentityPage:
    items: list[Identity]
    next_cursor: str | None  # the id to list after for the next page; None on the last page


@dataclass(frozen=True)
class FacePage:
    items: list[Face]
    next_cursor: str | None  # the face id to list after for the next page; None on the last page


@dataclass(frozen=True)
class CreatedIdentity:
    identity: Identity
    faces: list[Face]


async def create_identity(service: FaceService, external_id: str | None, name: str | None, metadata: dict[str, Any],
                          images: list[ImageIn], retain_crop: bool | None, actor: Actor = NO_ACTOR) -> CreatedIdentity:
    """Create an identity and enroll the faces of ``images`` in one transaction: either both exist or neither."""
    if not images:
        return CreatedIdentity(await to_thread.run_sync(timed("store", service.store.create_identity), external_id,
                                                        name, metadata, actor), [])
    retain = keep_crops(service, retain_crop)  # refused before any inference
    found = await _enrollable_faces(service, images)
    model, vectors, also = await _embeddings(service, found)

    def store() -> tuple[Identity, list[Face]]:
        crops = _retained_crops(found, retain)
        with stage("store"):
            return model.gallery.create_identity(external_id, name, metadata, vectors, crops,
                                                 [f.face.box for f in found], [f.face.quality for f in found], actor,
                                                 also)

    identity, faces = await to_thread.run_sync(store)
    return CreatedIdentity(identity, faces)


def list_identities(service: FaceService, limit: int, cursor: str | None, external_id: str | None = None,
                    contains: str | None = None, tenant: str = DEFAULT_TENANT) -> IdentityPage:
    """A page of identities by id, narrowed to an exact ``external_id`` and/or a ``contains`` text search."""
    # one more than asked: is there a next page?
    items = service.store.list_identities(limit + 1, cursor, external_id=external_id, contains=contains,
                                          tenant=tenant)
    page = items[:limit]
    return IdentityPage(page, page[-1].id if len(items) > limit else None)


def get_identity(service: FaceService, identity_id: str, tenant: str = DEFAULT_TENANT) -> IdentityDetail:
    identity = service.store.get_identity(identity_id, tenant=tenant)
    stale = sum(service.active.key not in f.models for f in service.store.list_faces(identity_id, tenant=tenant))
    return IdentityDetail(identity, stale)


def update_identity(service: FaceService, identity_id: str, changes: dict[str, Any],
                    actor: Actor = NO_ACTOR) -> Identity:
    """Apply ``changes`` (external_id, name, metadata); None clears a field."""
    if "metadata" in changes and changes["metadata"] is None:
        changes = {**changes, "metadata": {}}  # null clears it, like name and external_id
    with stage("store"):
        return service.store.update_identity(identity_id, changes, actor)


def delete_identity(service: FaceService, identity_id: str, actor: Actor = NO_ACTOR) -> None:
    """Delete the identity and all its faces; erased from search before this returns."""
    model = service.active
    with stage("store"):
        model.gallery.delete_identity(identity_id, actor, also=service.others(model))


async def enroll(service: FaceService, identity_id: str, images: list[ImageIn], retain_crop: bool | None,
                 actor: Actor = NO_ACTOR) -> list[Face]:
    """Enroll the faces found in ``images`` in one transaction; searchable before this returns."""
    # 404 before any inference (another tenant's identity too)
    await to_thread.run_sync(timed("store", partial(service.store.get_identity, tenant=actor.tenant)), identity_id)
    retain = keep_crops(service, retain_crop)
    found = await _enrollable_faces(service, images)
    model, vectors, also = await _embeddings(service, found)

    def store() -> list[Face]:
        crops = _retained_crops(found, retain)
        with stage("store"):
            return model.gallery.enroll(identity_id, vectors, crops, [f.face.box for f in found],
                                        [f.face.quality for f in found], actor, also)

    return await to_thread.run_sync(store)


async def _embeddings(service: FaceService, found: list[FoundFace]) -> tuple[ServedModel, np.ndarray, Mirrors]:
    """The faces embedded by the active model and, while there is one, by the candidate model too.

    The candidate's embeddings are stored beside the active's, so faces enrolled during an upgrade need
    no re-embedding. A candidate that cannot answer does not fail the enrolment: its embeddings are then
    made later from the retained crop (``cdface gallery reembed``), and coverage says so until then.
    """
    model, candidate = service.active, service.candidate
    vectors = await embed_faces(model.embedder, found)
    if candidate is None or candidate is model:
        return model, vectors, ()
    try:
        return model, vectors, ((candidate.gallery, await embed_faces(candidate.embedder, found)),)
    except ServingError as exc:
        log.warning("enrolment: the candidate model %s did not embed (%s); re-embedding will", candidate.ref,
                    type(exc).__name__)
        return model, vectors, ()


async def _enrollable_faces(service: FaceService, images: list[ImageIn]) -> list[FoundFace]:
    """The faces of ``images``, each passing enrollment's quality floor (else ``low_quality_face``)."""
    found = await find_faces(service, images)
    enrollable(service.settings, found)
    return found


def keep_crops(service: FaceService, retain_crop: bool | None) -> bool:
    """Whether to retain this request's crops (``retain_crop``, else the server's ``retain_crops``).

    A crop is kept only sealed (``crop_keys``): without a key, or with retention turned off on the
    server, none is kept, and a request that asks for one explicitly is refused (crop_retention_off)
    rather than answered as if its crops were kept.
    """
    settings = service.settings
    wanted = settings.retain_crops if retain_crop is None else retain_crop
    if not wanted:
        return False
    if settings.retain_crops and settings.crop_keys is not None:
        return True
    if retain_crop:
        why = "retain_crops is off on this server" if not settings.retain_crops else \
            "no crop key is configured on this server (CDFACE_SERVE_CROP_KEYS)"
        raise InvalidRequest(f"crops cannot be retained: {why}; enroll with retain_crop false",
                             code="crop_retention_off")
    return False


def _retained_crops(found: list[FoundFace], retain: bool) -> list[bytes | None]:
    """The crops to keep, as PNG (blocking work: call it in a worker thread); the store seals them."""
    return [encode_png(f.face.crop) if retain else None for f in found]


def list_faces(service: FaceService, identity_id: str, limit: int, cursor: int | None,
               tenant: str = DEFAULT_TENANT) -> FacePage:
    """A page of the identity's faces by id (``cursor``: the last face id of the previous page)."""
    items = service.store.list_faces(identity_id, limit + 1, cursor, tenant=tenant)  # one more: a next page?
    page = items[:limit]
    return FacePage(page, str(page[-1].id) if len(items) > limit else None)


def face_crop(service: FaceService, identity_id: str, face_id: int, tenant: str = DEFAULT_TENANT) -> bytes:
    """The retained aligned crop of a face, PNG (``NotFound`` when there is none)."""
    return service.store.face_crop(identity_id, face_id, tenant=tenant)


def delete_face(service: FaceService, identity_id: str, face_id: int, actor: Actor = NO_ACTOR) -> None:
    """Delete one face; erased from search before this returns."""
    model = service.active
    with stage("store"):
        model.gallery.delete_face(identity_id, face_id, actor, also=service.others(model))
