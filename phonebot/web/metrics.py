"""`GET /metrics`: the app's Prometheus series (`phonebot.ops.metrics`), for a scraper.

Behind METRICS_TOKEN when it is set (`phonebot.web.auth.require_metrics_token`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from loguru import logger

from phonebot.ops.metrics import Metrics
from phonebot.state import CallAdmission, StateUnavailable
from phonebot.web.auth import require_metrics_token
from phonebot.web.services import Services

router = APIRouter()


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_token)])
async def metrics_endpoint(request: Request, services: Services) -> Response:
    """Prometheus' text format; admission's live and reserved counts are read now."""
    await refresh_admission_counts(services.admission, services.metrics)
    body, content_type = services.metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


async def refresh_admission_counts(admission: CallAdmission, metrics: Metrics) -> None:
    """Copy admission's counts into their gauges; an unreachable shared state leaves the
    last values (the scrape itself still answers; the state's `on_error` counts the error)."""
    try:
        counts = await admission.counts(counted=False)  # not a call's round trip
    except StateUnavailable as error:
        logger.debug(f"/metrics: admission counts unavailable: {error}")
        return
    metrics.admission_counts(counts)
