from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from lorafleet.platform import metrics as m
from lorafleet.platform.db import models
from lorafleet.platform.domain.enums import JobStatus
from lorafleet.services.api.deps import StateDep
from lorafleet.services.api.state import JOBS_QUEUE

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(state: StateDep) -> Response:
    """Prometheus text format. Job gauges are read from the database at scrape time."""
    with state.tx() as session:
        counts = dict(session.execute(select(models.Job.status, func.count()).group_by(models.Job.status)).all())
        oldest = session.scalar(select(func.min(models.Job.created_at)).where(models.Job.status == JobStatus.QUEUED))
    for status in JobStatus:
        m.JOBS.labels(state=status.value).set(counts.get(status.value, 0))
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    m.QUEUE_OLDEST_AGE.set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0)
    m.QUEUE_DEPTH.labels(queue=JOBS_QUEUE).set(state.queue.depth(JOBS_QUEUE))
    return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)
