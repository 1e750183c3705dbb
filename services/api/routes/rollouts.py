"""Rollouts and rollback of a policy's serving pointer.

- ``POST /v1/policies/{name}/rollouts`` (train scope) → 201, a ``pending`` rollout the
  controller drives: warm on the target replicas, smoke-check, then flip the pointer. One
  active rollout per policy: a second answers 409 ``rollout_in_progress`` (cancel the first).
- ``GET /v1/policies/{name}/rollouts[/{id}]`` (read scope), newest first.
- ``POST /v1/policies/{name}/rollouts/{id}/cancel`` (train scope): stops an active rollout; the
  pointer is untouched.
- ``POST /v1/policies/{name}/rollback {revision?}`` (train scope): the pointer moves back to the
  previous serving revision (or to ``revision``) in one transaction, with no load; replicas are
  told at once (``policy_pointer_changed``), and re-read the pointer within their TTL anyway.

Another tenant's policy, rollout or revision answers 404.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.domain.enums import RolloutState
from lorafleet.platform.domain.errors import NotFound, Unavailable
from lorafleet.platform.events import POLICY_POINTER_CHANGED, EventBus, make_event_bus
from lorafleet.platform.rollouts import requests as rollouts
from lorafleet.platform.rollouts.schemas import (
    ReplicaProgress,
    SmokeSpec,
    TargetSpec,
    parse_plan,
    parse_states,
)
from lorafleet.services.api.deps import ReadPrincipal, StateDep, TrainPrincipal
from lorafleet.services.api.routes.common import ListPage, unix
from lorafleet.services.api.routes.policies import PolicyPublic

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/policies", tags=["rollouts"])


def get_event_bus(request: Request, state: StateDep) -> EventBus:
    """The app's bus, made on first use (the in-process one is shared with the rest of the process)."""
    bus = getattr(request.app.state, "events", None)
    if bus is None:
        bus = make_event_bus(state.settings)
        request.app.state.events = bus
    return bus  # type: ignore[no-any-return]


EventsDep = Annotated[EventBus, Depends(get_event_bus)]


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision: str = Field(min_length=1, max_length=40)
    """A committed revision of this policy."""
    replicas: TargetSpec = "all"
    """``"all"`` live serving replicas of the policy's base, a list of replica ids, or ``{"count": n}``."""
    smoke: SmokeSpec | None = None
    """Run on every target after the warm; the rollout fails if it errors or misses ``expect``."""


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(default=None, min_length=1, max_length=40)
    """Default: the policy's previous serving revision."""


class ReplicaProgressPublic(BaseModel):
    replica: str
    phase: str
    error: dict[str, Any] | None
    attempts: int
    load_seconds: dict[str, float]
    already_resident: bool | None
    smoke_output: str | None

    @classmethod
    def of(cls, replica: str, p: ReplicaProgress) -> ReplicaProgressPublic:
        return cls(
            replica=replica,
            phase=p.phase.value,
            error=p.error,
            attempts=p.attempts,
            load_seconds=p.load_seconds,
            already_resident=p.already_resident,
            smoke_output=p.smoke_output,
        )


class RolloutPublic(BaseModel):
    id: str
    object: Literal["policy.rollout"] = "policy.rollout"
    policy: str
    revision: str
    from_revision: str | None
    """The revision serving when the rollout started (when it flipped, once it is serving)."""
    state: RolloutState
    replicas: TargetSpec
    """What was asked for."""
    targets: list[str]
    """The replicas chosen (empty until warming starts)."""
    required: int
    drivers: list[str]
    """The controllers that drove it, in order (more than one after a takeover)."""
    progress: list[ReplicaProgressPublic]
    smoke: SmokeSpec | None
    error: dict[str, Any] | None
    stage_seconds: dict[str, Any]
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, row: models.Rollout, policy_name: str) -> RolloutPublic:
        plan = parse_plan(row.targets)
        states = parse_states(row.replica_states)
        return cls(
            id=row.id,
            policy=policy_name,
            revision=row.revision_id,
            from_revision=row.from_revision_id,
            state=RolloutState(row.state),
            replicas=plan.spec,
            targets=plan.replicas,
            required=plan.required,
            drivers=plan.drivers,
            progress=[ReplicaProgressPublic.of(rid, p) for rid, p in sorted(states.items())],
            smoke=SmokeSpec.model_validate(row.smoke) if row.smoke else None,
            error=row.error,
            stage_seconds=row.stage_seconds or {},
            created_at=unix(row.created_at) or 0,
            updated_at=unix(row.updated_at) or 0,
        )


