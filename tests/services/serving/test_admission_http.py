"""Admission control and pointer events on a real serving replica: a ``lorafleet serve`` process
over tiny-moe, PostgreSQL, a local object store, Redis pub/sub for the pointer events.

The replica admits one adapter load at a time with two waiting (``K=1``, ``Q=2``) and has four
device slots, so a burst of cold requests for never-rolled-out revisions overflows at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafleet.platform.db import models, transaction
from lorafleet.platform.events import POLICY_POINTER_CHANGED, PolicyPointerChanged
from lorafleet.platform.events.redis_bus import RedisBus
from lorafleet.services.rollout.client import ReplicaClient, ReplicaError
from tests.conftest import REDIS_URL
from tests.services.rollout._fleet import (
    Fleet,
    ReplicaProc,
    build_fleet,
    eventually,
    fresh_database,
    random_moe_base,
    with_chat_template,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_COLD_LOADS = 1
MAX_QUEUE = 2
REPLICA = "rep-adm"


@pytest.fixture(scope="module")
def base_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("LORAFLEET_TEST_ROLLOUT_BASE") == "random":
        return random_moe_base(tmp_path_factory.mktemp("adm-random-base"))
    raw: Path = request.getfixturevalue("tiny_moe_path")
    return with_chat_template(raw, tmp_path_factory.mktemp("adm-base-tpl"))


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"lf-adm-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def fleet(base_dir: Path, prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("adm-fleet")
    with fresh_database() as url:
        f = build_fleet(url, work, base_dir)
        try:
            f.start_replicas(
                REPLICA,
                LORAFLEET_MAX_DEVICE_ADAPTERS="4",
                LORAFLEET_SERVING_MAX_COLD_LOADS=str(MAX_COLD_LOADS),
                LORAFLEET_SERVING_MAX_COLD_LOAD_QUEUE=str(MAX_QUEUE),
                LORAFLEET_SERVING_RESOLVE_TTL_SECONDS="3600",  # only the events can move a pointer here
                LORAFLEET_QUEUE_BACKEND="redis",
                LORAFLEET_REDIS_URL=REDIS_URL,
                LORAFLEET_REDIS_PREFIX=prefix,
            )
            yield f
        finally:
            f.stop()
            f.sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def replica(fleet: Fleet) -> ReplicaProc:
    return fleet.replicas[REPLICA]


def warm(fleet: Fleet, replica: ReplicaProc, revision: str, *, pin: bool = True) -> httpx.Response:
    return httpx.post(
        f"{replica.url}/internal/adapters/warm",
        timeout=60,
        headers={"Authorization": f"Bearer {fleet.admin_key}"},
        json={"revision_id": revision, "tier": "device", "pin": pin},
    )


async def burst(url: str, key: str, models: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(models) + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(model: str) -> httpx.Response:
            return await client.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )

        return await asyncio.gather(*(one(m) for m in models))


def test_cold_burst_beyond_the_bound_gets_503_with_retry_after_and_serving_adapters_stay(
    fleet: Fleet, replica: ReplicaProc
) -> None:
    _, hot_rev = fleet.new_policy("hot")
    assert warm(fleet, replica, hot_rev).status_code == 200  # what stage 1 of a rollout does: pinned
    tail_id, _ = fleet.new_policy("tail")
    tail = [fleet.publish(tail_id) for _ in range(24)]  # never rolled out: each one a cold load

    # Steady traffic on the serving policy during the burst: never refused, never on another revision.
    hot: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            a = replica.chat(fleet.infer_key, "hot", max_tokens=4)
            hot.append((a.status, a.revision))

    refused_before = replica.metric("lorafleet_cold_load_refusals_total", replica=REPLICA, kind="foreground")
    t = threading.Thread(target=traffic)
    t.start()
    try:
        eventually(lambda: len(hot) >= 2, timeout=30, what="hot traffic to flow")
        answers = asyncio.run(burst(replica.url, fleet.infer_key, [f"tail@{rev}" for rev in tail]))
        after_burst = len(hot)
        eventually(lambda: len(hot) >= after_burst + 2, timeout=30, what="hot traffic after the burst")
    finally:
        stop.set()
        t.join(timeout=60)

    statuses = [r.status_code for r in answers]
    refused = [r for r in answers if r.status_code == 503]
    served = [r for r in answers if r.status_code == 200]
    assert len(refused) + len(served) == len(answers), statuses
    assert refused, f"no refusal in a burst of {len(answers)} cold loads with K={MAX_COLD_LOADS}, Q={MAX_QUEUE}"
    assert len(served) >= MAX_COLD_LOADS + MAX_QUEUE, statuses
    for r in refused:
        assert r.json()["error"]["code"] == "cold_load_queue_full", r.text
        assert int(r.headers["Retry-After"]) >= 1
    for r, rev in zip(answers, tail, strict=True):
        if r.status_code == 200:
            assert r.headers["X-Lorafleet-Revision"] == rev
            assert float(r.headers["X-Lorafleet-Adapter-Wait-Seconds"]) > 0  # a cold load it waited for
    warm_answer = httpx.post(
        f"{replica.url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {fleet.infer_key}"},
        json={"model": "hot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
    )
    assert warm_answer.headers["X-Lorafleet-Adapter-Wait-Seconds"] == "0.000000"  # on the device: no wait

    assert hot and all(status == 200 and rev == hot_rev for status, rev in hot), hot
    resident = replica.resident(fleet.admin_key)
    assert resident[hot_rev]["tier"] == "device" and resident[hot_rev]["pinned"], resident[hot_rev]
    refused_after = replica.metric("lorafleet_cold_load_refusals_total", replica=REPLICA, kind="foreground")
    assert refused_after - refused_before == len(refused)
    assert replica.metric("lorafleet_cold_load_queue_depth", replica=REPLICA) == 0
    # The user-visible load of the hot requests was 0: only the served tail requests waited.
    assert replica.metric("lorafleet_user_visible_adapter_load_seconds_count") >= len(hot) + len(served)


def test_warms_beyond_the_queue_are_refused_as_retryable_and_succeed_with_backoff(
    fleet: Fleet, replica: ReplicaProc
) -> None:
    policy_id, _ = fleet.new_policy("warmed")
    revisions = [fleet.publish(policy_id) for _ in range(8)]
    refused_before = replica.metric("lorafleet_cold_load_refusals_total", replica=REPLICA, kind="background")

    async def warm_all() -> list[Any]:
        client = ReplicaClient(admin_key=fleet.admin_key)
        try:
            return await asyncio.gather(
                *(client.warm(replica.url, rev, tier="host", pin=False) for rev in revisions),
                return_exceptions=True,
            )
        finally:
            await client.aclose()

    results = asyncio.run(warm_all())
    refusals = [r for r in results if isinstance(r, ReplicaError)]
    assert refusals, results
    for r in refusals:
        assert r.code == "cold_load_queue_full" and r.retryable and r.status == 503 and (r.retry_after or 0) >= 1
    assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, ReplicaError)]
    refused_after = replica.metric("lorafleet_cold_load_refusals_total", replica=REPLICA, kind="background")
    assert refused_after - refused_before == len(refusals)

    # The controller's way: retry a refusal after Retry-After with backoff; every warm gets in.
    async def warm_with_backoff() -> list[Any]:
        client = ReplicaClient(admin_key=fleet.admin_key)
        try:
            return await asyncio.gather(
                *(
                    client.retrying(
                        lambda rev=rev: client.warm(replica.url, rev, tier="host", pin=False),  # type: ignore[misc]
                        within_seconds=60,
                    )
                    for rev in revisions
                )
            )
        finally:
            await client.aclose()

    reports = asyncio.run(warm_with_backoff())
    assert [r.revision_id for r in reports] == revisions


def test_pointer_flips_reach_the_replica_by_event_and_label_the_first_request(
    fleet: Fleet, replica: ReplicaProc, prefix: str
) -> None:
    policy_id, rev1 = fleet.new_policy("flipper")
    rev2 = fleet.publish(policy_id)
    assert warm(fleet, replica, rev2).status_code == 200  # stage 1
    first = lambda: replica.metric("lorafleet_ttft_seconds_count", policy="flipper", first_request="true")  # noqa: E731

    assert replica.chat(fleet.infer_key, "flipper").revision == rev1
    assert replica.chat(fleet.infer_key, "flipper").revision == rev1
    assert first() == 1  # the first request to rev1 through the pointer, only
    # The smoke check names the revision; it does not use up the first request after the flip.
    assert replica.chat(fleet.infer_key, f"flipper@{rev2}").revision == rev2
    assert first() == 1

    with transaction(fleet.sessions) as s:
        row = s.get(models.Policy, policy_id)
        assert row is not None
        row.serving_revision_id = rev2
    # Committed but not announced: the replica's pointer cache (TTL 3600 s here) still answers rev1.
    assert replica.chat(fleet.infer_key, "flipper").revision == rev1

    bus = RedisBus.from_url(REDIS_URL, prefix)
    try:
        change = PolicyPointerChanged(
            tenant_id=fleet.tenant_id,
            policy_id=policy_id,
            policy="flipper",
            revision_id=rev2,
            previous_revision_id=rev1,
            reason="rollout",
        )
        bus.publish(POLICY_POINTER_CHANGED, change.model_dump(mode="json"))
    finally:
        bus.close()
    eventually(
        lambda: replica.chat(fleet.infer_key, "flipper").revision == rev2, timeout=10, what="the flip to be seen"
    )
    assert first() == 2  # exactly one first request for rev2, the first one after the flip
    assert replica.chat(fleet.infer_key, "flipper").revision == rev2
    assert first() == 2
