"""Operating the gateway: readiness, the state behind the metrics, and the gallery's status."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyio import to_thread

from cdface.serving.gallery import GalleryStatus, SyncLag

if TYPE_CHECKING:
    from cdface.serving.service import FaceService

log = logging.getLogger("cdface.serving")


@dataclass(frozen=True)
class Readiness:
    ready: bool
    triton: bool  # Triton reports the served model ready
    gallery: bool  # the index is loaded
    sync: SyncLag | None  # on a shared store: how far this replica is behind it


async def readiness(service: FaceService) -> Readiness:
    """Ready: the model is ready in Triton, the gallery is loaded, and (shared store) the replica is in step."""
    triton = await service.embedder.model_ready()
    ready = triton and service.gallery.loaded
    sync = None
    if service.follower is not None:
        try:
            sync = await to_thread.run_sync(service.gallery.lag)
        except Exception as exc:  # the database does not answer: this replica cannot be trusted to be in step
            log.warning("readiness: the gallery database does not answer: %s", exc)
            ready = False
        else:
            since = sync.seconds_since_sync
            ready = ready and since is not None and since <= service.settings.sync_stale_s
    return Readiness(ready, triton, service.gallery.loaded, sync)


@dataclass(frozen=True)
class Gauges:
    faces_indexed: int
    breaker_open: bool  # the Triton client's circuit breaker is not closed


def gauges(service: FaceService) -> Gauges:
    return Gauges(len(service.gallery.index), service.embedder.breaker_open)


@dataclass(frozen=True)
class GalleryReport:
    status: GalleryStatus
    consistent: bool  # the index holds exactly the store's faces of the served model
    store_faces: int


def gallery_report(service: FaceService) -> GalleryReport:
    status, check = service.gallery.status(), service.gallery.check()
    return GalleryReport(status, check["consistent"], check["store_faces"])
