"""Routes for operating the gateway (tag "operations"): the gallery's status (``/v1/gallery``, admin scope, the
caller's tenant only),
and liveness, readiness and metrics, which need no key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from cdface.serving import schemas as s
from cdface.serving.auth import tenant_of
from cdface.serving.dependencies import MetricsDep, ServiceDep, require
from cdface.serving.http_errors import ERROR_RESPONSES
from cdface.serving.routers import responses
from cdface.serving.store import ApiKey
from cdface.serving.usecases import operations

router = APIRouter(tags=["operations"])


@router.get("/v1/gallery", response_model=s.GalleryStatusOut, responses=ERROR_RESPONSES,
            operation_id="gallery_status",
            summary="Gallery status of the caller's tenant: index size, faces needing re-enrolment, index = store "
                    "check")
def gallery_status(service: ServiceDep, key: ApiKey | None = require("admin")) -> s.GalleryStatusOut:
    return responses.gallery_status(operations.gallery_report(service, tenant_of(key)))


@router.get("/healthz", response_model=s.Health, operation_id="health", summary="Liveness: the process answers")
async def healthz() -> s.Health:
    return s.Health(status="ok")


@router.get("/readyz", response_model=s.ReadinessOut, responses={503: {"model": s.ReadinessOut}},
            operation_id="readiness",
            summary="Readiness: the gallery is loaded and its database answers (on PostgreSQL: in step); "
                    "`triton` reports the model server, which readiness does not wait for")
async def readyz(service: ServiceDep) -> Any:
    result = await operations.readiness(service)
    body = responses.readiness(service, result)
    return body if result.ready else JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, operation_id="metrics")
async def metrics(service: ServiceDep, registry: MetricsDep) -> Response:
    body, content_type = registry.render(operations.gauges(service))
    return Response(body, media_type=content_type)
