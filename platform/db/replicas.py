"""The ``replicas`` row a running trainer or serving replica keeps fresh: one writer for every role."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from lorafleet.platform.db import models
from lorafleet.platform.domain.enums import ReplicaRole, ReplicaState


def record_heartbeat(
    session: Session, *, replica_id: str, role: ReplicaRole, state: ReplicaState, **fields: Any
) -> None:
    """Create the row on the first beat, then set ``fields`` (columns of :class:`models.Replica`:
    capacity, address, resident, ...), the state and the heartbeat time."""
    row = session.get(models.Replica, replica_id)
    if row is None:
        row = models.Replica(id=replica_id, role=role.value, started_at=models.utcnow())
        session.add(row)
    for name, value in fields.items():
        setattr(row, name, value)
    row.state = state.value
    row.heartbeat_at = models.utcnow()
