"""The trainer's row in ``replicas``: written every few seconds while its worker thread lives.

The control plane turns the row's age into ``lorafleet_replica_heartbeat_age_seconds`` at scrape
time, so a trainer whose process or worker thread died shows a rising age and
LorafleetReplicaHeartbeatLost fires. A trainer stopped on purpose marks its row ``down`` instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform.db import record_heartbeat, transaction
from lorafleet.platform.domain.enums import ReplicaRole, ReplicaState

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0
"""A quarter of the alert's 60 s threshold: one missed beat never pages anyone."""


def start_heartbeat(sessions: sessionmaker[Session], *, replica_id: str, role: ReplicaRole, alive: Callable[[], bool],
                    stop: threading.Event, capacity: dict[str, Any],
                    interval_seconds: float = HEARTBEAT_SECONDS) -> threading.Thread:
    """Beat while ``alive()`` and ``stop`` is not set; on ``stop`` mark the row down. A worker
    that died without ``stop`` leaves its row up and silent, which is what the alert looks for."""

    def beat(state: ReplicaState) -> None:
        try:
            with transaction(sessions) as session:
                record_heartbeat(session, replica_id=replica_id, role=role, state=state, capacity=capacity)
        except SQLAlchemyError as exc:  # the database blinked: the next beat tries again
            log.warning("heartbeat of %s %s failed: %s", role, replica_id, exc)

    def run() -> None:
        while alive() and not stop.is_set():
            beat(ReplicaState.UP)
            stop.wait(interval_seconds)
        if stop.is_set():
            beat(ReplicaState.DOWN)

    thread = threading.Thread(target=run, name=f"lorafleet-{role}-heartbeat", daemon=True)
    thread.start()
    return thread
