"""What the gateway answers, as typed models of the client's own (the client never imports the server).

Fields the server adds later are ignored, so an older client keeps working against a newer gateway.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ModelInfo(_Answer):
    name: str
    version: int
    embedding_size: int
    triton_model: str


class Quality(_Answer):
    score: float | None = None  # detector confidence
    face_size: float | None = None  # shorter side of the face box, pixels
    sharpness: float | None = None  # variance of the Laplacian of the aligned crop (low = blurred)


class DetectedFace(_Answer):
    image: int  # index of the image in the request
    box: list[float] | None = None  # x, y, width, height
    landmarks: list[list[float]] | None = None
    quality: Quality


class Detection(_Answer):
    faces: list[DetectedFace]


class FaceEmbedding(DetectedFace):
    embedding: list[float]


class Embeddings(_Answer):
    model: ModelInfo
    faces: list[FaceEmbedding]


class _Decision(_Answer):
    threshold: float
    threshold_source: str
    far: float | None = None


class Verification(_Decision):
    match: bool
    similarity: float
    model: ModelInfo
    identity_id: str | None = None
    faces: list[DetectedFace]


class Candidate(_Answer):
    identity_id: str
    external_id: str | None
    name: str | None
    face_id: int
    similarity: float
    match: bool


class IdentifiedFace(DetectedFace):
    candidates: list[Candidate]
    match: Candidate | None = None


class Identification(_Decision):
    model: ModelInfo
    faces: list[IdentifiedFace]


class Identity(_Answer):
    id: str
    external_id: str | None
    name: str | None
    metadata: dict[str, Any]
    created: str
    updated: str
    face_count: int
    faces_needing_reenrolment: int | None = None


class IdentityPage(_Answer):
    items: list[Identity]
    next_cursor: str | None = None


class Face(_Answer):
    id: int
    identity_id: str
    model: str  # the model that enrolled it
    current: bool  # embedded by the served model (searchable)
    models: list[str] = []  # every model that embedded it
    created: str
    has_crop: bool
    box: list[float] | None = None
    quality: dict[str, float]


class FacePage(_Answer):
    items: list[Face]
    next_cursor: str | None = None


class Enrollment(_Answer):
    faces: list[Face]


class GalleryStatus(_Answer):
    model: str
    faces_indexed: int
    faces_other_models: dict[str, int]
    faces_not_searchable: int = 0
    index_kind: str
    on_gpu: bool
    loaded_in_s: float
    consistent: bool
    store_faces: int


class Health(_Answer):
    status: Literal["ok"]


class SyncStatus(_Answer):
    applied_seq: int
    store_seq: int
    behind: int
    seconds_since_sync: float | None = None


class Readiness(_Answer):
    status: Literal["ready", "not_ready"]
    triton: bool
    gallery: bool
    model: ModelInfo
    sync: SyncStatus | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"
