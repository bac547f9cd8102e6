"""``Client``: the cdface gateway's API over httpx, blocking. ``AsyncClient`` (``cdface.client.aio``) is its twin."""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, TypeVar

import httpx

from cdface.client import _calls as c
from cdface.client import models as m
from cdface.client._calls import UNSET, Embedding, FaceMode, ImageSource, RetryPolicy, Unset

T = TypeVar("T")


class Client:
    """A client of one gateway: ``Client("http://127.0.0.1:8080", api_key="cdf_...")``.

    Every method is one API route; non-2xx answers raise ``CdfaceAPIError`` subclasses carrying the
    stable ``code``; 503 and 429 are retried as ``retry`` allows (honouring ``Retry-After``).
    Use it as a context manager, or ``close()`` it.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=base_url, headers=c.auth_headers(api_key), timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, call: c.Call[T]) -> T:
        attempts = c.Attempts(self.retry)
        while True:
            attempts.sent += 1
            try:
                response = self._http.send(call.request(self._http))
            except httpx.TransportError as exc:
                time.sleep(attempts.after_failure(call, exc))
                continue
            wait = attempts.after_answer(call, response)
            if wait is None:
                return c.finish(call, response, attempts)
            time.sleep(wait)

    # -- faces --------------------------------------------------------------------------------------

    def detect(self, images: ImageSource | Iterable[ImageSource], *, mode: FaceMode | None = None) -> m.Detection:
        """The faces in one image or several: boxes, landmarks, quality (no embedding)."""
        return self._call(c.detect(images, mode))

    def embed(self, images: ImageSource | Iterable[ImageSource], *, mode: FaceMode | None = None) -> m.Embeddings:
        """Embeddings of the faces in one image or several (``mode`` overrides each image's)."""
        return self._call(c.embed(images, mode))

    def verify(self, image: ImageSource | None = None, *, embedding: Embedding | None = None,
               other: ImageSource | None = None, other_embedding: Embedding | None = None,
               identity_id: str | None = None, far: float | None = None) -> m.Verification:
        """1:1: the face (``image`` or ``embedding``) against ``other``, ``other_embedding`` or ``identity_id``."""
        return self._call(c.verify(image, embedding, other, other_embedding, identity_id, far))

    def identify(self, image: ImageSource | None = None, *, embedding: Embedding | None = None, top_k: int = 5,
                 far: float | None = None) -> m.Identification:
        """1:N: the ``top_k`` enrolled identities most like each face of ``image`` (or like ``embedding``)."""
        return self._call(c.identify(image, embedding, top_k, far))

    # -- the gallery --------------------------------------------------------------------------------

    def create_identity(self, external_id: str | None = None, name: str | None = None,
                        metadata: dict[str, Any] | None = None) -> m.Identity:
        return self._call(c.create_identity(external_id, name, metadata))

    def list_identities(self, limit: int = 50, cursor: str | None = None, *, external_id: str | None = None,
                        q: str | None = None) -> m.IdentityPage:
        """One page (by id); ``external_id``: exact lookup; ``q``: name or external id contains (any case)."""
        return self._call(c.list_identities(limit, cursor, external_id, q))

    def iter_identities(self, *, page_size: int = 200, external_id: str | None = None,
                        q: str | None = None) -> Iterator[m.Identity]:
        """Every identity (filtered like ``list_identities``), page after page."""
        cursor: str | None = None
        while True:
            page = self.list_identities(page_size, cursor, external_id=external_id, q=q)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def find_identity(self, external_id: str) -> m.Identity | None:
        """The identity with this external id, or None."""
        items = self.list_identities(1, external_id=external_id).items
        return items[0] if items else None

    def get_identity(self, identity_id: str) -> m.Identity:
        return self._call(c.get_identity(identity_id))

    def update_identity(self, identity_id: str, *, external_id: str | None | Unset = UNSET,
                        name: str | None | Unset = UNSET, metadata: dict[str, Any] | None | Unset = UNSET,
                        ) -> m.Identity:
        """Change the fields given (``None`` clears one); the others stay."""
        return self._call(c.update_identity(identity_id, external_id, name, metadata))

    def delete_identity(self, identity_id: str) -> None:
        """Delete the identity and its faces (gone from search when this returns)."""
        self._call(c.delete_identity(identity_id))

    def enroll(self, identity_id: str, images: ImageSource | Iterable[ImageSource], *, mode: FaceMode | None = None,
               retain_crop: bool | None = None) -> list[m.Face]:
        """Enroll the faces found in the images, all or none (searchable when this returns)."""
        return self._call(c.enroll(identity_id, images, mode, retain_crop))

    def list_faces(self, identity_id: str, limit: int = 100, cursor: str | None = None) -> m.FacePage:
        return self._call(c.list_faces(identity_id, limit, cursor))

    def iter_faces(self, identity_id: str, *, page_size: int = 200) -> Iterator[m.Face]:
        cursor: str | None = None
        while True:
            page = self.list_faces(identity_id, page_size, cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def delete_face(self, identity_id: str, face_id: int) -> None:
        self._call(c.delete_face(identity_id, face_id))

    def get_face_crop(self, identity_id: str, face_id: int) -> bytes:
        """The face's retained aligned 112x112 crop, PNG bytes (the key needs the ``crops`` scope)."""
        return self._call(c.get_face_crop(identity_id, face_id))

    # -- operations ---------------------------------------------------------------------------------

    def gallery_status(self) -> m.GalleryStatus:
        return self._call(c.gallery_status())

    def health(self) -> m.Health:
        return self._call(c.health())

    def readiness(self) -> m.Readiness:
        """Readiness (``.ready``); a gateway that is not ready answers this too, it does not raise."""
        return self._call(c.readiness())
