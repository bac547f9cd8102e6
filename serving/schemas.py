"""Request and response models of the HTTP API (``/v1``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cdface.core.imaging import ImageFormat
from cdface.serving.faces import FaceMode

_EXAMPLE_B64 = "/9j/4AAQSkZJRgABAQAAAQABAAD..."


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageInput(_In):
    """One image, base64-encoded (JPEG, PNG or WebP, or an aligned crop's raw pixels), and how to find the face."""

    data: str = Field(description="The image file, base64 (standard alphabet, padding optional).",
                      min_length=1, examples=[_EXAMPLE_B64])
    format: ImageFormat = Field("file", description="file: a JPEG, PNG or WebP file; rgb24: an aligned crop's raw "
                                "pixels, 112 rows of 112 pixels of 3 bytes (R, G, B), 37,632 bytes (mode 'aligned' "
                                "only): nothing to decode, as Triton itself takes them.")
    mode: FaceMode = Field("detect", description="aligned: a 112x112 aligned crop; landmarks: use the five given "
                           "landmarks; detect: the largest detected face; detect_all: every detected face.")
    landmarks: list[list[float]] | None = Field(
        None, description="Five [x, y] points (eyes, nose tip, mouth corners; image-left first), for mode 'landmarks'.",
        examples=[[[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]])
    min_face_size: float = Field(0.0, ge=0, le=100_000,
                                 description="Detected faces smaller than this (pixels) are ignored.")
    min_score: float = Field(0.0, ge=0, le=1, description="Detected faces with a lower detector score are ignored.")

    @model_validator(mode="after")
    def _pixels_are_a_crop(self) -> ImageInput:
        if self.format == "rgb24" and self.mode != "aligned":
            raise ValueError("format 'rgb24' is an aligned crop's pixels: use it with mode 'aligned'")
        return self


class ModelInfo(BaseModel):
    """The model that made an answer (during an upgrade, answers name the model that made each one)."""

    name: str = Field(description="The model's name in its manifest.")
    version: int = Field(description="The model's version in its manifest.")
    embedding_size: int
    triton_model: str = Field(description="The Triton model that served it.")
    triton_version: int = Field(description="The Triton version that served it.")


class Decision(BaseModel):
    threshold: float = Field(description="Cosine similarity above which two faces are called the same person (the "
                                         "evaluation report's rule: accept when similarity > threshold).")
    threshold_source: str = Field(description="'manifest' (from the model's evaluation at the FAR) or 'configured'.")
    far: float | None = Field(description="The target false accept rate the threshold is for, when known.")


class Quality(BaseModel):
    model_config = ConfigDict(extra="allow")
    score: float | None = Field(None, description="Detector confidence.")
    face_size: float | None = Field(None, description="Shorter side of the face box, pixels.")
    sharpness: float | None = Field(None, description="Variance of the Laplacian of the aligned crop (low = blurred).")


class DetectedFace(BaseModel):
    image: int = Field(description="Index of the image in the request.")
    box: list[float] | None = Field(None, description="x, y, width, height in the image (detected faces).")
    landmarks: list[list[float]] | None = None
    quality: Quality


# -- embeddings ---------------------------------------------------------------------------------


class ImageRequest(_In):
    # A request carrying images: ``image_inputs`` lists them in request order (files come in that order too).
    def image_inputs(self) -> list[ImageInput]:
        raise NotImplementedError


class _ImagesIn(ImageRequest):
    images: list[ImageInput]

    def image_inputs(self) -> list[ImageInput]:
        return list(self.images)


class EmbeddingsRequest(_ImagesIn):
    images: list[ImageInput] = Field(min_length=1, description="Images to embed (one inference batch).")


class FaceEmbedding(DetectedFace):
    embedding: list[float]


class EmbeddingsResponse(BaseModel):
    model: ModelInfo
    faces: list[FaceEmbedding]


# -- detection ------------------------------------------------------------------------------------


class DetectRequest(_ImagesIn):
    images: list[ImageInput] = Field(min_length=1, description="Images to find faces in (no embedding is made).")


class DetectResponse(BaseModel):
    faces: list[DetectedFace] = Field(description="The faces found, in image order (largest first per image).")


# -- verify / identify ----------------------------------------------------------------------------


# An embedding made elsewhere by the served model: checked (length, finite) and L2-normalised by the server.
_EMBEDDING_LIMIT = 4096


class VerifyRequest(ImageRequest):
    image: ImageInput | None = Field(None, description="The face to verify (give this or 'embedding').")
    embedding: list[float] | None = Field(
        None, max_length=_EMBEDDING_LIMIT, description="The face to verify as an embedding of the served model "
        "(instead of 'image'; JSON bodies only). Its length must be the model's embedding size.")
    other: ImageInput | None = Field(None, description="The second image (against an image).")
    other_embedding: list[float] | None = Field(None, max_length=_EMBEDDING_LIMIT,
                                                description="The second face as an embedding (JSON bodies only).")
    identity_id: str | None = Field(None, max_length=64, description="An enrolled identity (its best face counts).")
    far: float | None = Field(None, gt=0, lt=1, description="Target FAR for the decision; default: the server's.")

    @model_validator(mode="after")
    def _one_target(self) -> "VerifyRequest":
        if sum(x is not None for x in (self.other, self.other_embedding, self.identity_id)) != 1:
            raise ValueError("give exactly one of 'other' (an image), 'other_embedding' and 'identity_id'")
        return self

    def image_inputs(self) -> list[ImageInput]:
        return [i for i in (self.image, self.other) if i is not None]


class VerifyResponse(Decision):
    match: bool
    similarity: float
    model: ModelInfo
    identity_id: str | None = None
    faces: list[DetectedFace] = Field(description="The face compared from each image given ('image' is its index "
                                                  "among the request's images); none for embeddings.")


class IdentifyRequest(ImageRequest):
    image: ImageInput | None = Field(None, description="The photo whose faces to identify (give this or "
                                                       "'embedding').")
    embedding: list[float] | None = Field(
        None, max_length=_EMBEDDING_LIMIT, description="One face as an embedding of the served model (instead of "
        "'image'; JSON bodies only). Its length must be the model's embedding size.")
    top_k: int = Field(5, ge=1, le=100)
    far: float | None = Field(None, gt=0, lt=1)

    @field_validator("top_k", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true would otherwise count as 1
            raise ValueError("top_k must be an integer, not a boolean")
        return value

    def image_inputs(self) -> list[ImageInput]:
        return [self.image] if self.image is not None else []


class CandidateOut(BaseModel):
    identity_id: str
    external_id: str | None
    name: str | None
    face_id: int
    similarity: float
    match: bool


class IdentifiedFace(DetectedFace):
    candidates: list[CandidateOut]
    match: CandidateOut | None = Field(description="The best candidate when its similarity is above the threshold.")


class IdentifyResponse(Decision):
    model: ModelInfo
    faces: list[IdentifiedFace] = Field(description="Per face found in the image; for an 'embedding' one entry "
                                                    "(image 0, no box, landmarks or quality).")


# -- identities and faces -------------------------------------------------------------------------

_EXTERNAL_ID = Field(None, min_length=1, max_length=256, pattern=r"^[\x21-\x7e][\x20-\x7e]*$",
                     description="Your own unique id for this person (printable ASCII).")


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value)) > 16_384:
        raise ValueError("metadata must be at most 16 KiB of JSON")
    return value


class IdentityCreate(_In):
    external_id: str | None = _EXTERNAL_ID
    name: str | None = Field(None, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    images: list[ImageInput] = Field(default_factory=list, description="Faces to enroll with the identity, in the "
                                     "same transaction: if any image is refused, no identity is created.")
    retain_crop: bool | None = Field(None, description="Keep the aligned crops for re-embedding; default: server "
                                                       "setting.")

    _meta = field_validator("metadata")(_check_metadata)

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"external_id": "employee-1042", "name": "Barack Obama", "metadata": {"team": "demo"}}]})