class RollbackPublic(BaseModel):
    object: Literal["policy.rollback"] = "policy.rollback"
    policy: PolicyPublic
    from_revision: str | None
    to_revision: str
    rolled_back_rollout: str | None
    """The rollout that had put ``from_revision`` in place (now ``rolled_back``), if any."""


@router.post("/{name}/rollouts", status_code=201)
def create_rollout(
    name: str, body: RolloutCreate, state: StateDep, principal: TrainPrincipal
) -> RolloutPublic:
    with state.tx() as session:
        policy = TenantScope(session, principal.tenant_id).policy_by_name(name, for_update=True)
        row = rollouts.create_rollout(
            session,
            tenant_id=principal.tenant_id,
            policy=policy,
            revision_id=body.revision,
            replicas=body.replicas,
            smoke=body.smoke,
            requested_by=f"api:{principal.key_id}",
        )
        state.audit(
            session,
            tenant_id=principal.tenant_id,
            actor=principal.key_id,
            action="rollout.create",
            object_type="rollout",
            object_id=row.id,
            data={"policy": name, "revision": body.revision},
        )
        return RolloutPublic.of(row, policy.name)


@router.get("/{name}/rollouts")
def list_rollouts(
    name: str,
    state: StateDep,
    principal: ReadPrincipal,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: RolloutState | None = None,
) -> ListPage[RolloutPublic]:
    """Newest first; pass the last id seen as ``after`` for the next page."""
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        policy = scope.policy_by_name(name)
        stmt = scope.select(models.Rollout).where(models.Rollout.policy_id == policy.id)
        if status is not None:
            stmt = stmt.where(models.Rollout.state == status.value)
        if after:
            stmt = stmt.where(models.Rollout.id < after)
        rows = list(session.scalars(stmt.order_by(models.Rollout.id.desc()).limit(limit + 1)))
        page = [RolloutPublic.of(r, policy.name) for r in rows[:limit]]
    return ListPage(data=page, has_more=len(rows) > limit, last_id=page[-1].id if page else None)


@router.get("/{name}/rollouts/{rollout_id}")
def get_rollout(name: str, rollout_id: str, state: StateDep, principal: ReadPrincipal) -> RolloutPublic:
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        policy = scope.policy_by_name(name)
        row = scope.get(models.Rollout, rollout_id)
        if row.policy_id != policy.id:
            raise NotFound(f"no rollout with id {rollout_id!r}")
        return RolloutPublic.of(row, policy.name)


@router.post("/{name}/rollouts/{rollout_id}/cancel")
def cancel_rollout(name: str, rollout_id: str, state: StateDep, principal: TrainPrincipal) -> RolloutPublic:
    """An active rollout stops (409 ``invalid_transition`` once it is serving, failed or cancelled)."""
    with state.tx() as session:
        row = rollouts.cancel_rollout(
            session, tenant_id=principal.tenant_id, policy_name=name, rollout_id=rollout_id
        )
        state.audit(
            session,
            tenant_id=principal.tenant_id,
            actor=principal.key_id,
            action="rollout.cancel",
            object_type="rollout",
            object_id=row.id,
        )
        return RolloutPublic.of(row, name)


@router.post("/{name}/rollback")
async def rollback(
    name: str, body: RollbackRequest, state: StateDep, principal: TrainPrincipal, events: EventsDep
) -> RollbackPublic:
    def flip() -> rollouts.PointerFlip:
        with state.tx() as session:
            result = rollouts.rollback(
                session, tenant_id=principal.tenant_id, policy_name=name, revision_id=body.revision
            )
            state.audit(
                session,
                tenant_id=principal.tenant_id,
                actor=principal.key_id,
                action="policy.rollback",
                object_type="policy",
                object_id=result.policy.id,
                data={"from": result.from_revision_id, "to": result.to_revision_id},
            )
            return result

    result = await anyio.to_thread.run_sync(flip)
    try:  # after the commit, so a replica that hears it reads the new row
        await anyio.to_thread.run_sync(
            events.publish, POLICY_POINTER_CHANGED, result.event.model_dump(mode="json")
        )
    except Unavailable as exc:  # committed: replicas see the new pointer within their resolver TTL
        log.warning("rollback of %s committed but not announced: %s", name, exc.message)
    return RollbackPublic(
        policy=PolicyPublic.of(result.policy),
        from_revision=result.from_revision_id,
        to_revision=result.to_revision_id,
        rolled_back_rollout=result.rolled_back_rollout_id,
    )
