"""The identity gallery: identities, and the faces enrolled for them.

Writes that touch faces go through the gallery (store first, then the index; see
``cdface.serving.gallery``); the rest reads and writes the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anyio import to_thread

from cdface.core.imaging import encode_png
from cdface.serving.store import NO_ACTOR, Actor, Face, Identity
from cdface.serving.usecases.images import FoundFace, ImageIn, embed_faces, enrollable, find_faces

if TYPE_CHECKING:
    from cdface.serving.service import FaceService


@dataclass(frozen=True)
class IdentityDetail:
    identity: Identity
    faces_needing_reenrolment: int  # faces made by another model than the served one


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
        return CreatedIdentity(await to_thread.run_sync(service.store.create_identity, external_id, name, metadata,
                                                        actor), [])
    found = await _enrollable_faces(service, images)
    vectors = await embed_faces(service.embedder, found)

    def store() -> tuple[Identity, list[Face]]:
        crops = _retained_crops(service, found, retain_crop)
        return service.gallery.create_identity(external_id, name, metadata, vectors, crops,
                                               [f.face.box for f in found], [f.face.quality for f in found], actor)

    identity, faces = await to_thread.run_sync(store)
    return CreatedIdentity(identity, faces)


def list_identities(service: FaceService, limit: int, cursor: str | None, external_id: str | None = None,
                    contains: str | None = None) -> IdentityPage:
    """A page of identities by id, narrowed to an exact ``external_id`` and/or a ``contains`` text search."""
    # one more than asked: is there a next page?
    items = service.store.list_identities(limit + 1, cursor, external_id=external_id, contains=contains)
    page = items[:limit]
    return IdentityPage(page, page[-1].id if len(items) > limit else None)


def get_identity(service: FaceService, identity_id: str) -> IdentityDetail:
    identity = service.store.get_identity(identity_id)
    stale = sum(f.model != service.model_key for f in service.store.list_faces(identity_id))
    return IdentityDetail(identity, stale)


def update_identity(service: FaceService, identity_id: str, changes: dict[str, Any],
                    actor: Actor = NO_ACTOR) -> Identity:
    """Apply ``changes`` (external_id, name, metadata); None clears a field."""
    if "metadata" in changes and changes["metadata"] is None:
        changes = {**changes, "metadata": {}}  # null clears it, like name and external_id
    return service.store.update_identity(identity_id, changes, actor)


def delete_identity(service: FaceService, identity_id: str, actor: Actor = NO_ACTOR) -> None:
    """Delete the identity and all its faces; erased from search before this returns."""
    service.gallery.delete_identity(identity_id, actor)


async def enroll(service: FaceService, identity_id: str, images: list[ImageIn], retain_crop: bool | None,
                 actor: Actor = NO_ACTOR) -> list[Face]:
    """Enroll the faces found in ``images`` in one transaction; searchable before this returns."""
    await to_thread.run_sync(service.store.get_identity, identity_id)  # 404 before any inference
    found = await _enrollable_faces(service, images)
    vectors = await embed_faces(service.embedder, found)

    def store() -> list[Face]:
        crops = _retained_crops(service, found, retain_crop)
        return service.gallery.enroll(identity_id, vectors, crops, [f.face.box for f in found],
                                      [f.face.quality for f in found], actor)

    return await to_thread.run_sync(store)


async def _enrollable_faces(service: FaceService, images: list[ImageIn]) -> list[FoundFace]:
    """The faces of ``images``, each passing enrollment's quality floor (else ``low_quality_face``)."""
    found = await find_faces(service, images)
    enrollable(service.settings, found)
    return found


def _retained_crops(service: FaceService, found: list[FoundFace], retain_crop: bool | None) -> list[bytes | None]:
    """The crops to keep, as PNG (blocking work: call it in a worker thread)."""
    retain = service.settings.retain_crops if retain_crop is None else retain_crop
    return [encode_png(f.face.crop) if retain else None for f in found]


def list_faces(service: FaceService, identity_id: str, limit: int, cursor: int | None) -> FacePage:
    """A page of the identity's faces by id (``cursor``: the last face id of the previous page)."""
    items = service.store.list_faces(identity_id, limit + 1, cursor)  # one more: is there a next page?
    page = items[:limit]
    return FacePage(page, str(page[-1].id) if len(items) > limit else None)


def face_crop(service: FaceService, identity_id: str, face_id: int) -> bytes:
    """The retained aligned crop of a face, PNG (``NotFound`` when there is none)."""
    return service.store.face_crop(identity_id, face_id)


def delete_face(service: FaceService, identity_id: str, face_id: int, actor: Actor = NO_ACTOR) -> None:
    """Delete one face; erased from search before this returns."""
    service.gallery.delete_face(identity_id, face_id, actor)
