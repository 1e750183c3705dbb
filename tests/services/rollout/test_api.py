"""The rollout API and the database operations behind it, on SQLite and PostgreSQL."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from sqlalchemy import select

from lorafleet.platform.db import TenantScope, make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.errors import Conflict
from lorafleet.platform.events import POLICY_POINTER_CHANGED, Event, make_event_bus, on_pointer_changed
from lorafleet.services.rollout import request_rollout
from tests.services.api.conftest import BASE_ID, Platform
from tests.services.rollout.conftest import SeededPolicy, add_policy, add_replica

Seeded = tuple[Platform, dict[str, str], SeededPolicy]


def h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _rows(p: Platform, model: type[models.Base]) -> list[models.Base]:
    engine = make_engine(p.settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as s:
            return list(s.scalars(select(model)))
    finally:
        engine.dispose()


def test_create_get_and_list_rollouts(seeded: Seeded) -> None:
    p, keys, pol = seeded
    body = {"revision": pol.revisions[1], "smoke": {"prompt": "Say hi", "expect": "hi"}}
    r = p.client.post("/v1/policies/chat/rollouts", json=body, headers=h(keys["train"]))
    assert r.status_code == 201, r.text
    ro = r.json()
    assert ro["object"] == "policy.rollout" and ro["id"].startswith("ro-")
    assert ro["state"] == "pending" and ro["policy"] == "chat"
    assert ro["revision"] == pol.revisions[1] and ro["from_revision"] == pol.revisions[0]
    assert ro["replicas"] == "all" and ro["targets"] == [] and ro["progress"] == []
    assert ro["smoke"] == {"prompt": "Say hi", "expect": "hi", "max_tokens": 16}
    got = p.client.get(f"/v1/policies/chat/rollouts/{ro['id']}", headers=h(keys["read"]))
    assert got.status_code == 200 and got.json() == ro
    listed = p.client.get("/v1/policies/chat/rollouts", headers=h(keys["read"])).json()
    assert [x["id"] for x in listed["data"]] == [ro["id"]]
    assert (
        p.client.get("/v1/policies/chat/rollouts?status=serving", headers=h(keys["read"])).json()["data"]
        == []
    )
    # creating a rollout does not move the pointer
    assert (
        p.client.get("/v1/policies/chat", headers=h(keys["read"])).json()["serving_revision"]
        == pol.revisions[0]
    )


def test_one_active_rollout_per_policy(seeded: Seeded) -> None:
    p, keys, pol = seeded
    first = p.client.post(
        "/v1/policies/chat/rollouts", json={"revision": pol.revisions[1]}, headers=h(keys["train"])
    )
    assert first.status_code == 201
    second = p.client.post(
        "/v1/policies/chat/rollouts", json={"revision": pol.revisions[2]}, headers=h(keys["train"])
    )
    assert second.status_code == 409
    err = second.json()["error"]
    assert err["code"] == "rollout_in_progress" and err["details"]["rollout"] == first.json()["id"]
    cancelled = p.client.post(
        f"/v1/policies/chat/rollouts/{first.json()['id']}/cancel", headers=h(keys["train"])
    )
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = p.client.post(f"/v1/policies/chat/rollouts/{first.json()['id']}/cancel", headers=h(keys["train"]))
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"
    third = p.client.post(
        "/v1/policies/chat/rollouts", json={"revision": pol.revisions[2]}, headers=h(keys["train"])
    )
    assert third.status_code == 201


def test_revision_must_belong_to_the_policy_and_tenant(seeded: Seeded) -> None:
    p, keys, pol = seeded
    sibling = add_policy(p, tenant="acme", name="sibling", revisions=1)
    theirs = add_policy(p, tenant="other", name="chat", revisions=2)
    cases = [
        ("chat", {"revision": sibling.revisions[0]}, keys["train"], 404, "revision_not_found"),
        ("chat", {"revision": "01nosuchrevision"}, keys["train"], 404, "revision_not_found"),
        ("chat", {"revision": theirs.revisions[1]}, keys["train"], 404, "revision_not_found"),
        ("nosuch", {"revision": pol.revisions[1]}, keys["train"], 404, "not_found"),
        ("chat", {"revision": pol.revisions[0]}, keys["train"], 409, "revision_already_serving"),
        ("chat", {"revision": pol.revisions[1]}, keys["read"], 403, "insufficient_scope"),
        ("chat", {"revision": pol.revisions[1]}, keys["infer"], 403, "insufficient_scope"),
        (
            "chat",
            {"revision": pol.revisions[1], "replicas": ["rep-nope"]},
            keys["train"],
            400,
            "unknown_replica",
        ),
        (
            "chat",
            {"revision": pol.revisions[1], "replicas": {"count": 0}},
            keys["train"],
            422,
            "invalid_request_schema",
        ),
        (
            "chat",
            {"revision": pol.revisions[1], "replicas": "some"},
            keys["train"],
            422,
            "invalid_request_schema",
        ),
        (
            "chat",
            {"revision": pol.revisions[1], "smoke": {"prompt": "x", "temperature": 1}},
            keys["train"],
            422,
            "invalid_request_schema",
        ),
        ("chat", {"revision": pol.revisions[1], "extra": 1}, keys["train"], 422, "invalid_request_schema"),
    ]
    for policy, body, key, status, code in cases:
        r = p.client.post(f"/v1/policies/{policy}/rollouts", json=body, headers=h(key))
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (policy, body, r.text)
    # the other tenant's own rollout works, and is invisible to acme (404, not 403)
    r = p.client.post(
        "/v1/policies/chat/rollouts", json={"revision": theirs.revisions[1]}, headers=h(keys["other"])
    )
    assert r.status_code == 201
    foreign = r.json()["id"]
    assert p.client.get(f"/v1/policies/chat/rollouts/{foreign}", headers=h(keys["read"])).status_code == 404
    assert (
        p.client.post(f"/v1/policies/chat/rollouts/{foreign}/cancel", headers=h(keys["train"])).status_code
        == 404
    )
    assert p.client.get("/v1/policies/chat/rollouts", headers=h(keys["read"])).json()["data"] == []


def test_named_replicas_must_be_serving_replicas_of_the_base(seeded: Seeded) -> None:
    p, keys, pol = seeded
    add_replica(p, "rep-a")
    add_replica(p, "rep-trainer", role="trainer")
    add_replica(p, "rep-otherbase", base="another-base")
    for bad in (["rep-trainer"], ["rep-a", "rep-otherbase"], []):
        r = p.client.post(
            "/v1/policies/chat/rollouts",
            json={"revision": pol.revisions[1], "replicas": bad},
            headers=h(keys["train"]),
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_replica", bad
    r = p.client.post(
        "/v1/policies/chat/rollouts",
        json={"revision": pol.revisions[1], "replicas": ["rep-a"]},
        headers=h(keys["train"]),
    )
    assert r.status_code == 201 and r.json()["replicas"] == ["rep-a"]


def test_rollback_flips_the_pointer_and_announces_it(seeded: Seeded) -> None:
    p, keys, pol = seeded
    got: queue.Queue[Event] = queue.Queue()
    sub = make_event_bus(p.settings).subscribe(POLICY_POINTER_CHANGED, got.put)  # the bus the app uses
    try:
        r = p.client.post("/v1/policies/chat/rollback", json={}, headers=h(keys["train"]))
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_previous_revision"
        # a finished rollout to revisions[1], as the controller leaves it
        engine = make_engine(p.settings.resolved_database_url)
        with transaction(make_sessionmaker(engine)) as s:
            policy = s.get(models.Policy, pol.id)
            assert policy is not None
            policy.previous_revision_id, policy.serving_revision_id = pol.revisions[0], pol.revisions[1]
            s.add(
                models.Rollout(
                    id="ro-done",
                    tenant_id=pol.tenant_id,
                    policy_id=pol.id,
                    revision_id=pol.revisions[1],
                    from_revision_id=pol.revisions[0],
                    state="serving",
                    targets={},
                    replica_states={},
                )
            )
        engine.dispose()

        r = p.client.post("/v1/policies/chat/rollback", json={}, headers=h(keys["train"]))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["from_revision"] == pol.revisions[1] and body["to_revision"] == pol.revisions[0]
        assert body["policy"]["serving_revision"] == pol.revisions[0]
        assert body["policy"]["previous_revision"] == pol.revisions[1]
        assert body["rolled_back_rollout"] == "ro-done"
        state = p.client.get("/v1/policies/chat/rollouts/ro-done", headers=h(keys["read"])).json()["state"]
        assert state == "rolled_back"
        event = got.get(timeout=5)
        assert event.payload["policy"] == "chat" and event.payload["tenant_id"] == pol.tenant_id
        assert event.payload["revision_id"] == pol.revisions[0] and event.payload["reason"] == "rollback"

        # roll forward again by rolling "back" to the previous one; then to a named older revision
        r = p.client.post("/v1/policies/chat/rollback", json={}, headers=h(keys["train"]))
        assert r.json()["policy"]["serving_revision"] == pol.revisions[1]
        r = p.client.post(
            "/v1/policies/chat/rollback", json={"revision": pol.revisions[2]}, headers=h(keys["train"])
        )
        assert r.status_code == 200 and r.json()["policy"]["serving_revision"] == pol.revisions[2]
        assert r.json()["policy"]["previous_revision"] == pol.revisions[1]
        assert [got.get(timeout=5).payload["revision_id"] for _ in range(2)] == [
            pol.revisions[1],
            pol.revisions[2],
        ]

        for body_, key, status, code in [
            ({"revision": pol.revisions[2]}, keys["train"], 409, "revision_already_serving"),
            ({"revision": "01nosuch"}, keys["train"], 404, "revision_not_found"),
            ({}, keys["read"], 403, "insufficient_scope"),
            ({}, keys["other"], 404, "not_found"),
        ]:
            r = p.client.post("/v1/policies/chat/rollback", json=body_, headers=h(key))
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), body_
    finally:
        sub.close()


def test_rollback_waits_for_an_active_rollout(seeded: Seeded) -> None:
    p, keys, pol = seeded
    r = p.client.post(
        "/v1/policies/chat/rollback", json={"revision": pol.revisions[1]}, headers=h(keys["train"])
    )
    assert r.status_code == 200
    started = p.client.post(
        "/v1/policies/chat/rollouts", json={"revision": pol.revisions[2]}, headers=h(keys["train"])
    )
    r = p.client.post("/v1/policies/chat/rollback", json={}, headers=h(keys["train"]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "rollout_in_progress"
    assert r.json()["error"]["details"]["rollout"] == started.json()["id"]


def test_request_rollout_for_auto_rollout_jobs(seeded: Seeded) -> None:
    p, _, pol = seeded
    sessions = make_sessionmaker(make_engine(p.settings.resolved_database_url))
    with transaction(sessions) as s:  # already serving: nothing to do
        assert request_rollout(s, pol.tenant_id, pol.id, pol.revisions[0], requested_by="job:j1") is None
    with transaction(sessions) as s:
        row = request_rollout(s, pol.tenant_id, pol.id, pol.revisions[1], requested_by="job:j2")
        assert row is not None and row.state == "pending" and row.targets["requested_by"] == "job:j2"
    with transaction(sessions) as s, pytest.raises(Conflict) as exc:
        request_rollout(s, pol.tenant_id, pol.id, pol.revisions[2])
    assert exc.value.code == "rollout_in_progress"
    with sessions() as s:
        assert TenantScope(s, pol.tenant_id).count(models.Rollout) == 1


def test_concurrent_creates_admit_exactly_one(seeded: Seeded) -> None:
    p, keys, pol = seeded
    if not p.settings.resolved_database_url.startswith("postgresql"):
        pytest.skip("SQLite serializes writers itself; the row lock matters on PostgreSQL")
    barrier = threading.Barrier(4)
    results: list[int] = []

    def create(rev: str) -> None:
        barrier.wait()
        r = p.client.post("/v1/policies/chat/rollouts", json={"revision": rev}, headers=h(keys["train"]))
        results.append(r.status_code)

    threads = [threading.Thread(target=create, args=(pol.revisions[1 + i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201, 409, 409, 409]
    active = [r for r in _rows(p, models.Rollout) if r.state == "pending"]  # type: ignore[attr-defined]
    assert len(active) == 1


def test_pointer_event_invalidates_a_serving_resolver_at_once(seeded: Seeded) -> None:
    """The replica-side hook: the serving resolver caches pointers for an hour here, yet the one
    subscribed to ``policy_pointer_changed`` sees a rollback at once; one that is not stays stale."""
    from lorafleet.services.serving.api.resolver import Resolver

    p, keys, pol = seeded
    sessions = make_sessionmaker(make_engine(p.settings.resolved_database_url))
    listening = Resolver(sessions, served_base_ids=frozenset({BASE_ID}), ttl_seconds=3600)
    deaf = Resolver(sessions, served_base_ids=frozenset({BASE_ID}), ttl_seconds=3600)
    bus = make_event_bus(p.settings)  # the process's bus, which the API publishes on
    sub = bus.subscribe(POLICY_POINTER_CHANGED, on_pointer_changed(listening.invalidate))
    try:
        for resolver in (listening, deaf):
            target = resolver.resolve(pol.tenant_id, "chat")
            assert target.adapter is not None and target.adapter.revision_id == pol.revisions[0]
        r = p.client.post("/v1/policies/chat/rollback", json={"revision": pol.revisions[1]},
                          headers=h(keys["train"]))
        assert r.status_code == 200

        def fresh() -> bool:
            adapter = listening.resolve(pol.tenant_id, "chat").adapter
            return adapter is not None and adapter.revision_id == pol.revisions[1]

        deadline = time.monotonic() + 5
        while not fresh():
            assert time.monotonic() < deadline, "the pointer event did not reach the resolver"
            time.sleep(0.01)
        stale = deaf.resolve(pol.tenant_id, "chat").adapter
        assert stale is not None and stale.revision_id == pol.revisions[0]
    finally:
        sub.close()


class _GatedSessions:
    """A sessionmaker stand-in that counts the sessions opened and can hold those opened by
    threads whose name starts with ``gated_prefix`` until :attr:`release` is set."""

    def __init__(self, factory, gated_prefix: str | None = None) -> None:  # type: ignore[no-untyped-def]
        self.factory = factory
        self.gated_prefix = gated_prefix
        self.opened = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self):  # type: ignore[no-untyped-def]
        self.opened += 1
        if self.gated_prefix and threading.current_thread().name.startswith(self.gated_prefix):
            self.entered.set()
            assert self.release.wait(10), "the test never released the gated read"
        return self.factory()


def test_pointer_watch_serves_a_warmed_revision_from_the_announcement(seeded: Seeded) -> None:
    """A flip to a revision the replica already knows (it warmed it) is served from the
    announcement: the first request after it opens no database session even while the replica's
    own confirming read of the pointer is still under way (that the read has the last word is
    shown by ``test_a_flip_announcement_applies_only_when_it_is_safe``)."""
    import asyncio

    from lorafleet.services.serving.api.pointer_events import PointerWatch
    from lorafleet.services.serving.api.resolver import Resolver

    p, keys, pol = seeded
    gated = _GatedSessions(make_sessionmaker(make_engine(p.settings.resolved_database_url)), gated_prefix="events-")
    resolver = Resolver(gated, served_base_ids=frozenset({BASE_ID}), ttl_seconds=3600)  # type: ignore[arg-type]
    watch = PointerWatch(make_event_bus(p.settings), resolver, owns_bus=False)

    async def run() -> None:
        await watch.start()
        try:
            warmed = resolver.revision(pol.revisions[1])  # what the warm endpoint does first
            assert warmed is not None and warmed.policy_id == pol.id and warmed.handle.policy == "chat"
            before = resolver.resolve(pol.tenant_id, "chat").adapter
            assert before is not None and before.revision_id == pol.revisions[0]
            r = await asyncio.to_thread(
                p.client.post, "/v1/policies/chat/rollback", json={"revision": pol.revisions[1]},
                headers=h(keys["train"]),
            )
            assert r.status_code == 200
            assert await asyncio.to_thread(gated.entered.wait, 5), "the replica did not read the pointer on the event"
            reads = gated.opened
            during = resolver.resolve(pol.tenant_id, "chat").adapter  # the confirming read is held
            assert during is not None and during.revision_id == pol.revisions[1]
            assert gated.opened == reads, "the first request after the flip read the database"
        finally:
            gated.release.set()
            await watch.stop()

    asyncio.run(run())


def test_a_flip_announcement_applies_only_when_it_is_safe(seeded: Seeded) -> None:
    """``apply_flip`` moves the cached pointer without the database only to a known revision of
    that tenant's policy, and only from the revision the cache names (out of order: ignored)."""
    from lorafleet.services.serving.api.resolver import Resolver

    p, keys, pol = seeded
    other = add_policy(p, tenant="acme", name="other")
    counted = _GatedSessions(make_sessionmaker(make_engine(p.settings.resolved_database_url)))
    resolver = Resolver(counted, served_base_ids=frozenset({BASE_ID}), ttl_seconds=3600)  # type: ignore[arg-type]

    def flip(revision: str, previous: str | None, *, tenant: str = pol.tenant_id, policy_id: str = pol.id) -> bool:
        return resolver.apply_flip(
            tenant, "chat", policy_id=policy_id, revision_id=revision, previous_revision_id=previous
        )

    def served() -> str:
        adapter = resolver.resolve(pol.tenant_id, "chat").adapter
        assert adapter is not None
        return adapter.revision_id

    assert not flip(pol.revisions[1], pol.revisions[0]), "a revision this replica never saw is read, not trusted"
    assert served() == pol.revisions[0]
    for rid in (pol.revisions[1], pol.revisions[2], other.revisions[0]):
        assert resolver.revision(rid) is not None
    reads = counted.opened
    assert not flip(other.revisions[0], pol.revisions[0]), "another policy's revision"
    assert not flip(pol.revisions[1], pol.revisions[0], policy_id=other.id), "the announcement's policy id is wrong"
    assert not flip(pol.revisions[1], pol.revisions[0], tenant="ten-someone-else")
    assert not flip(pol.revisions[2], pol.revisions[1]), "out of order: the cache names revisions[0], not [1]"
    assert served() == pol.revisions[0] and counted.opened == reads
    assert flip(pol.revisions[1], pol.revisions[0])
    assert served() == pol.revisions[1] and counted.opened == reads
    assert not flip(pol.revisions[1], pol.revisions[0]), "a duplicate announcement no longer matches"
    assert flip(pol.revisions[2], pol.revisions[1])
    assert served() == pol.revisions[2] and counted.opened == reads
    # Only the cache moved: the database still names revisions[0], and a refresh restores it.
    resolver.refresh(pol.tenant_id, "chat", keep_cached=True)
    assert served() == pol.revisions[0]


