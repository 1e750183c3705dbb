"""Tenants and API keys. The platform operator is an admin key of tenant ``default``; a tenant's
own admin keys manage that tenant's keys only."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from lorafleet.platform.auth import Principal, create_api_key, create_tenant, parse_scopes
from lorafleet.platform.auth.keys import DEFAULT_TENANT, revoke
from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.domain.enums import Scope
from lorafleet.platform.domain.errors import Forbidden, NotFound
from lorafleet.services.api.deps import AdminPrincipal, StateDep
from lorafleet.services.api.routes.common import ListPage, unix

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    max_queued_jobs: int | None = Field(default=None, ge=1)


class TenantPublic(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str | None = None
    """Tenant name; defaults to the caller's tenant. Naming another needs the platform admin."""
    scopes: list[Scope] = Field(min_length=1)
    name: str = Field(default="", max_length=100)


class KeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant: str
    name: str
    prefix: str
    scopes: list[Scope]
    created_at: int
    revoked: bool
    key: str | None = None
    """The key itself: present only in the answer that created it."""


def _platform_admin(principal: Principal) -> None:
    if principal.tenant_name != DEFAULT_TENANT:
        raise Forbidden("only the platform admin (an admin key of tenant 'default') may do this",
                        code="platform_admin_required")


@router.post("/tenants", status_code=201)
def create_tenant_route(body: TenantCreate, state: StateDep, principal: AdminPrincipal) -> TenantPublic:
    _platform_admin(principal)
    with state.tx() as session:
        tenant = create_tenant(session, body.name)
        tenant.max_queued_jobs = body.max_queued_jobs
        state.audit(session, tenant_id=tenant.id, actor=principal.key_id, action="tenant.create",
                    object_type="tenant", object_id=tenant.id)
        return TenantPublic(id=tenant.id, name=tenant.name, created_at=unix(tenant.created_at) or 0)


@router.post("/keys", status_code=201)
def create_key(body: KeyCreate, state: StateDep, principal: AdminPrincipal) -> KeyPublic:
    with state.tx() as session:
        tenant_name = body.tenant or principal.tenant_name
        if tenant_name != principal.tenant_name:
            _platform_admin(principal)
        tenant = session.scalars(select(models.Tenant).where(models.Tenant.name == tenant_name)).first()
        if tenant is None:
            raise NotFound(f"no tenant {tenant_name!r}", code="tenant_not_found", param="tenant")
        row, secret = create_api_key(session, tenant_id=tenant.id, scopes=parse_scopes(body.scopes), name=body.name)
        state.audit(session, tenant_id=tenant.id, actor=principal.key_id, action="api_key.create",
                    object_type="api_key", object_id=row.id, data={"scopes": row.scopes})
        return KeyPublic(id=row.id, tenant=tenant.name, name=row.name, prefix=row.prefix,
                         scopes=[Scope(s) for s in row.scopes], created_at=unix(row.created_at) or 0,
                         revoked=False, key=secret)


@router.get("/keys")
def list_keys(state: StateDep, principal: AdminPrincipal) -> ListPage[KeyPublic]:
    with state.tx() as session:
        rows = session.scalars(TenantScope(session, principal.tenant_id).select(models.ApiKey)
                               .order_by(models.ApiKey.id))
        data = [KeyPublic(id=r.id, tenant=principal.tenant_name, name=r.name, prefix=r.prefix,
                          scopes=[Scope(s) for s in r.scopes], created_at=unix(r.created_at) or 0,
                          revoked=r.revoked_at is not None) for r in rows]
    return ListPage(data=data)


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, state: StateDep, principal: AdminPrincipal) -> KeyPublic:
    with state.tx() as session:
        try:
            row = TenantScope(session, principal.tenant_id).get(models.ApiKey, key_id)
        except NotFound as exc:
            raise NotFound(f"no API key {key_id!r}") from exc
        revoke(session, row)
        state.audit(session, tenant_id=principal.tenant_id, actor=principal.key_id, action="api_key.revoke",
                    object_type="api_key", object_id=row.id)
        return KeyPublic(id=row.id, tenant=principal.tenant_name, name=row.name, prefix=row.prefix,
                         scopes=[Scope(s) for s in row.scopes], created_at=unix(row.created_at) or 0, revoked=True)
