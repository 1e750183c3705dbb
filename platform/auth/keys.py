from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafleet.platform.db import models
from lorafleet.platform.domain.enums import Scope
from lorafleet.platform.domain.errors import Conflict, Forbidden, InvalidRequest, Unauthorized
from lorafleet.platform.domain.ids import new_id

KEY_PREFIX = "lf_"
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant, the key, and what it may do."""

    tenant_id: str
    tenant_name: str
    key_id: str
    scopes: frozenset[Scope]

    def require(self, scope: Scope) -> None:
        # admin implies every other scope; read is implied by train and infer for their own objects
        if Scope.ADMIN in self.scopes or scope in self.scopes:
            return
        if scope == Scope.READ and self.scopes & {Scope.TRAIN, Scope.INFER}:
            return
        raise Forbidden(f"this API key lacks the {scope!r} scope", code="insufficient_scope")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str | list[str]) -> list[Scope]:
    items = text.split(",") if isinstance(text, str) else text
    try:
        scopes = [Scope(s.strip()) for s in items if s.strip()]
    except ValueError as exc:
        raise InvalidRequest(f"unknown scope in {items!r}; scopes are {[s.value for s in Scope]}",
                             code="invalid_scope", param="scopes") from exc
    if not scopes:
        raise InvalidRequest("at least one scope is needed", code="invalid_scope", param="scopes")
    return list(dict.fromkeys(scopes))


def create_tenant(session: Session, name: str) -> models.Tenant:
    if session.scalars(select(models.Tenant).where(models.Tenant.name == name)).first() is not None:
        raise Conflict(f"tenant {name!r} exists", code="tenant_exists", param="name")
    tenant = models.Tenant(id=new_id("tenant"), name=name)
    session.add(tenant)
    session.flush()
    return tenant


def create_api_key(
    session: Session, *, tenant_id: str, scopes: list[Scope], name: str = ""
) -> tuple[models.ApiKey, str]:
    """Returns the row and the key itself, which is never stored and cannot be shown again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = models.ApiKey(
        id=new_id("api_key"), tenant_id=tenant_id, name=name, prefix=secret[:10],
        key_hash=hash_key(secret), scopes=[s.value for s in scopes],
    )
    session.add(row)
    session.flush()
    return row, secret


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    key = authorization.removeprefix("Bearer ").strip()
    found = session.execute(
        select(models.ApiKey, models.Tenant)
        .join(models.Tenant, models.Tenant.id == models.ApiKey.tenant_id)
        .where(models.ApiKey.key_hash == hash_key(key))
    ).first()
    if found is None or found[0].revoked_at is not None:
        raise Unauthorized("the API key is not valid", code="invalid_api_key")
    api_key, tenant = found
    return Principal(tenant_id=tenant.id, tenant_name=tenant.name, key_id=api_key.id,
                     scopes=frozenset(Scope(s) for s in api_key.scopes))


def ensure_default_tenant(session: Session) -> tuple[models.Tenant, str | None]:
    """First start of the embedded mode: tenant ``default`` with one admin key.

    Returns the new key the first time, None once the tenant exists.
    """
    tenant = session.scalars(select(models.Tenant).where(models.Tenant.name == DEFAULT_TENANT)).first()
    if tenant is not None:
        return tenant, None
    tenant = create_tenant(session, DEFAULT_TENANT)
    _, secret = create_api_key(session, tenant_id=tenant.id, scopes=[Scope.ADMIN], name="bootstrap admin")
    return tenant, secret


def revoke(session: Session, api_key: models.ApiKey) -> None:
    api_key.revoked_at = datetime.now(UTC)
