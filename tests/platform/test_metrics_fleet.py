"""Database-derived gauges (platform/metrics/fleet.py) follow the rows on a simulated clock: a
silent replica's heartbeat age keeps rising, rollouts are counted by state with the age of the
oldest active one, and stopped or long-gone replicas leave no series behind."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform import metrics as m
from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.db.migrate import upgrade
from lorafleet.platform.domain.enums import RolloutState
from lorafleet.platform.metrics import fleet

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = request.getfixturevalue("pg_fresh_url") if request.param == "postgres" else f"sqlite:///{tmp_path}/lf.db"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _refresh(sessions: sessionmaker[Session], now: datetime) -> None:
    with sessions() as session:
        fleet.refresh_from_database(session, now=now)


def _heartbeat_ages() -> dict[tuple[str, str], float]:
    [family] = [f for f in m.REGISTRY.collect() if f.name == "lorafleet_replica_heartbeat_age_seconds"]
    return {(s.labels["replica"], s.labels["role"]): s.value for s in family.samples}


def _rollouts() -> dict[str, float]:
    return {state.value: m.ROLLOUTS.labels(state=state.value)._value.get() for state in RolloutState}


def _oldest() -> dict[str, float]:
    return {state.value: m.ROLLOUT_OLDEST_AGE.labels(state=state.value)._value.get()
            for state in RolloutState if state.active}


def test_heartbeat_age_rises_while_a_replica_is_silent(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        s.add(models.Replica(id="serve-a", role="serving", state="up", heartbeat_at=T0, started_at=T0))
        s.add(models.Replica(id="trainer-b", role="trainer", state="up", heartbeat_at=T0, started_at=T0))
        s.add(models.Replica(id="serve-stopped", role="serving", state="down", heartbeat_at=T0, started_at=T0))
    _refresh(sessions, T0 + timedelta(seconds=5))
    assert _heartbeat_ages() == {("serve-a", "serving"): 5.0, ("trainer-b", "trainer"): 5.0}

    # serve-a keeps beating, trainer-b died: only its age keeps rising, past the alert's 60 s
    with transaction(sessions) as s:
        s.get(models.Replica, "serve-a").heartbeat_at = T0 + timedelta(seconds=90)  # type: ignore[union-attr]
    _refresh(sessions, T0 + timedelta(seconds=95))
    assert _heartbeat_ages() == {("serve-a", "serving"): 5.0, ("trainer-b", "trainer"): 95.0}
    _refresh(sessions, T0 + timedelta(minutes=10))
    assert _heartbeat_ages()[("trainer-b", "trainer")] == 600.0

    # a replica that stops on purpose, or is silent past the forget window, drops out
    with transaction(sessions) as s:
        s.get(models.Replica, "serve-a").state = "down"  # type: ignore[union-attr]
    _refresh(sessions, T0 + fleet.FORGET_REPLICAS_AFTER + timedelta(seconds=1))
    assert _heartbeat_ages() == {}


def test_rollouts_are_counted_by_state_from_the_rows(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        s.add(models.Tenant(id="ten-1", name="acme"))
        s.add(models.BaseModelRow(id="base", architecture="qwen3_moe", path="/nonexistent", fingerprint="0" * 64,
                                  max_lora_rank=8, is_moe=True, num_experts=8))
        s.flush()  # no ORM relationships order these inserts: parents first, by hand
        s.add(models.Policy(id="pol-1", tenant_id="ten-1", name="support", base_model_id="base"))
        s.flush()
        for i, state in enumerate([RolloutState.WARMING, RolloutState.WARMING, RolloutState.SERVING]):
            s.add(models.Rollout(id=f"ro-{i}", tenant_id="ten-1", policy_id="pol-1", revision_id=f"rev-{i}",
                                 state=state.value, created_at=T0 + timedelta(minutes=i)))
    _refresh(sessions, T0 + timedelta(minutes=20))
    assert _rollouts() == {"pending": 0, "warming": 2, "ready": 0, "serving": 1, "failed": 0, "cancelled": 0,
                           "rolled_back": 0}
    assert _oldest() == {"pending": 0, "warming": 20 * 60, "ready": 0}
    with transaction(sessions) as s:
        s.get(models.Rollout, "ro-0").state = RolloutState.FAILED.value  # type: ignore[union-attr]
    _refresh(sessions, T0 + timedelta(minutes=20))
    assert _rollouts()["warming"] == 1 and _rollouts()["failed"] == 1
    assert _oldest()["warming"] == 19 * 60  # the one that failed no longer counts as stuck


def test_queue_age_is_zero_without_queued_jobs(sessions: sessionmaker[Session]) -> None:
    _refresh(sessions, T0)
    assert m.QUEUE_OLDEST_AGE._value.get() == 0
    assert m.JOBS.labels(state="queued")._value.get() == 0
