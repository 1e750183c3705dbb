"""Rollout leases, on SQLite and PostgreSQL: one claimant at a time, takeover only after expiry,
and a controller that lost its lease (or whose rollout was cancelled) can write nothing."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.events import InProcessBus
from lorafleet.services.rollout import ControllerOptions, RolloutController
from lorafleet.services.rollout._driver import Driver, LeaseLost, RolloutCancelled, now_utc
from lorafleet.services.rollout.client import ReplicaClient
from tests.services.api.conftest import Platform
from tests.services.rollout.conftest import SeededPolicy

Seeded = tuple[Platform, dict[str, str], SeededPolicy]


def controllers(p: Platform, *names: str) -> list[RolloutController]:
    sessions = make_sessionmaker(make_engine(p.settings.resolved_database_url))
    return [RolloutController(sessions=sessions, client=ReplicaClient(admin_key="unused"), bus=InProcessBus(),
                              options=ControllerOptions(rollout_controller_id=n, rollout_lease_seconds=30))
            for n in names]


def test_one_claimant_then_takeover_after_expiry(seeded: Seeded) -> None:
    p, keys, pol = seeded
    rid = p.client.post("/v1/policies/chat/rollouts", json={"revision": pol.revisions[1]},
                        headers={"Authorization": f"Bearer {keys['train']}"}).json()["id"]
    a, b = controllers(p, "ctl-a", "ctl-b")
    assert a._claim(5) == [rid]
    assert b._claim(5) == []
    assert a._claim(5) == [rid]  # its own lease: renewable by itself
    driver_a = Driver(a, rid)
    driver_a._extend()
    with transaction(a.sessions) as s:  # A stalls past its lease
        s.execute(update(models.Rollout).where(models.Rollout.id == rid)
                  .values(lease_expires_at=now_utc() - timedelta(seconds=1)))
    assert b._claim(5) == [rid]
    with pytest.raises(LeaseLost):
        driver_a._extend()  # fenced: A can no longer write
    assert a._claim(5) == []
    driver_b = Driver(b, rid)
    driver_b._extend()
    r = p.client.post(f"/v1/policies/chat/rollouts/{rid}/cancel", headers={"Authorization": f"Bearer {keys['train']}"})
    assert r.status_code == 200
    with pytest.raises(RolloutCancelled):
        driver_b._extend()
    assert b._claim(5) == []  # cancelled rollouts are not claimed


def test_concurrent_claims_admit_exactly_one(seeded: Seeded) -> None:
    p, keys, pol = seeded
    p.client.post("/v1/policies/chat/rollouts", json={"revision": pol.revisions[1]},
                  headers={"Authorization": f"Bearer {keys['train']}"})
    ctls = controllers(p, *(f"ctl-{i}" for i in range(6)))
    barrier = threading.Barrier(len(ctls))
    won: list[str] = []

    def claim(c: RolloutController) -> None:
        barrier.wait()
        if c._claim(5):
            won.append(c.id)

    threads = [threading.Thread(target=claim, args=(c,)) for c in ctls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1


def test_a_rollout_with_no_live_replica_fails_and_frees_its_lease(seeded: Seeded) -> None:
    """Driven to its end by one poll: no serving replica is live, so it fails with
    no_serving_replicas; the pointer is untouched and the lease is free."""
    p, keys, pol = seeded
    rid = p.client.post("/v1/policies/chat/rollouts", json={"revision": pol.revisions[1]},
                        headers={"Authorization": f"Bearer {keys['train']}"}).json()["id"]
    (a,) = controllers(p, "ctl-a")

    async def once() -> None:
        assert await a.poll_once() == [rid]
        await a.wait_idle()

    asyncio.run(once())
    view = p.client.get(f"/v1/policies/chat/rollouts/{rid}", headers={"Authorization": f"Bearer {keys['read']}"})
    body = view.json()
    assert body["state"] == "failed" and body["error"]["code"] == "no_serving_replicas"
    assert body["drivers"] == ["ctl-a"]
    with a.sessions() as s:
        row = s.get(models.Rollout, rid)
        policy = s.get(models.Policy, pol.id)
        assert row is not None and row.lease_owner is None
        assert policy is not None and policy.serving_revision_id == pol.revisions[0]
