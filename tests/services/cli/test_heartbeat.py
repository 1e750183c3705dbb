"""The trainer's heartbeat row: beats while its worker thread lives, goes ``down`` on a requested
stop, and stays ``up`` but silent when the worker dies, so the scraped heartbeat age rises."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform import metrics as m
from lorafleet.platform.db import make_engine, make_sessionmaker, models
from lorafleet.platform.db.migrate import upgrade
from lorafleet.platform.domain.enums import ReplicaRole
from lorafleet.platform.metrics import fleet
from lorafleet.services.cli._heartbeat import start_heartbeat


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/lf.db"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _row(sessions: sessionmaker[Session], replica_id: str) -> models.Replica:
    with sessions() as s:
        row = s.get(models.Replica, replica_id)
        assert row is not None
        s.expunge(row)
        return row


def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_beats_while_alive_and_goes_down_on_stop(sessions: sessionmaker[Session]) -> None:
    stop = threading.Event()
    beats = start_heartbeat(sessions, replica_id="trainer-a", role=ReplicaRole.TRAINER, alive=lambda: True, stop=stop,
                            capacity={"max_concurrent_jobs": 4}, interval_seconds=0.05)
    _wait_for(lambda: _row_or_none(sessions, "trainer-a") is not None)
    first = _row(sessions, "trainer-a")
    assert (first.role, first.state, first.capacity) == ("trainer", "up", {"max_concurrent_jobs": 4})
    _wait_for(lambda: _row(sessions, "trainer-a").heartbeat_at > first.heartbeat_at)
    stop.set()
    beats.join(timeout=5)
    assert not beats.is_alive() and _row(sessions, "trainer-a").state == "down"


def test_a_dead_worker_leaves_a_silent_row_whose_age_rises(sessions: sessionmaker[Session]) -> None:
    alive = threading.Event()
    alive.set()
    stop = threading.Event()
    beats = start_heartbeat(sessions, replica_id="trainer-b", role=ReplicaRole.TRAINER, alive=alive.is_set, stop=stop,
                            capacity={}, interval_seconds=0.05)
    _wait_for(lambda: _row_or_none(sessions, "trainer-b") is not None)
    alive.clear()  # the worker thread died; nobody asked it to stop
    beats.join(timeout=5)
    last = _row(sessions, "trainer-b")
    assert last.state == "up"
    time.sleep(0.2)
    assert _row(sessions, "trainer-b").heartbeat_at == last.heartbeat_at
    with sessions() as s:
        fleet.refresh_from_database(s, now=last.heartbeat_at + timedelta(seconds=90))
    age = m.REGISTRY.get_sample_value("lorafleet_replica_heartbeat_age_seconds",
                                      {"replica": "trainer-b", "role": "trainer"})
    assert age == 90.0


def _row_or_none(sessions: sessionmaker[Session], replica_id: str) -> models.Replica | None:
    with sessions() as s:
        return s.get(models.Replica, replica_id)
