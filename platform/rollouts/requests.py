"""Rollout records in the database: create one, cancel one, roll a policy back.

These are plain database operations (they import only ``lorafleet.platform``), called inside
the caller's transaction by the API routes, by the trainer for ``auto_rollout`` jobs, and by
the controller. They never talk to replicas: a new rollout is a ``pending`` row the controller
picks up; a rollback is a pointer flip and nothing else.

One active rollout per policy: creating a second while one is ``pending``, ``warming`` or
``ready`` answers 409 ``rollout_in_progress`` (the caller cancels the first, or waits). We do
not supersede silently: a rollout that is half-warmed is an operator's decision to abandon.
The policy row is locked (``FOR UPDATE``) before the check, so two concurrent creates
serialize on PostgreSQL; on SQLite the database-wide write lock does the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.domain.enums import ReplicaRole, RolloutState
from lorafleet.platform.domain.errors import Conflict, InvalidRequest, NotFound
from lorafleet.platform.domain.ids import new_id
from lorafleet.platform.events import PolicyPointerChanged
from lorafleet.platform.rollouts.schemas import RolloutPlan, SmokeSpec, TargetSpec

ACTIVE_STATES = tuple(s.value for s in RolloutState if s.active)


def active_rollout(session: Session, policy_id: str) -> models.Rollout | None:
    return session.scalars(
        select(models.Rollout)
        .where(models.Rollout.policy_id == policy_id, models.Rollout.state.in_(ACTIVE_STATES))
        .order_by(models.Rollout.created_at)
        .limit(1)
    ).first()


def _revision_of(scope: TenantScope, policy: models.Policy, revision_id: str) -> models.AdapterRevision:
    row = scope.session.get(models.AdapterRevision, revision_id)
    if row is None or row.tenant_id != scope.tenant_id or row.policy_id != policy.id:
        raise NotFound(
            f"policy {policy.name!r} has no revision {revision_id!r}",
            code="revision_not_found",
            param="revision",
        )
    return row


def _check_named_replicas(session: Session, spec: TargetSpec, base_model_id: str) -> None:
    """Named replicas must exist as serving replicas of the policy's base (liveness is the
    controller's to judge when warming starts)."""
    if not isinstance(spec, list):
        return
    if not spec:
        raise InvalidRequest(
            'name at least one replica, or use "all" or {"count": n}',
            code="unknown_replica",
            param="replicas",
        )
    rows = {r.id: r for r in session.scalars(select(models.Replica).where(models.Replica.id.in_(spec)))}
    for rid in spec:
        row = rows.get(rid)
        if row is None or row.role != ReplicaRole.SERVING or row.base_model_id != base_model_id:
            raise InvalidRequest(
                f"{rid!r} is not a serving replica of base {base_model_id}",
                code="unknown_replica",
                param="replicas",
            )


def create_rollout(
    session: Session,
    *,
    tenant_id: str,
    policy: models.Policy,
    revision_id: str,
    replicas: TargetSpec = "all",
    smoke: SmokeSpec | None = None,
    requested_by: str | None = None,
) -> models.Rollout:
    """Insert a ``pending`` rollout. ``policy`` must have been read ``for_update`` in this transaction."""
    scope = TenantScope(session, tenant_id)
    if policy.tenant_id != tenant_id:
        raise NotFound(f"no policy named {policy.name!r}", param="policy")
    _revision_of(scope, policy, revision_id)
    busy = active_rollout(session, policy.id)
    if busy is not None:
        raise Conflict(
            f"policy {policy.name!r} has rollout {busy.id} in state {busy.state}; cancel it or wait "
            "for it to finish",
            code="rollout_in_progress",
            param="revision",
            details={"rollout": busy.id, "state": busy.state},
        )
    if policy.serving_revision_id == revision_id:
        raise Conflict(
            f"revision {revision_id} is already serving policy {policy.name!r}",
            code="revision_already_serving",
            param="revision",
        )
    _check_named_replicas(session, replicas, policy.base_model_id)
    row = models.Rollout(
        id=new_id("rollout"),
        policy_id=policy.id,
        revision_id=revision_id,
        from_revision_id=policy.serving_revision_id,
        state=RolloutState.PENDING.value,
        targets=RolloutPlan(spec=replicas, requested_by=requested_by).model_dump(mode="json"),
        smoke=smoke.model_dump(mode="json") if smoke else None,
        replica_states={},
        stage_seconds={},
    )
    scope.add(row)
    session.flush()
    return row