def test_a_pointer_read_that_began_before_an_invalidation_is_not_cached(seeded: Seeded) -> None:
    """A request's read of a pointer that overlaps a flip's invalidation may have seen the old
    pointer: it answers that request, but the next request reads again."""
    from lorafleet.services.serving.api.resolver import Resolver

    p, keys, pol = seeded
    gated = _GatedSessions(make_sessionmaker(make_engine(p.settings.resolved_database_url)), gated_prefix="slow-read")
    resolver = Resolver(gated, served_base_ids=frozenset({BASE_ID}), ttl_seconds=3600)  # type: ignore[arg-type]
    resolver.resolve(BASE_ID, BASE_ID)  # the base list, read once
    results: list[str | None] = []

    def slow_read() -> None:
        adapter = resolver.resolve(pol.tenant_id, "chat").adapter
        results.append(adapter.revision_id if adapter else None)

    reader = threading.Thread(target=slow_read, name="slow-read")
    reader.start()
    assert gated.entered.wait(5)
    resolver.invalidate(pol.tenant_id, "chat")  # a flip lands while the read is under way
    gated.release.set()
    reader.join(timeout=10)
    assert results == [pol.revisions[0]]
    reads = gated.opened
    assert resolver.resolve(pol.tenant_id, "chat").adapter is not None
    assert gated.opened > reads, "the overlapping read was cached"
    reads = gated.opened
    resolver.resolve(pol.tenant_id, "chat")
    assert gated.opened == reads, "a read that overlapped nothing is cached"


