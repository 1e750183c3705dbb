"""Rollout test fixtures.

The API tests reuse the control plane's ``make_platform`` (SQLite and PostgreSQL) and add
policies with committed-looking revision rows (the API never reads their bytes). The
controller tests with real serving replicas live in ``_fleet.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.ids import new_id, new_ulid
from tests.services.api.conftest import BASE_ID, Platform, make_platform, platform  # noqa: F401  (fixtures)


@dataclass
class SeededPolicy:
    name: str
    id: str
    tenant_id: str
    revisions: list[str]
    """Oldest first; ``revisions[0]`` is serving."""


def add_policy(
    p: Platform, *, tenant: str, name: str, revisions: int = 3, serving: bool = True
) -> SeededPolicy:
    engine = make_engine(p.settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as s:
            tenant_id = s.scalars(select(models.Tenant.id).where(models.Tenant.name == tenant)).one()
            policy = models.Policy(id=new_id("policy"), tenant_id=tenant_id, name=name, base_model_id=BASE_ID)
            s.add(policy)
            s.flush()
            ids = []
            for i in range(revisions):
                rid = new_ulid()
                s.add(
                    models.AdapterRevision(
                        id=rid,
                        tenant_id=tenant_id,
                        policy_id=policy.id,
                        base_model_id=BASE_ID,
                        step=i,
                        uri=f"adapters/{tenant_id}/{policy.id}/{rid}/",
                        sha256="0" * 64,
                        bytes=1,
                        rank=4,
                        manifest={},
                    )
                )
                ids.append(rid)
                s.flush()
            if serving and ids:
                policy.serving_revision_id = ids[0]
            return SeededPolicy(name=name, id=policy.id, tenant_id=tenant_id, revisions=ids)
    finally:
        engine.dispose()


def add_replica(p: Platform, replica_id: str, *, base: str = BASE_ID, role: str = "serving") -> None:
    engine = make_engine(p.settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as s:
            s.add(
                models.Replica(
                    id=replica_id, role=role, base_model_id=base, address="http://127.0.0.1:9", state="up"
                )
            )
    finally:
        engine.dispose()


@pytest.fixture
def seeded(make_platform: Callable[..., Platform]) -> tuple[Platform, dict[str, str], SeededPolicy]:  # noqa: F811
    """A platform, keys of tenant ``acme`` by scope (and ``other``'s train key), acme's policy ``chat``."""
    p = make_platform()
    keys = {"train": p.new_tenant_key("acme", "train")}
    r = p.client.post("/v1/admin/keys", json={"tenant": "acme", "scopes": ["read"]}, headers=p.headers())
    keys["read"] = r.json()["key"]
    r = p.client.post("/v1/admin/keys", json={"tenant": "acme", "scopes": ["infer"]}, headers=p.headers())
    keys["infer"] = r.json()["key"]
    keys["other"] = p.new_tenant_key("other", "train")
    return p, keys, add_policy(p, tenant="acme", name="chat")
