"""Recognition: face detection, embeddings of the faces in images, 1:1 verification and 1:N identification.

Verification and identification take a face as an image or as an embedding the caller made with the
served model (``given_embedding`` checks and normalises it); a given embedding costs no Triton call.

A match is decided by ``Decision.accepts``, the one place serving applies the match rule
(``cdface.core.matching.is_match``: similarity strictly above the threshold), the rule evaluation
picked the manifest's thresholds with.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Sequence

import numpy as np
from anyio import to_thread

from cdface.core.matching import cosine, is_match
from cdface.serving.errors import InvalidRequest
from cdface.serving.metrics import timed
from cdface.serving.store import NO_ACTOR, Actor, Identity
from cdface.serving.usecases.images import FoundFace, ImageIn, embed_checked, embed_faces, find_faces

log = logging.getLogger("cdface.serving.recognition")

if TYPE_CHECKING:
    from cdface.core.manifest import ModelManifest
    from cdface.serving.service import FaceService, ServedModel
    from cdface.serving.settings import Settings


@dataclass(frozen=True)
class Decision:
    """The threshold a request is decided with, where it comes from, and the FAR it is for (when known)."""

    threshold: float
    source: str  # "manifest" (the model's evaluation at the FAR) or "configured"
    far: float | None

    def accepts(self, similarity: float) -> bool:
        return bool(is_match(similarity, self.threshold))


def decide(settings: Settings, manifest: ModelManifest, far: float | None) -> Decision:
    """The decision for a request asking for ``far`` (None: the server's FAR), with the thresholds of the
    model that answers it (``manifest``): the threshold switches with the model.

    A client may make decisions stricter, never looser than the server's floor (``threshold_floor``,
    by default the server's own threshold): a looser FAR is refused, not clamped, so the caller
    never believes it got a decision it did not get.
    """
    decision = _decision_at(settings, manifest, far)
    if far is not None:
        floor = settings.threshold_floor
        if floor is None:
            floor = _decision_at(settings, manifest, None).threshold
        if decision.threshold < floor:
            raise InvalidRequest(f"FAR {far:g} means a threshold of {decision.threshold:.4f}, below this server's "
                                 f"floor of {floor:.4f}; ask for a lower FAR or omit 'far'",
                                 code="threshold_below_floor")
    return decision


def _decision_at(settings: Settings, manifest: ModelManifest, far: float | None) -> Decision:
    evaluation = manifest.evaluation
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
    model: ServedModel  # the model that made the embeddings
    faces: list[FoundFace]
    vectors: np.ndarray  # float32 [len(faces), D], L2-normalised


async def detect(service: FaceService, images: list[ImageIn]) -> list[FoundFace]:
    """The faces in ``images`` (boxes, landmarks, quality) without embedding them: no Triton call."""
    return await find_faces(service, images)


async def embed(service: FaceService, images: list[ImageIn]) -> EmbeddedFaces:
    model = service.active  # read once: a model switch never mixes two models in one answer
    faces, vectors = await embed_checked(service, model.embedder, await find_faces(service, images, check_later=True))
    return EmbeddedFaces(model, faces, vectors)


def given_embedding(model: ServedModel, values: Sequence[float], field: str) -> np.ndarray:
    """A caller's embedding as a float32 unit vector; refused unless it has the served model's size and is finite."""
    size = model.manifest.embedding_size
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (size,):
        raise InvalidRequest(f"'{field}' has {vector.size} values; the served model {model.key} makes "
                             f"{size}-d embeddings", code="embedding_size_mismatch")
    if not np.isfinite(vector).all():
        raise InvalidRequest(f"'{field}' holds a value that is not a finite number", code="embedding_not_finite")
    peak = float(np.abs(vector).max())
    if peak == 0.0:
        raise InvalidRequest(f"'{field}' is all zeros: it has no direction to compare", code="embedding_zero")
    vector = vector / peak  # first to the unit cube: squaring 1e200 would overflow the norm
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _one_probe(image: ImageIn | None, embedding: Sequence[float] | None) -> None:
    if (image is None) == (embedding is None):
        raise InvalidRequest("give exactly one of 'image' and 'embedding'", code="image_or_embedding")


@dataclass(frozen=True)
class Verification:
    model: ServedModel  # the model that answered
    decision: Decision
    similarity: float
    match: bool
    identity_id: str | None
    faces: list[FoundFace]  # the face compared from each image


@dataclass(frozen=True)
class VerifyTarget:
    """What the probe is compared with: exactly one of another image, another embedding, an enrolled identity."""

    other: ImageIn | None = None
    other_embedding: Sequence[float] | None = None
    identity_id: str | None = None


async def verify(service: FaceService, image: ImageIn | None, embedding: Sequence[float] | None,
                 target: VerifyTarget, far: float | None, actor: Actor = NO_ACTOR) -> Verification:
    """The probe (``image`` or ``embedding``) against ``target``: another face, or an identity's best face."""
    _one_probe(image, embedding)
    model = service.active  # read once: a model switch never mixes two models in one answer
    decision = decide(service.settings, model.manifest, far)
    given = [given_embedding(model, values, name) for values, name in
             ((embedding, "embedding"), (target.other_embedding, "other_embedding")) if values is not None]
    if target.identity_id is not None:
        # 404 before any inference
        await to_thread.run_sync(timed("store", partial(service.store.get_identity, tenant=actor.tenant)),
                                 target.identity_id)
    images = [i for i in (image, target.other) if i is not None]
    found = await find_faces(service, images, check_later=True) if images else []
    faces = [f for f in found if f.image == 0][:1] + [f for f in found if f.image == 1][:1]
    embedded: list[np.ndarray] = []
    if faces:
        faces, made = await embed_checked(service, model.embedder, faces)
        embedded = list(made)
    # The probe first, then the other face (when the target is one): from an image or given.
    vectors = [embedded.pop(0) if image is not None else given.pop(0)]
    if target.identity_id is None:
        vectors.append(embedded.pop(0) if target.other is not None else given.pop(0))
        similarity = cosine(vectors[0] @ vectors[1])
    else:
        enrolled = await to_thread.run_sync(timed("store", model.gallery.identity_embeddings), target.identity_id,
                                            actor.tenant)
        if enrolled.size == 0:
            raise InvalidRequest(f"identity {target.identity_id!r} has no faces made by the served model "
                                 f"{model.key}", code="identity_has_no_faces")
        similarity = cosine((enrolled @ vectors[0]).max())
    verification = Verification(model, decision, similarity, decision.accepts(similarity), target.identity_id, faces)
    if verification.match and target.identity_id is not None:
        service.last_seen.saw(identity_ids=[target.identity_id])  # memory only; written in the background
    # The audit row records the decision only: no similarity, image or embedding.
    await to_thread.run_sync(timed("store", service.store.append_audit), actor, "verify", target.identity_id, (),
                             {"match": verification.match})
    return verification


@dataclass(frozen=True)
class Candidate:
    identity: Identity
    face_id: int  # the identity's face that scored best
    similarity: float
    match: bool


@dataclass(frozen=True)
class IdentifiedFace:
    face: FoundFace | None  # None for a given embedding
    candidates: list[Candidate]  # best first
    match: Candidate | None  # the best candidate, when it is a match


@dataclass(frozen=True)
class Identification:
    model: ServedModel  # the model that answered
    decision: Decision
    faces: list[IdentifiedFace]


async def identify(service: FaceService, image: ImageIn | None, embedding: Sequence[float] | None, top_k: int,
                   far: float | None, actor: Actor = NO_ACTOR, non_matches: bool = True) -> Identification:
    """Per face in ``image`` (or for the given ``embedding``), the ``top_k`` most similar enrolled identities.

    ``non_matches`` False (data minimisation: the caller's key lacks the ``candidates`` scope): only the
    candidates that match are returned; who else merely resembled the face is not disclosed.
    """
    _one_probe(image, embedding)
    if top_k > service.settings.max_top_k:
        raise InvalidRequest(f"top_k must be at most {service.settings.max_top_k}")
    model = service.active  # read once: a model switch never mixes two models in one answer
    decision = decide(service.settings, model.manifest, far)
    found: list[FoundFace | None]
    if image is not None:
        detected, vectors = await embed_checked(service, model.embedder,
                                                await find_faces(service, [image], check_later=True))
        found = list(detected)
    else:
        assert embedding is not None
        found, vectors = [None], given_embedding(model, embedding, "embedding")[None]

    def answer() -> tuple[list[IdentifiedFace], list[str | None]]:
        # One worker-thread hop for the search, the names and the audit row. Only the caller's tenant is
        # searched (its own index), and only its identities are named.
        hits = timed("search", model.gallery.search)(vectors, top_k, actor.tenant)
        identities = timed("store", partial(service.store.identities_by_id, tenant=actor.tenant))(
            [c.identity_id for row in hits for c in row])
        faces: list[IdentifiedFace] = []
        top1: list[str | None] = []
        for face, row in zip(found, hits):
            candidates = [Candidate(identities[c.identity_id], c.face_id, c.similarity,
                                    decision.accepts(c.similarity))
                          for c in row if c.identity_id in identities]  # not those deleted since the search
            top1.append(candidates[0].identity.id if candidates else None)  # before minimisation: the audit's truth
            shown = candidates if non_matches else [c for c in candidates if c.match]
            faces.append(IdentifiedFace(face, shown, candidates[0] if candidates and candidates[0].match else None))
        # Per face searched: its best candidate's identity id and whether it matched (ids only, no names).
        timed("store", service.store.append_audit)(actor, "identify", None, (), {
            "faces": len(faces), "top1": top1, "match": [face.match is not None for face in faces]})
        return faces, top1

    faces, top1 = await to_thread.run_sync(answer)
    service.last_seen.saw(face_ids=[face.match.face_id for face in faces if face.match is not None])
    if image is not None and detected:
        _shadow(service, model, detected, top1, [face.match is not None for face in faces], far, actor.tenant)
    return Identification(model, decision, faces)


def _shadow(service: FaceService, model: ServedModel, detected: list[FoundFace], top1: list[str | None],
            matched: list[bool], far: float | None, tenant: str) -> None:
    """Now and then (``shadow_share``), have the candidate model answer the same faces in the background
    and count whether it agrees (``cdface.serving.shadow``); the caller's answer never waits for it."""
    candidate, share = service.candidate, service.settings.shadow_share
    if candidate is None or candidate is model or share <= 0.0 or random.random() >= share:
        return
    task = asyncio.get_running_loop().create_task(_compare(service, model, candidate, detected, top1, matched, far,
                                                           tenant))
    service.background.add(task)  # held until done: the loop keeps only weak references to tasks
    task.add_done_callback(service.background.discard)


async def _compare(service: FaceService, model: ServedModel, candidate: ServedModel, detected: list[FoundFace],
                   top1: list[str | None], matched: list[bool], far: float | None, tenant: str) -> None:
    try:
        decision = decide(service.settings, candidate.manifest, far)
        vectors = await embed_faces(candidate.embedder, detected)
        hits = await to_thread.run_sync(candidate.gallery.search, vectors, 1, tenant)
    except Exception as exc:  # the candidate's Triton version unavailable, a FAR its report lacks, ...
        service.shadow.failure(model.ref, candidate.ref)
        log.warning("shadow identification with %s failed: %s", candidate.ref, type(exc).__name__)
        return
    for row, best, was_match in zip(hits, top1, matched):
        theirs = row[0] if row else None
        service.shadow.record(model.ref, candidate.ref,
                              same_decision=(theirs is not None and decision.accepts(theirs.similarity)) == was_match,
                              same_top1=(theirs.identity_id if theirs is not None else None) == best)
