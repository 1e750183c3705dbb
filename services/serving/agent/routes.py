"""Replica-internal endpoints the rollout controller drives: warm, unpin, evict, list.

Authentication: an admin key of tenant ``default`` (the platform operator's). No separate
shared secret: the controller already holds the operator's credentials, keys are hashed,
revocable and scoped, and there is nothing new to distribute or rotate. These routes live
under ``/internal``; an ingress in front of the replicas should not route that prefix.
"""

# No ``from __future__ import annotations``: the endpoint signatures use a dependency alias built
# inside the router factory, which FastAPI can only see when annotations are evaluated eagerly.

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorafleet.platform.auth import Principal
from lorafleet.platform.domain.errors import Conflict, NotFound
from lorafleet.services.serving.agent.agent import ReplicaAgent
from lorafleet.services.serving.api.auth import KeyCache, require_platform_admin
from lorafleet.services.serving.api.resolver import Resolver
from lorafleet.services.serving.engine.base import AdapterHandle, Engine, Tier


class WarmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision_id: str = Field(min_length=1, max_length=40)
    tier: Tier = Tier.DEVICE
    """The tier to load into (and every slower one); not ``remote``."""
    pin: bool = False
    """Keep it from eviction until unpinned (the serving revision, or the one kept for rollback)."""

    @field_validator("tier")
    @classmethod
    def _loadable(cls, tier: Tier) -> Tier:
        if tier == Tier.REMOTE:
            raise ValueError("an adapter cannot be loaded into the remote tier")
        return tier


class RevisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision_id: str = Field(min_length=1, max_length=40)


class LoadPublic(BaseModel):
    object: Literal["adapter_load"] = "adapter_load"
    replica_id: str
    revision_id: str
    tier: Tier
    pinned: bool
    already_resident: bool
    seconds: dict[str, float]
    """Per stage (fetch, read, install); empty when it was already resident."""
    incarnation: str
    """The replica process that holds it (a new one after a restart; also in its heartbeat)."""


class ResidentPublic(BaseModel):
    revision_id: str
    tier: Tier
    bytes: int
    pinned: bool
    in_flight: int


class ResidentList(BaseModel):
    object: Literal["list"] = "list"
    replica_id: str
    base_model: str
    data: list[ResidentPublic]


class EvictPublic(BaseModel):
    object: Literal["adapter_eviction"] = "adapter_eviction"
    replica_id: str
    revision_id: str
    evicted: bool


_TIER_ORDER = {t: i for i, t in enumerate(Tier)}


def internal_router(*, engine: Engine, agent: ReplicaAgent, resolver: Resolver, keys: KeyCache) -> APIRouter:
    router = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False)
    admin = Annotated[Principal, Depends(require_platform_admin(keys))]

    def handle_of(revision_id: str) -> AdapterHandle:
        """The revision's handle, through the resolver's revision cache: rows never change once
        committed, and a revision warmed here is then known when its flip is announced."""
        known = resolver.revision(revision_id)
        if known is None:
            raise NotFound(f"no adapter revision {revision_id!r}", code="revision_not_found", param="revision_id")
        if known.base_model_id != engine.base_model_id:
            raise Conflict(
                f"revision {revision_id} is for base {known.base_model_id}; this replica serves "
                f"{engine.base_model_id}",
                code="base_mismatch",
                param="revision_id",
            )
        return known.handle

    @router.post("/adapters/warm")
    async def warm(body: WarmRequest, _: admin) -> LoadPublic:
        handle = await anyio.to_thread.run_sync(handle_of, body.revision_id)
        try:
            report = await engine.load(handle, tier=Tier(body.tier), pin=body.pin)
        finally:
            agent.poke()  # a failed load may still have changed residency (evictions to make room)
        return LoadPublic(
            replica_id=agent.replica_id,
            revision_id=report.revision_id,
            tier=report.tier,
            pinned=body.pin,
            already_resident=report.already_resident,
            seconds=report.seconds,
            incarnation=agent.incarnation,
        )

    @router.post("/adapters/unpin")
    async def unpin(body: RevisionBody, _: admin) -> ResidentList:
        engine.unpin(body.revision_id)
        agent.poke()
        return listing()

    @router.post("/adapters/evict")
    async def evict(body: RevisionBody, _: admin) -> EvictPublic:
        """Drop the revision from memory, pinned or not (the disk cache keeps its bundle); 409
        ``adapter_in_use`` while requests are using it."""
        held = any(a.revision_id == body.revision_id and a.tier in (Tier.DEVICE, Tier.HOST) for a in engine.resident())
        if held:
            await engine.evict(body.revision_id)
            agent.poke()
        return EvictPublic(replica_id=agent.replica_id, revision_id=body.revision_id, evicted=held)

    @router.get("/adapters")
    async def list_resident(_: admin) -> ResidentList:
        return listing()

    def listing() -> ResidentList:
        return ResidentList(
            replica_id=agent.replica_id,
            base_model=engine.base_model_id,
            data=[
                ResidentPublic(
                    revision_id=a.revision_id,
                    tier=a.tier,
                    bytes=a.bytes,
                    pinned=a.pinned,
                    in_flight=a.in_flight,
                )
                for a in sorted(engine.resident(), key=lambda a: (_TIER_ORDER[a.tier], a.revision_id))
            ],
        )

    return router
