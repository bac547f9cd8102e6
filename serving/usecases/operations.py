"""Operating the gateway: readiness, the state behind the metrics, and the gallery's status."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyio import to_thread

from cdface.serving.gallery import GalleryStatus, SyncLag
from cdface.serving.shadow import Agreement, Pair

if TYPE_CHECKING:
    from cdface.serving.service import FaceService

log = logging.getLogger("cdface.serving")


@dataclass(frozen=True)
class Readiness:
    ready: bool
    triton: bool  # Triton reports the served model ready (reported; readiness does not depend on it)
    gallery: bool  # the index is loaded
    sync: SyncLag | None  # on a shared store: how far this replica is behind it


# Triton's answer is only reported: it must not hold up the probe (Kubernetes gives it a few seconds).
TRITON_CHECK_TIMEOUT_S = 1.0


async def readiness(service: FaceService) -> Readiness:
    """Ready: the gallery is loaded, the store answers and (shared store) the replica is in step.

    Triton is not part of it: when Triton is away every gateway would otherwise leave the Service at
    once, and listings, deletions and key checks, which need no model, would fail with it. Inference
    answers 503 ``model_unavailable`` + Retry-After meanwhile; ``triton`` says whether the model is ready.
    """
    triton, (store_ok, sync) = await asyncio.gather(
        service.active.embedder.model_ready(TRITON_CHECK_TIMEOUT_S), to_thread.run_sync(_store_state, service))
    ready = service.active.gallery.loaded and store_ok
    if sync is not None:
        since = sync.seconds_since_sync
        ready = ready and since is not None and since <= service.settings.sync_stale_s
    return Readiness(ready, triton, service.active.gallery.loaded, sync)


def _store_state(service: FaceService) -> tuple[bool, SyncLag | None]:
    """Whether the store answers, and (shared store) this replica's lag behind it."""
    try:
        if service.follower is not None:
            return True, service.active.gallery.lag()  # reads the store's change log: an answer
        service.store.check()
        return True, None
    except Exception as exc:  # the database does not answer: this gateway cannot serve the gallery
        log.warning("readiness: the gallery database does not answer: %s", exc)
        return False, None


@dataclass(frozen=True)
class Gauges:
    faces_indexed: int
    breaker_open: bool  # the Triton client's circuit breaker is not closed
    active: str  # the Triton model:version answering now
    shadow: dict[Pair, Agreement]  # shadow-mode counts since start, per (active, candidate)


def gauges(service: FaceService) -> Gauges:
    model = service.active
    return Gauges(model.gallery.faces_indexed, model.embedder.breaker_open, str(model.ref), service.shadow.totals())


@dataclass(frozen=True)
class GalleryReport:
    status: GalleryStatus
    consistent: bool  # the index holds exactly the store's faces of the served model
    store_faces: int


def gallery_report(service: FaceService, tenant: str) -> GalleryReport:
    """``tenant``'s gallery: an admin sees its own tenant's counts, never the other tenants'."""
    status, check = service.active.gallery.status(tenant), service.active.gallery.check(tenant)
    return GalleryReport(status, check["consistent"], check["store_faces"])
