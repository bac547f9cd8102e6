"""Domain results -> response models: the one place the routes' answers are assembled."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cdface.serving import schemas as s
from cdface.serving.service import FaceService, ServedModel
from cdface.serving.store import Face, Identity, ModelKey
from cdface.serving.usecases.images import FoundFace
from cdface.serving.usecases.operations import GalleryReport, Readiness
from cdface.serving.usecases.recognition import Candidate, Decision, EmbeddedFaces, Identification, Verification


def model_info(model: ServedModel) -> s.ModelInfo:
    """The model that made an answer: its manifest's identity and where Triton serves it."""
    return s.ModelInfo(name=model.manifest.name, version=model.manifest.version,
                       embedding_size=model.manifest.embedding_size, triton_model=model.ref.name,
                       triton_version=model.ref.version)


def _detected(found: FoundFace | None) -> dict[str, Any]:
    if found is None:  # a face given as an embedding: nothing was detected
        return {"image": 0, "box": None, "landmarks": None, "quality": {}}
    face = found.face
    return {"image": found.image, "box": face.box, "landmarks": face.landmarks, "quality": face.quality}


def detection(found: list[FoundFace]) -> s.DetectResponse:
    return s.DetectResponse(faces=[s.DetectedFace(**_detected(f)) for f in found])


def _decision(decision: Decision) -> dict[str, Any]:
    return {"threshold": decision.threshold, "threshold_source": decision.source, "far": decision.far}


def embeddings(result: EmbeddedFaces) -> s.EmbeddingsResponse:
    return s.EmbeddingsResponse(model=model_info(result.model), faces=[
        s.FaceEmbedding(**_detected(f), embedding=v.tolist()) for f, v in zip(result.faces, result.vectors)])


def verification(result: Verification) -> s.VerifyResponse:
    return s.VerifyResponse(**_decision(result.decision), match=result.match, similarity=result.similarity,
                            model=model_info(result.model), identity_id=result.identity_id,
                            faces=[s.DetectedFace(**_detected(f)) for f in result.faces])


def _candidate(c: Candidate) -> s.CandidateOut:
    return s.CandidateOut(identity_id=c.identity.id, external_id=c.identity.external_id, name=c.identity.name,
                          face_id=c.face_id, similarity=c.similarity, match=c.match)


def identification(result: Identification) -> s.IdentifyResponse:
    return s.IdentifyResponse(**_decision(result.decision), model=model_info(result.model), faces=[
        s.IdentifiedFace(**_detected(f.face), candidates=[_candidate(c) for c in f.candidates],
                         match=_candidate(f.match) if f.match is not None else None) for f in result.faces])


def identity(record: Identity, needing: int | None = None) -> s.IdentityOut:
    return s.IdentityOut(id=record.id, external_id=record.external_id, name=record.name, metadata=record.metadata,
                         created=record.created, updated=record.updated, face_count=record.face_count,
                         faces_needing_reenrolment=needing)


def created_identity(record: Identity, enrolled: list[Face], served: ModelKey) -> s.IdentityCreated:
    return s.IdentityCreated(**identity(record, 0).model_dump(), faces=faces(enrolled, served))


def faces(records: list[Face], served: ModelKey) -> list[s.FaceOut]:
    return [s.FaceOut(id=f.id, identity_id=f.identity_id, model=str(f.model), models=[str(m) for m in f.models],
                      current=served in f.models,
                      created=f.created, has_crop=f.has_crop, box=f.box, quality=f.quality) for f in records]


def readiness(service: FaceService, result: Readiness) -> s.ReadinessOut:
    return s.ReadinessOut(status="ready" if result.ready else "not_ready", triton=result.triton,
                          gallery=result.gallery, model=model_info(service.active),
                          sync=s.SyncStatus(**asdict(result.sync)) if result.sync is not None else None)


def gallery_status(report: GalleryReport) -> s.GalleryStatusOut:
    return s.GalleryStatusOut(**asdict(report.status), consistent=report.consistent, store_faces=report.store_faces)