class IdentityUpdate(_In):
    external_id: str | None = _EXTERNAL_ID
    name: str | None = Field(None, max_length=256)
    metadata: dict[str, Any] | None = None

    _meta = field_validator("metadata")(_check_metadata)


class IdentityOut(BaseModel):
    id: str
    external_id: str | None
    name: str | None
    metadata: dict[str, Any]
    created: str
    updated: str
    face_count: int
    faces_needing_reenrolment: int | None = Field(
        None, description="Faces without the served model's embedding (not searchable until re-embedded or "
                          "re-enrolled).")


class IdentityPage(BaseModel):
    items: list[IdentityOut]
    next_cursor: str | None


class EnrollRequest(_ImagesIn):
    images: list[ImageInput] = Field(min_length=1)
    retain_crop: bool | None = Field(None, description="Keep the aligned crops for re-embedding; default: server "
                                                       "setting.")


class FaceOut(BaseModel):
    id: int
    identity_id: str
    model: str = Field(description="The model that enrolled it.")
    models: list[str] = Field(description="Every model that embedded it (side by side): the enrolling one, models "
                              "re-embedded to since, a candidate that was ready at enrolment.")
    current: bool = Field(description="Embedded by the served model (searchable); false: re-embed or re-enrol it.")
    created: str
    has_crop: bool
    box: list[float] | None
    quality: dict[str, float]


class FaceList(BaseModel):
    items: list[FaceOut]
    next_cursor: str | None = Field(None, description="Pass as 'cursor' for the next page; null on the last page.")


class EnrollResponse(BaseModel):
    faces: list[FaceOut]


class IdentityCreated(IdentityOut):
    faces: list[FaceOut] = Field(default_factory=list, description="The faces enrolled with it ('images').")


# -- operations -----------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"] = Field(
        description="ready: the gallery is loaded and its database answers (on PostgreSQL: this replica is in "
                    "step with the change log). Triton is not part of it.")
    triton: bool = Field(description="Triton reports the served model ready. When false the gateway stays "
                                     "ready; inference answers 503 model_unavailable with Retry-After.")
    gallery: bool = Field(description="The search index is loaded.")
    model: ModelInfo


class SyncStatus(BaseModel):
    """A gateway's place in its store's change log."""

    applied_seq: int
    store_seq: int
    behind: int
    seconds_since_sync: float | None


class ReadinessOut(Readiness):
    sync: SyncStatus | None = None


class GalleryStatusOut(BaseModel):
    model: str
    faces_indexed: int
    faces_other_models: dict[str, int] = Field(description="Faces embedded by each other model (side by side with "
                                               "the served model's embedding, or alone).")
    faces_not_searchable: int = Field(description="Faces without the served model's embedding: not searchable until "
                                      "re-embedded (`cdface gallery reembed`) or re-enrolled.")
    index_kind: str
    on_gpu: bool
    loaded_in_s: float
    consistent: bool
    store_faces: int


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
