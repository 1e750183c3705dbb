"""Tenant-scoped data access. Every query on a tenant's objects goes through a TenantScope,
which adds the tenant filter itself, so a query without a tenant cannot be written by accident.
Another tenant's id is indistinguishable from an unknown one (NotFound)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from lorafleet.platform.db import models
from lorafleet.platform.domain.errors import NotFound

T = TypeVar("T", bound=models.Base)

_NOUNS: dict[type[models.Base], str] = {
    models.FileRow: "file",
    models.Job: "fine-tuning job",
    models.JobEvent: "job event",
    models.Checkpoint: "checkpoint",
    models.Policy: "policy",
    models.AdapterRevision: "adapter revision",
    models.Rollout: "rollout",
    models.ApiKey: "API key",
}


class TenantScope:
    def __init__(self, session: Session, tenant_id: str) -> None:
        if not tenant_id:
            raise ValueError("a TenantScope needs a tenant id")
        self.session = session
        self.tenant_id = tenant_id

    def select(self, model: type[T]) -> Select[tuple[T]]:
        return select(model).where(model.tenant_id == self.tenant_id)  # type: ignore[attr-defined]

    def count(self, model: type[T], *where: Any) -> int:
        stmt = select(func.count()).select_from(model).where(
            model.tenant_id == self.tenant_id, *where  # type: ignore[attr-defined]
        )
        return int(self.session.scalar(stmt) or 0)

    def get(self, model: type[T], object_id: str, *, param: str | None = None, for_update: bool = False) -> T:
        stmt = self.select(model).where(model.id == object_id)  # type: ignore[attr-defined]
        if for_update:
            stmt = stmt.with_for_update()
        row = self.session.scalars(stmt).first()
        if row is None:
            noun = _NOUNS.get(model, model.__tablename__)
            raise NotFound(f"no {noun} with id {object_id!r}", param=param)
        return row

    def policy_by_name(self, name: str, *, for_update: bool = False) -> models.Policy:
        stmt = self.select(models.Policy).where(models.Policy.name == name)
        if for_update:
            stmt = stmt.with_for_update()
        row = self.session.scalars(stmt).first()
        if row is None:
            raise NotFound(f"no policy named {name!r}", param="policy")
        return row

    def add(self, row: T) -> T:
        row.tenant_id = self.tenant_id  # type: ignore[attr-defined]
        self.session.add(row)
        return row