def request_rollout(
    session: Session,
    tenant_id: str,
    policy_id: str,
    revision_id: str,
    *,
    replicas: TargetSpec = "all",
    smoke: SmokeSpec | None = None,
    requested_by: str | None = None,
) -> models.Rollout | None:
    """For the trainer, right after it committed ``revision_id`` of a job with ``auto_rollout``.

    Call it in the same transaction as the revision commit (or right after). Returns the new
    ``pending`` rollout, or None when the revision is already serving (a policy's first
    revision is served at once by the commit itself). Raises ``Conflict``
    (``rollout_in_progress``) when another rollout of the policy is active: the trainer
    records that on the job instead of queueing rollouts behind each other.
    """
    scope = TenantScope(session, tenant_id)
    policy = scope.get(models.Policy, policy_id, for_update=True)
    if policy.serving_revision_id == revision_id:
        return None
    return create_rollout(
        session,
        tenant_id=tenant_id,
        policy=policy,
        revision_id=revision_id,
        replicas=replicas,
        smoke=smoke,
        requested_by=requested_by,
    )


def cancel_rollout(session: Session, *, tenant_id: str, policy_name: str, rollout_id: str) -> models.Rollout:
    """An active rollout becomes ``cancelled`` at once; the controller driving it notices at its
    next write, stops, and unpins the revision where it loaded it. The pointer is untouched."""
    scope = TenantScope(session, tenant_id)
    policy = scope.policy_by_name(policy_name, for_update=True)
    row = scope.get(models.Rollout, rollout_id, for_update=True)
    if row.policy_id != policy.id:
        raise NotFound(f"no rollout with id {rollout_id!r}")
    RolloutState(row.state).check_transition(RolloutState.CANCELLED)
    row.state = RolloutState.CANCELLED.value
    row.error = {"code": "cancelled", "message": "cancelled by request"}
    return row


@dataclass(frozen=True)
class PointerFlip:
    policy: models.Policy
    from_revision_id: str | None
    to_revision_id: str
    rolled_back_rollout_id: str | None
    event: PolicyPointerChanged
    """Publish it after the transaction commits (never before: a replica could read the old row)."""


def flip_pointer(policy: models.Policy, to_revision_id: str) -> str | None:
    """Move the serving pointer; the old revision becomes ``previous`` (the rollback target).
    Returns the old serving revision. The caller holds the policy row's lock."""
    old = policy.serving_revision_id
    if old != to_revision_id:
        policy.previous_revision_id = old
        policy.serving_revision_id = to_revision_id
        policy.updated_at = models.utcnow()  # also dates the keep-warm window of ``previous``
    return old


def rollback(
    session: Session, *, tenant_id: str, policy_name: str, revision_id: str | None = None
) -> PointerFlip:
    """Point the policy back at its previous serving revision (or at ``revision_id``) in this
    transaction. No load: the previous revision stays pinned on the replicas for the keep-warm
    window, so the next request is served from memory. An older, named revision is a pointer
    flip too; if no replica holds it any more, its first requests load it on demand (roll it
    out instead to warm it first). The rollout that put the current revision in place becomes
    ``rolled_back``."""
    scope = TenantScope(session, tenant_id)
    policy = scope.policy_by_name(policy_name, for_update=True)
    busy = active_rollout(session, policy.id)
    if busy is not None:
        raise Conflict(
            f"policy {policy.name!r} has rollout {busy.id} in state {busy.state}; cancel it first",
            code="rollout_in_progress",
            details={"rollout": busy.id, "state": busy.state},
        )
    target = revision_id or policy.previous_revision_id
    if target is None:
        raise Conflict(
            f"policy {policy.name!r} has no previous revision to roll back to",
            code="no_previous_revision",
            param="revision",
        )
    _revision_of(scope, policy, target)
    if target == policy.serving_revision_id:
        raise Conflict(
            f"revision {target} is already serving policy {policy.name!r}",
            code="revision_already_serving",
            param="revision",
        )
    current = policy.serving_revision_id
    undone = session.scalars(
        scope.select(models.Rollout)
        .where(
            models.Rollout.policy_id == policy.id,
            models.Rollout.revision_id == current,
            models.Rollout.state == RolloutState.SERVING.value,
        )
        .order_by(models.Rollout.created_at.desc())
        .limit(1)
        .with_for_update()
    ).first()
    if undone is not None:
        RolloutState(undone.state).check_transition(RolloutState.ROLLED_BACK)
        undone.state = RolloutState.ROLLED_BACK.value
    flip_pointer(policy, target)
    session.flush()
    event = PolicyPointerChanged(
        tenant_id=tenant_id,
        policy_id=policy.id,
        policy=policy.name,
        revision_id=target,
        previous_revision_id=current,
        reason="rollback",
        rollout_id=undone.id if undone else None,
    )
    return PointerFlip(
        policy=policy,
        from_revision_id=current,
        to_revision_id=target,
        rolled_back_rollout_id=undone.id if undone else None,
        event=event,
    )
