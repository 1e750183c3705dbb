from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select

from lorafleet.platform.db import TenantScope, models
from lorafleet.services.api.deps import ReadPrincipal, StateDep
from lorafleet.services.api.routes.common import ListPage, unix

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "policy"]
    base_model: str | None = None
    """For a policy: the base it runs over."""
    serving_revision: str | None = None
    is_moe: bool | None = None
    max_lora_rank: int | None = None


@router.get("")
def list_models(state: StateDep, principal: ReadPrincipal) -> ListPage[ModelPublic]:
    """The registered base models and the caller's own policies (a policy name is a model name)."""
    with state.tx() as session:
        bases = session.scalars(select(models.BaseModelRow).order_by(models.BaseModelRow.id))
        data = [ModelPublic(id=b.id, created=unix(b.created_at) or 0, owned_by="lorafleet", kind="base",
                            is_moe=b.is_moe, max_lora_rank=b.max_lora_rank) for b in bases]
        policies = session.scalars(TenantScope(session, principal.tenant_id).select(models.Policy)
                                   .order_by(models.Policy.name))
        data += [ModelPublic(id=p.name, created=unix(p.created_at) or 0, owned_by=principal.tenant_name,
                             kind="policy", base_model=p.base_model_id, serving_revision=p.serving_revision_id)
                 for p in policies]
    return ListPage(data=data)
