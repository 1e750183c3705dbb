from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lorafleet.platform import metrics as m
from lorafleet.platform.metrics import fleet
from lorafleet.services.api.deps import StateDep
from lorafleet.services.api.state import JOBS_QUEUE

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(state: StateDep) -> Response:
    """Prometheus text format. Jobs, rollouts and replica heartbeat ages are read from the database
    at scrape time (platform/metrics/fleet.py), so they hold even when the process they describe died."""
    with fleet.refresh_lock:
        with state.tx() as session:
            fleet.refresh_from_database(session)
        m.QUEUE_DEPTH.labels(queue=JOBS_QUEUE).set(state.queue.depth(JOBS_QUEUE))
        body = generate_latest(m.REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
