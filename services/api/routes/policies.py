from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from lorafleet.platform.db import TenantScope, models
from lorafleet.services.api.deps import ReadPrincipal, StateDep
from lorafleet.services.api.routes.common import ListPage, unix

router = APIRouter(prefix="/v1/policies", tags=["policies"])


class PolicyPublic(BaseModel):
    id: str
    object: Literal["policy"] = "policy"
    name: str
    base_model: str
    serving_revision: str | None
    previous_revision: str | None
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, row: models.Policy) -> PolicyPublic:
        return cls(id=row.id, name=row.name, base_model=row.base_model_id, serving_revision=row.serving_revision_id,
                   previous_revision=row.previous_revision_id, created_at=unix(row.created_at) or 0,
                   updated_at=unix(row.updated_at) or 0)


class RevisionPublic(BaseModel):
    id: str
    object: Literal["adapter_revision"] = "adapter_revision"
    policy: str
    base_model: str
    job_id: str | None
    step: int | None
    rank: int
    bytes: int
    sha256: str
    uri: str
    created_at: int
    handoff_seconds: float | None
    serving: bool
    manifest: dict[str, Any]


def revision_public(r: models.AdapterRevision, policy: models.Policy) -> RevisionPublic:
    return RevisionPublic(id=r.id, policy=policy.name, base_model=r.base_model_id, job_id=r.job_id, step=r.step,
                          rank=r.rank, bytes=r.bytes, sha256=r.sha256, uri=r.uri, created_at=unix(r.created_at) or 0,
                          handoff_seconds=r.handoff_seconds, serving=r.id == policy.serving_revision_id,
                          manifest=r.manifest)


@router.get("")
def list_policies(
    state: StateDep, principal: ReadPrincipal, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> ListPage[PolicyPublic]:
    with state.tx() as session:
        stmt = TenantScope(session, principal.tenant_id).select(models.Policy).order_by(models.Policy.name)
        if after:
            stmt = stmt.where(models.Policy.name > after)
        rows = list(session.scalars(stmt.limit(limit + 1)))
    page = [PolicyPublic.of(r) for r in rows[:limit]]
    return ListPage(data=page, has_more=len(rows) > limit, last_id=page[-1].name if page else None)


@router.get("/{name}")
def get_policy(name: str, state: StateDep, principal: ReadPrincipal) -> PolicyPublic:
    with state.tx() as session:
        return PolicyPublic.of(TenantScope(session, principal.tenant_id).policy_by_name(name))


@router.get("/{name}/revisions")
def list_revisions(name: str, state: StateDep, principal: ReadPrincipal) -> ListPage[RevisionPublic]:
    """Newest first; ``serving`` marks the one the policy's pointer names."""
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        policy = scope.policy_by_name(name)
        rows = session.scalars(scope.select(models.AdapterRevision)
                               .where(models.AdapterRevision.policy_id == policy.id)
                               .order_by(models.AdapterRevision.id.desc()))
        data = [revision_public(r, policy) for r in rows]
    return ListPage(data=data, last_id=data[-1].id if data else None)