def test_pointer_watch_reads_the_new_pointer_ahead_of_the_next_request(seeded: Seeded) -> None:
    """A replica's PointerWatch does not only drop the flipped pointer: it reads the new one and its
    revision on the event, so the first request after the flip opens no database session."""
    import asyncio

    from lorafleet.services.serving.api.pointer_events import PointerWatch
    from lorafleet.services.serving.api.resolver import Resolver

    p, keys, pol = seeded
    factory = make_sessionmaker(make_engine(p.settings.resolved_database_url))
    opened = [0]

    def sessions():  # type: ignore[no-untyped-def]
        opened[0] += 1
        return factory()

    resolver = Resolver(sessions, served_base_ids=frozenset({BASE_ID}), ttl_seconds=3600)  # type: ignore[arg-type]
    watch = PointerWatch(make_event_bus(p.settings), resolver, owns_bus=False)

    async def run() -> None:
        await watch.start()
        try:
            before = resolver.resolve(pol.tenant_id, "chat").adapter
            assert before is not None and before.revision_id == pol.revisions[0]
            reads = opened[0]
            r = await asyncio.to_thread(
                p.client.post, "/v1/policies/chat/rollback", json={"revision": pol.revisions[1]},
                headers=h(keys["train"]),
            )
            assert r.status_code == 200
            deadline = time.monotonic() + 5
            # The event's delivery thread reads the pointer, then the revision it names, and caches
            # both; the revision is cached last.
            while pol.revisions[1] not in resolver._revisions:
                assert time.monotonic() < deadline, "the replica did not read the new pointer on the event"
                await asyncio.sleep(0.01)
            assert opened[0] == reads + 2
            reads = opened[0]
            after = resolver.resolve(pol.tenant_id, "chat").adapter
            assert after is not None and after.revision_id == pol.revisions[1]
            assert opened[0] == reads, "the first request after the flip still read the database"
        finally:
            await watch.stop()

    asyncio.run(run())
