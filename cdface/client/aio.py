"""``AsyncClient``: the twin of ``Client`` (``cdface.client.sync``) for asyncio/anyio code, on httpx.AsyncClient."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterable, TypeVar

import anyio
import httpx

from cdface.client import _calls as c
from cdface.client import models as m
from cdface.client._calls import UNSET, Embedding, FaceMode, ImageSource, RetryPolicy, Unset

T = TypeVar("T")


class AsyncClient:
    """Like ``Client``, every method awaited: ``async with AsyncClient(url, api_key=key) as client: ...``."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=base_url, headers=c.auth_headers(api_key), timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: c.Call[T]) -> T:
        attempts = c.Attempts(self.retry)
        while True:
            attempts.sent += 1
            try:
                response = await self._http.send(call.request(self._http))
            except httpx.TransportError as exc:
                await anyio.sleep(attempts.after_failure(call, exc))
                continue
            wait = attempts.after_answer(call, response)
            if wait is None:
                return c.finish(call, response, attempts)
            await anyio.sleep(wait)

    # -- faces --------------------------------------------------------------------------------------

    async def detect(self, images: ImageSource | Iterable[ImageSource], *,
                     mode: FaceMode | None = None) -> m.Detection:
        return await self._call(c.detect(images, mode))

    async def embed(self, images: ImageSource | Iterable[ImageSource], *,
                    mode: FaceMode | None = None) -> m.Embeddings:
        return await self._call(c.embed(images, mode))

    async def verify(self, image: ImageSource | None = None, *, embedding: Embedding | None = None,
                     other: ImageSource | None = None, other_embedding: Embedding | None = None,
                     identity_id: str | None = None, far: float | None = None) -> m.Verification:
        return await self._call(c.verify(image, embedding, other, other_embedding, identity_id, far))

    async def identify(self, image: ImageSource | None = None, *, embedding: Embedding | None = None,
                       top_k: int = 5, far: float | None = None) -> m.Identification:
        return await self._call(c.identify(image, embedding, top_k, far))

    # -- the gallery --------------------------------------------------------------------------------

    async def create_identity(self, external_id: str | None = None, name: str | None = None,
                              metadata: dict[str, Any] | None = None) -> m.Identity:
        return await self._call(c.create_identity(external_id, name, metadata))

    async def list_identities(self, limit: int = 50, cursor: str | None = None, *, external_id: str | None = None,
                              q: str | None = None) -> m.IdentityPage:
        return await self._call(c.list_identities(limit, cursor, external_id, q))

    async def iter_identities(self, *, page_size: int = 200, external_id: str | None = None,
                              q: str | None = None) -> AsyncIterator[m.Identity]:
        cursor: str | None = None
        while True:
            page = await self.list_identities(page_size, cursor, external_id=external_id, q=q)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def find_identity(self, external_id: str) -> m.Identity | None:
        items = (await self.list_identities(1, external_id=external_id)).items
        return items[0] if items else None

    async def get_identity(self, identity_id: str) -> m.Identity:
        return await self._call(c.get_identity(identity_id))

    async def update_identity(self, identity_id: str, *, external_id: str | None | Unset = UNSET,
                              name: str | None | Unset = UNSET, metadata: dict[str, Any] | None | Unset = UNSET,
                              ) -> m.Identity:
        return await self._call(c.update_identity(identity_id, external_id, name, metadata))

    async def delete_identity(self, identity_id: str) -> None:
        await self._call(c.delete_identity(identity_id))

    async def enroll(self, identity_id: str, images: ImageSource | Iterable[ImageSource], *,
                     mode: FaceMode | None = None, retain_crop: bool | None = None) -> list[m.Face]:
        return await self._call(c.enroll(identity_id, images, mode, retain_crop))

    async def list_faces(self, identity_id: str, limit: int = 100, cursor: str | None = None) -> m.FacePage:
        return await self._call(c.list_faces(identity_id, limit, cursor))

    async def iter_faces(self, identity_id: str, *, page_size: int = 200) -> AsyncIterator[m.Face]:
        cursor: str | None = None
        while True:
            page = await self.list_faces(identity_id, page_size, cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def delete_face(self, identity_id: str, face_id: int) -> None:
        await self._call(c.delete_face(identity_id, face_id))

    async def get_face_crop(self, identity_id: str, face_id: int) -> bytes:
        return await self._call(c.get_face_crop(identity_id, face_id))

    # -- operations ---------------------------------------------------------------------------------

    async def gallery_status(self) -> m.GalleryStatus:
        return await self._call(c.gallery_status())

    async def health(self) -> m.Health:
        return await self._call(c.health())

    async def readiness(self) -> m.Readiness:
        return await self._call(c.readiness())
