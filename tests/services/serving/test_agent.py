"""The serving replica agent: its row in the database, its heartbeat, and the internal warm / unpin /
evict / list endpoints, on a serving-only app (``lorafleet serve``) run by a real uvicorn server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest

from lorafleet.platform.config import Settings
from lorafleet.platform.db import models
from lorafleet.services.serving.agent import ResidentReport
from lorafleet.services.serving.engine import Tier
from lorafleet.services.serving.engine.torch_engine import TorchEngine
from lorafleet.services.serving.replica import ServingOptions, build_serving, create_serving_app
from tests.services.serving._http_support import LiveServer, Seeded, fresh_database, seed, torch_engine
from tests.services.serving.conftest import BASE_MODEL_ID, AdapterStore, ServingBase

pytestmark = pytest.mark.integration

REPLICA_ID = "rep-agent-test"


@dataclass
class Replica:
    url: str
    db: Seeded
    engine: TorchEngine
    server: LiveServer

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.url}{path}",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key or self.db.admin_key}"},
        )

    def row(self) -> models.Replica:
        with self.db.sessions() as s:
            row = s.get(models.Replica, REPLICA_ID)
            assert row is not None
            return row

    def revision(self, policy: str) -> str:
        return self.db.policies[policy][0].handle.revision_id


@pytest.fixture(scope="module")
def replica(
    serving_base: ServingBase, serving_adapters: AdapterStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    tmp = tmp_path_factory.mktemp("agent")
    adapters = serving_adapters.adapters
    with fresh_database() as url:
        db = seed(url, serving_base, {"policy-2": [adapters[2]], "policy-3": [adapters[3]]})
        settings = Settings(data_dir=tmp / "lf", database_url=url, port=18123)
        engine = torch_engine(serving_base, serving_adapters.store, tmp / "cache")
        options = ServingOptions(serving_replica_id=REPLICA_ID, serving_heartbeat_seconds=0.2)
        built = build_serving(
            settings, sessions=db.sessions, store=serving_adapters.store, engine=engine, options=options
        )
        server = LiveServer(create_serving_app(built))
        try:
            yield Replica(server.url, db, engine, server)
        finally:
            server.stop()


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_replica_registers_and_heartbeats(replica: Replica) -> None:
    row = replica.row()
    assert (row.role, row.base_model_id, row.state) == ("serving", BASE_MODEL_ID, "up")
    assert row.address == "http://127.0.0.1:18123"
    assert row.capacity["max_context"] == replica.engine.max_context
    assert row.capacity["max_device_adapters"] == ServingOptions().max_device_adapters
    assert set(ResidentReport.model_validate(row.resident).tiers) == {t.value for t in Tier}
    first: datetime = row.heartbeat_at
    assert _eventually(lambda: replica.row().heartbeat_at > first, timeout=3)


def test_warm_evict_and_list_change_what_is_resident(replica: Replica) -> None:
    rev2, rev3 = replica.revision("policy-2"), replica.revision("policy-3")

    def tiers() -> dict[str, tuple[Tier, bool]]:
        return {a.revision_id: (a.tier, a.pinned) for a in replica.engine.resident()}

    def reported(revision: str, tier: Tier) -> bool:
        return ResidentReport.model_validate(replica.row().resident).holds(revision, tier)

    assert rev2 not in tiers()
    r = replica.call("POST", "/internal/adapters/warm", {"revision_id": rev2, "tier": "device", "pin": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["tier"], body["pinned"], body["already_resident"]) == ("device", True, False)
    assert {"fetch", "read", "install"} <= set(body["seconds"])
    assert tiers()[rev2] == (Tier.DEVICE, True)
    assert _eventually(lambda: reported(rev2, Tier.DEVICE))  # poked: no need to wait a full period
    again = replica.call("POST", "/internal/adapters/warm", {"revision_id": rev2}).json()
    assert again["already_resident"] is True

    r = replica.call("POST", "/internal/adapters/warm", {"revision_id": rev3, "tier": "disk"})
    assert r.status_code == 200 and r.json()["tier"] == "disk"
    assert tiers()[rev3] == (Tier.DISK, False)

    listed = replica.call("GET", "/internal/adapters").json()
    assert listed["replica_id"] == REPLICA_ID and listed["base_model"] == BASE_MODEL_ID
    assert {(a["revision_id"], a["tier"], a["pinned"]) for a in listed["data"]} >= {
        (rev2, "device", True),
        (rev3, "disk", False),
    }
    r = replica.call("POST", "/internal/adapters/unpin", {"revision_id": rev2})
    assert r.status_code == 200 and tiers()[rev2] == (Tier.DEVICE, False)

    r = replica.call("POST", "/internal/adapters/evict", {"revision_id": rev2})
    assert r.status_code == 200 and r.json()["evicted"] is True
    assert tiers().get(rev2, (Tier.DISK, False))[0] == Tier.DISK  # the disk cache keeps the verified bundle
    assert _eventually(lambda: not reported(rev2, Tier.DEVICE))
    assert replica.call("POST", "/internal/adapters/evict", {"revision_id": rev2}).json()["evicted"] is False


def test_evicting_an_adapter_in_use_is_refused(replica: Replica) -> None:
    rev = replica.revision("policy-3")
    body = {
        "model": "policy-3",
        "prompt": "the cat",
        "max_tokens": 240,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST",
        f"{replica.url}/v1/completions",
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {replica.db.infer_key}"},
    ) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)
        r = replica.call("POST", "/internal/adapters/evict", {"revision_id": rev})
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
        assert {a.revision_id: a.in_flight for a in replica.engine.resident()}[rev] == 1
    assert _eventually(lambda: all(a.in_flight == 0 for a in replica.engine.resident()))
    r = replica.call("POST", "/internal/adapters/evict", {"revision_id": rev})
    assert r.status_code == 200 and r.json()["evicted"] is True


def test_internal_endpoints_need_the_platform_admin(replica: Replica) -> None:
    body = {"revision_id": replica.revision("policy-2")}
    assert replica.call("POST", "/internal/adapters/warm", body, key=replica.db.infer_key).status_code == 403
    r = replica.call("POST", "/internal/adapters/warm", body, key=replica.db.tenant_admin_key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "platform_admin_required"
    assert replica.call("GET", "/internal/adapters", key="lf_nope").status_code == 401
    r = replica.call("POST", "/internal/adapters/warm", {"revision_id": "01jnosuchrevision0000000000"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "revision_not_found"
    assert replica.call("POST", "/internal/adapters/warm", {**body, "tier": "remote"}).status_code == 422


def test_stopping_marks_the_replica_down(
    serving_base: ServingBase, serving_adapters: AdapterStore, replica: Replica, tmp_path: Any
) -> None:
    settings = Settings(data_dir=tmp_path / "lf", database_url="")
    built = build_serving(
        settings,
        sessions=replica.db.sessions,
        store=serving_adapters.store,
        engine=torch_engine(serving_base, serving_adapters.store, tmp_path / "cache"),
        options=ServingOptions(serving_heartbeat_seconds=60),
    )
    server = LiveServer(create_serving_app(built))
    with replica.db.sessions() as s:
        row = s.get(models.Replica, built.replica_id)
        assert row is not None and row.state == "up" and built.replica_id.startswith("rep-")
    server.stop()
    with replica.db.sessions() as s:
        row = s.get(models.Replica, built.replica_id)
        assert row is not None and row.state == "down"
