"""Gauges derived from the database at scrape time: jobs and queue age, rollouts by state and the
age of the oldest active one, and the age of every live replica's heartbeat.

They are read from rows rather than set by the process they describe, so they stay true when that
process is gone: a dead replica's heartbeat age keeps rising, a rollout nobody drives stays counted
as warming. Every control-plane replica exports the same values; the alert rules take the max.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from lorafleet.platform import metrics as m
from lorafleet.platform.db import models
from lorafleet.platform.domain.enums import JobStatus, ReplicaState, RolloutState

FORGET_REPLICAS_AFTER = timedelta(hours=24)
"""A replica silent this long drops out of the heartbeat gauge (its pod is long replaced)."""

refresh_lock = threading.Lock()
"""Held from refresh to exposition, so concurrent scrapes never see a half-rebuilt gauge."""


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every timestamp lorafleet writes is UTC
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _counts(session: Session, column: InstrumentedAttribute[str]) -> dict[str, int]:
    return {value: count for value, count in session.execute(select(column, func.count()).group_by(column))}


def refresh_from_database(session: Session, *, now: datetime | None = None) -> None:
    """Set the database-derived gauges from the rows as they are now."""
    now = now or datetime.now(UTC)
    jobs = _counts(session, models.Job.status)
    for status in JobStatus:
        m.JOBS.labels(state=status.value).set(jobs.get(status.value, 0))
    oldest = session.scalar(select(func.min(models.Job.created_at)).where(models.Job.status == JobStatus.QUEUED))
    m.QUEUE_OLDEST_AGE.set(max(0.0, (now - _aware(oldest)).total_seconds()) if oldest else 0)

    rollouts = _counts(session, models.Rollout.state)
    for state in RolloutState:
        m.ROLLOUTS.labels(state=state.value).set(rollouts.get(state.value, 0))
    # measured from created_at: updated_at moves with every lease renewal, so it cannot tell how
    # long a rollout has been stuck
    active = [s.value for s in RolloutState if s.active]
    oldest_active: dict[str, datetime] = {
        state: since for state, since in session.execute(
            select(models.Rollout.state, func.min(models.Rollout.created_at))
            .where(models.Rollout.state.in_(active)).group_by(models.Rollout.state))
    }
    for state in active:
        since = oldest_active.get(state)
        m.ROLLOUT_OLDEST_AGE.labels(state=state).set(max(0.0, (now - _aware(since)).total_seconds()) if since else 0)

    replicas = session.execute(
        select(models.Replica.id, models.Replica.role, models.Replica.heartbeat_at).where(
            models.Replica.state != ReplicaState.DOWN,
            models.Replica.heartbeat_at >= now - FORGET_REPLICAS_AFTER,
        )
    ).all()
    m.REPLICA_HEARTBEAT_AGE.clear()  # replicas that stopped or were forgotten leave no series behind
    for replica_id, role, heartbeat_at in replicas:
        age = max(0.0, (now - _aware(heartbeat_at)).total_seconds())
        m.REPLICA_HEARTBEAT_AGE.labels(replica=replica_id, role=role).set(age)
