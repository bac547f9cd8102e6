"""Recognition: embeddings of the faces in images, 1:1 verification and 1:N identification.

A match is decided by ``Decision.accepts``, the one place serving applies the match rule
(``cdface.core.matching.is_match``: similarity strictly above the threshold), the rule evaluation
picked the manifest's thresholds with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from anyio import to_thread

from cdface.core.matching import cosine, is_match
from cdface.serving.errors import InvalidRequest
from cdface.serving.store import Identity
from cdface.serving.usecases.images import FoundFace, ImageIn, embed_faces, find_faces

if TYPE_CHECKING:
    from cdface.serving.service import FaceService


@dataclass(frozen=True)
class Decision:
    """The threshold a request is decided with, where it comes from, and the FAR it is for (when known)."""

    threshold: float
    source: str  # "manifest" (the model's evaluation at the FAR) or "configured"
    far: float | None

    def accepts(self, similarity: float) -> bool:
        return bool(is_match(similarity, self.threshold))


def decide(service: FaceService, far: float | None) -> Decision:
    """The decision for a request asking for ``far`` (None: the server's FAR)."""
    settings, evaluation = service.settings, service.manifest.evaluation
    wanted = settings.far if far is None else far
    if evaluation is not None:
        try:
            return Decision(evaluation.threshold_at(wanted), "manifest", wanted)
        except KeyError:
            pass
    if far is None or abs(far - settings.far) <= 1e-12:
        return Decision(settings.threshold, "configured", None)
    have = sorted(evaluation.thresholds) if evaluation else []
    raise InvalidRequest(f"no threshold for FAR {far:g}: the model's manifest has {have or 'none'}; omit 'far' to "
                         f"use the server's configured threshold", code="far_not_available")


@dataclass(frozen=True)
class EmbeddedFaces:
    faces: list[FoundFace]
    vectors: np.ndarray  # float32 [len(faces), D], L2-normalised


async def embed(service: FaceService, images: list[ImageIn]) -> EmbeddedFaces:
    faces = await find_faces(service, images)
    return EmbeddedFaces(faces, await embed_faces(service.embedder, faces))


@dataclass(frozen=True)
class Verification:
    decision: Decision
    similarity: float
    match: bool
    identity_id: str | None
    faces: list[FoundFace]  # the face compared from each image


async def verify(service: FaceService, image: ImageIn, other: ImageIn | None, identity_id: str | None,
                 far: float | None) -> Verification:
    """``image`` against ``other`` (another image) or against ``identity_id``'s enrolled faces (its best one)."""
    decision = decide(service, far)
    if identity_id is not None:
        await to_thread.run_sync(service.store.get_identity, identity_id)  # 404 before any inference
    found = await find_faces(service, [image] + ([other] if other is not None else []))
    faces = [f for f in found if f.image == 0][:1] + [f for f in found if f.image == 1][:1]
    vectors = await embed_faces(service.embedder, faces)
    if identity_id is not None:
        enrolled = await to_thread.run_sync(service.gallery.identity_embeddings, identity_id)
        if enrolled.size == 0:
            raise InvalidRequest(f"identity {identity_id!r} has no faces made by the served model "
                                 f"{service.model_key}", code="identity_has_no_faces")
        similarity = cosine((enrolled @ vectors[0]).max())
    else:
        similarity = cosine(vectors[0] @ vectors[1])
    return Verification(decision, similarity, decision.accepts(similarity), identity_id, faces)


@dataclass(frozen=True)
class Candidate:
    identity: Identity
    face_id: int  # the identity's face that scored best
    similarity: float
    match: bool


@dataclass(frozen=True)
class IdentifiedFace:
    face: FoundFace
    candidates: list[Candidate]  # best first
    match: Candidate | None  # the best candidate, when it is a match


@dataclass(frozen=True)
class Identification:
    decision: Decision
    faces: list[IdentifiedFace]


async def identify(service: FaceService, image: ImageIn, top_k: int, far: float | None) -> Identification:
    """Per face in ``image``, the ``top_k`` most similar enrolled identities."""
    if top_k > service.settings.max_top_k:
        raise InvalidRequest(f"top_k must be at most {service.settings.max_top_k}")
    decision = decide(service, far)
    found = await find_faces(service, [image])
    vectors = await embed_faces(service.embedder, found)
    hits = await to_thread.run_sync(service.gallery.search, vectors, top_k)
    identities = await to_thread.run_sync(service.store.identities_by_id, [c.identity_id for row in hits for c in row])
    faces = []
    for face, row in zip(found, hits):
        candidates = [Candidate(identities[c.identity_id], c.face_id, c.similarity, decision.accepts(c.similarity))
                      for c in row if c.identity_id in identities]  # not those deleted since the search
        faces.append(IdentifiedFace(face, candidates, candidates[0] if candidates and candidates[0].match else None))
    return Identification(decision, faces)
