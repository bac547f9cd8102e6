"""What the sync and async clients share: each API call as a ``Call`` (request + how to read the answer),
the images and embeddings a caller may pass, and the retry policy. Sending is all they do themselves.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Literal, Sequence, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from cdface.client import models as m
from cdface.client.errors import CdfaceConnectionError, error_class

T = TypeVar("T")
FaceMode = Literal["aligned", "landmarks", "detect", "detect_all"]


@dataclass(frozen=True)
class FaceImage:
    """An image plus how the gateway should find the face in it (see the API's ``ImageInput``)."""

    data: bytes | str | os.PathLike[str]  # the file's bytes, or its path
    mode: FaceMode = "detect"
    # "rgb24": ``data`` is an aligned crop's raw pixels (112 x 112 x 3 bytes, RGB; ``crop.tobytes()`` of a
    # uint8 numpy array), sent with mode "aligned": nothing to encode here or decode there.
    format: Literal["file", "rgb24"] = "file"
    landmarks: Sequence[Sequence[float]] | None = None  # five [x, y] points, for mode "landmarks"
    min_face_size: float = 0.0
    min_score: float = 0.0


ImageSource = Union[bytes, str, "os.PathLike[str]", FaceImage]
"""An image: its bytes, a path to it (``str`` is always a path), or a ``FaceImage``."""

Embedding = Sequence[float]
"""An embedding made by the served model: any sequence of floats (a list, a 1-d numpy array)."""


class Unset(enum.Enum):
    """"Leave this field as it is" in ``update_identity`` (``None`` clears a field)."""

    UNSET = "unset"


UNSET = Unset.UNSET


def _image_json(image: ImageSource, mode: FaceMode | None) -> dict[str, Any]:
    spec = image if isinstance(image, FaceImage) else FaceImage(image)
    raw = spec.data if isinstance(spec.data, bytes) else Path(spec.data).read_bytes()
    body: dict[str, Any] = {"data": base64.b64encode(raw).decode("ascii"), "mode": mode or spec.mode}
    if spec.format != "file":
        body["format"] = spec.format
    if spec.landmarks is not None:
        body["landmarks"] = [[float(x), float(y)] for x, y in spec.landmarks]
    if spec.min_face_size:
        body["min_face_size"] = spec.min_face_size
    if spec.min_score:
        body["min_score"] = spec.min_score
    return body


def _images_json(images: ImageSource | Iterable[ImageSource], mode: FaceMode | None) -> list[dict[str, Any]]:
    if isinstance(images, (bytes, str, os.PathLike, FaceImage)):  # one image
        return [_image_json(images, mode)]
    return [_image_json(i, mode) for i in images]


def _vector(embedding: Embedding) -> list[float]:
    return [float(x) for x in embedding]


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


# -- calls ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how its 2xx answer becomes a ``T``."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    also_ok: tuple[int, ...] = ()  # non-2xx statuses that are an answer, not an error (readiness: 503)
    retry: bool = True  # retried on 503/429 (False where a 503 is itself the answer)

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        params = {k: v for k, v in self.params.items() if v is not None}
        return http.build_request(self.method, self.path, json=self.json, params=params)


def _model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: cls.model_validate_json(response.content)


def _nothing(response: httpx.Response) -> None:
    return None


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def detect(images: ImageSource | Iterable[ImageSource], mode: FaceMode | None) -> Call[m.Detection]:
    return Call("POST", "/v1/detect", _model(m.Detection), json={"images": _images_json(images, mode)})


def embed(images: ImageSource | Iterable[ImageSource], mode: FaceMode | None) -> Call[m.Embeddings]:
    return Call("POST", "/v1/embeddings", _model(m.Embeddings), json={"images": _images_json(images, mode)})


def verify(image: ImageSource | None, embedding: Embedding | None, other: ImageSource | None,
           other_embedding: Embedding | None, identity_id: str | None, far: float | None) -> Call[m.Verification]:
    body: dict[str, Any] = {
        "image": _image_json(image, None) if image is not None else None,
        "embedding": _vector(embedding) if embedding is not None else None,
        "other": _image_json(other, None) if other is not None else None,
        "other_embedding": _vector(other_embedding) if other_embedding is not None else None,
        "identity_id": identity_id, "far": far}
    return Call("POST", "/v1/verify", _model(m.Verification), json={k: v for k, v in body.items() if v is not None})


def identify(image: ImageSource | None, embedding: Embedding | None, top_k: int,
             far: float | None) -> Call[m.Identification]:
    body: dict[str, Any] = {"image": _image_json(image, None) if image is not None else None,
                            "embedding": _vector(embedding) if embedding is not None else None,
                            "top_k": top_k, "far": far}
    return Call("POST", "/v1/identify", _model(m.Identification), json={k: v for k, v in body.items() if v is not None})


def create_identity(external_id: str | None, name: str | None, metadata: dict[str, Any] | None) -> Call[m.Identity]:
    body = {"external_id": external_id, "name": name, "metadata": metadata or {}}
    return Call("POST", "/v1/identities", _model(m.Identity), json={k: v for k, v in body.items() if v is not None})


def list_identities(limit: int, cursor: str | None, external_id: str | None, q: str | None) -> Call[m.IdentityPage]:
    return Call("GET", "/v1/identities", _model(m.IdentityPage),
                params={"limit": limit, "cursor": cursor, "external_id": external_id, "q": q})


def get_identity(identity_id: str) -> Call[m.Identity]:
    return Call("GET", f"/v1/identities/{_segment(identity_id)}", _model(m.Identity))


def update_identity(identity_id: str, external_id: str | None | Unset, name: str | None | Unset,
                    metadata: dict[str, Any] | None | Unset) -> Call[m.Identity]:
    changes = {k: v for k, v in (("external_id", external_id), ("name", name), ("metadata", metadata))
               if v is not UNSET}
    return Call("PATCH", f"/v1/identities/{_segment(identity_id)}", _model(m.Identity), json=changes)


def delete_identity(identity_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/identities/{_segment(identity_id)}", _nothing)


def enroll(identity_id: str, images: ImageSource | Iterable[ImageSource], mode: FaceMode | None,
           retain_crop: bool | None) -> Call[list[m.Face]]:
    body: dict[str, Any] = {"images": _images_json(images, mode)}
    if retain_crop is not None:
        body["retain_crop"] = retain_crop
    return Call("POST", f"/v1/identities/{_segment(identity_id)}/faces",
                lambda r: m.Enrollment.model_validate_json(r.content).faces, json=body)


def list_faces(identity_id: str, limit: int, cursor: str | None) -> Call[m.FacePage]:
    return Call("GET", f"/v1/identities/{_segment(identity_id)}/faces", _model(m.FacePage),
                params={"limit": limit, "cursor": cursor})


def delete_face(identity_id: str, face_id: int) -> Call[None]:
    return Call("DELETE", f"/v1/identities/{_segment(identity_id)}/faces/{int(face_id)}", _nothing)


def get_face_crop(identity_id: str, face_id: int) -> Call[bytes]:
    return Call("GET", f"/v1/identities/{_segment(identity_id)}/faces/{int(face_id)}/crop", _bytes)


def gallery_status() -> Call[m.GalleryStatus]:
    return Call("GET", "/v1/gallery", _model(m.GalleryStatus))


def health() -> Call[m.Health]:
    return Call("GET", "/healthz", _model(m.Health))


def readiness() -> Call[m.Readiness]:
    # 503 with a readiness body is an answer ("not ready"), not an outage to wait out.
    return Call("GET", "/readyz", _model(m.Readiness), also_ok=(503,), retry=False)


# -- answers, errors and retries ------------------------------------------------------------------------

RETRY_STATUSES = (429, 503)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 503 (the model server is away) and 429 answers, and of connections that failed.

    Waits as long as the answer's ``Retry-After`` asks (else ``backoff_s`` doubling), at most
    ``retries`` times and ``max_wait_s`` in all: a wait that would pass that budget is not started,
    and the last error is raised at once. Only requests the server refused as a whole are retried
    (503/429 write nothing), so retrying a POST cannot enrol a face twice.
    """

    retries: int = 3
    max_wait_s: float = 30.0
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0 or self.max_wait_s < 0 or self.backoff_s < 0:
            raise ValueError("retries, max_wait_s and backoff_s must be >= 0")


def retry_after(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())


class Attempts:
    """One call's retry bookkeeping: how many requests were sent, how long was waited."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.sent = 0
        self.waited = 0.0

    def _wait(self, asked: float | None) -> float | None:
        if self.sent > self.policy.retries:
            return None
        wait = asked if asked is not None else self.policy.backoff_s * 2 ** (self.sent - 1)
        if self.waited + wait > self.policy.max_wait_s:
            return None
        self.waited += wait
        return wait

    def after_answer(self, call: Call[Any], response: httpx.Response) -> float | None:
        """Seconds to wait before sending again, or None: ``response`` is final."""
        if not call.retry or response.status_code not in RETRY_STATUSES or response.status_code in call.also_ok:
            return None
        return self._wait(retry_after(response))

    def after_failure(self, call: Call[Any], exc: httpx.TransportError) -> float:
        """Seconds to wait before trying again; raises ``CdfaceConnectionError`` when the budget is spent."""
        # Only a connection that was never made is safe to retry for every method.
        wait = self._wait(None) if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) else None
        if wait is None:
            raise CdfaceConnectionError(f"{call.method} {call.path}: no answer from the gateway "
                                        f"({type(exc).__name__}: {exc}) after {self.sent} attempt(s)",
                                        self.sent) from exc
        return wait


def finish(call: Call[T], response: httpx.Response, attempts: Attempts) -> T:
    """The call's result, or its typed ``CdfaceAPIError``."""
    status = response.status_code
    if 200 <= status < 300 or status in call.also_ok:
        return call.read(response)
    code, message = "http_error", response.reason_phrase or f"HTTP {status}"
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass  # not the gateway's JSON (a proxy's page, say): the status alone tells the family
    raise error_class(status)(status, code, message, method=call.method, path=call.path,
                              retry_after=retry_after(response), attempts=attempts.sent)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
