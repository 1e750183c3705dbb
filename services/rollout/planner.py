"""Pure rollout decisions: which replicas to warm, and what to do given their progress.

No I/O here: the controller reads the database and the replicas, hands the facts in, and
carries the decision out. That keeps every rule table-testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lorafleet.platform.domain.enums import ReplicaRole, ReplicaState
from lorafleet.platform.domain.errors import InvalidRequest, Unavailable
from lorafleet.platform.rollouts.schemas import (
    ReplicaCount,
    ReplicaPhase,
    ReplicaProgress,
    RolloutPlan,
    TargetSpec,
)


@dataclass(frozen=True)
class ReplicaView:
    """What the planner needs of a ``replicas`` row."""

    id: str
    role: str
    base_model_id: str | None
    state: str
    heartbeat_age_seconds: float
    device_revisions: frozenset[str] = frozenset()
    """Revisions its last heartbeat reported on the device tier."""
    address: str | None = None
    """Where its agent listens (None: it registered none)."""
    incarnation: str | None = None
    """The process its last heartbeat came from (a restart changes it)."""


def is_live(replica: ReplicaView, *, base_model_id: str, heartbeat_timeout: float) -> bool:
    return (
        replica.role == ReplicaRole.SERVING
        and replica.base_model_id == base_model_id
        and replica.state == ReplicaState.UP
        and replica.heartbeat_age_seconds <= heartbeat_timeout
    )


def plan_targets(
    spec: TargetSpec,
    replicas: list[ReplicaView],
    *,
    base_model_id: str,
    revision_id: str,
    heartbeat_timeout: float,
) -> RolloutPlan:
    """Choose the replicas to warm. Raises ``Unavailable`` when too few are live, ``InvalidRequest``
    when a named replica is not a serving replica of the policy's base."""
    live = [r for r in replicas if is_live(r, base_model_id=base_model_id, heartbeat_timeout=heartbeat_timeout)]
    # Replicas already holding the revision first (cheapest), then the least loaded, then by id.
    live.sort(key=lambda r: (revision_id not in r.device_revisions, len(r.device_revisions), r.id))
    if spec == "all":
        if not live:
            raise Unavailable(
                f"no live serving replica of base {base_model_id}",
                code="no_serving_replicas",
                retry_after=5.0,
            )
        ids = sorted(r.id for r in live)
        return RolloutPlan(spec=spec, replicas=ids, required=len(ids))
    if isinstance(spec, ReplicaCount):
        if len(live) < spec.count:
            raise Unavailable(
                f"{spec.count} replicas asked for, {len(live)} live serving replicas of base {base_model_id}",
                code="not_enough_replicas",
                retry_after=5.0,
            )
        chosen = [r.id for r in live[: spec.count]]
        return RolloutPlan(spec=spec, replicas=chosen, spares=[r.id for r in live[spec.count :]], required=spec.count)
    known = {r.id: r for r in replicas}
    wanted = list(dict.fromkeys(spec))
    for rid in wanted:
        row = known.get(rid)
        if row is None or row.role != ReplicaRole.SERVING or row.base_model_id != base_model_id:
            raise InvalidRequest(
                f"{rid!r} is not a serving replica of base {base_model_id}",
                code="unknown_replica",
                param="replicas",
            )
        if not is_live(row, base_model_id=base_model_id, heartbeat_timeout=heartbeat_timeout):
            raise Unavailable(
                f"replica {rid} is not live (state {row.state}, heartbeat {row.heartbeat_age_seconds:.0f}s ago)",
                code="replica_unavailable",
                retry_after=5.0,
            )
    return RolloutPlan(spec=wanted, replicas=wanted, required=len(wanted))


class Verdict(StrEnum):
    WAIT = "wait"
    FLIP = "flip"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    activate: tuple[str, ...] = ()
    """Spares to start warming now (a ``{count}`` rollout replacing failed replicas)."""
    error: dict[str, Any] | None = field(default=None)
    """For FAIL: the rollout's error body ``{code, message, replica?}``."""


def decide(plan: RolloutPlan, states: dict[str, ReplicaProgress], *, now: float, deadline: float) -> Decision:
    phase = {rid: states.get(rid, ReplicaProgress()).phase for rid in plan.replicas}
    ready = [rid for rid in plan.replicas if phase[rid] == ReplicaPhase.READY]
    bad = [rid for rid in plan.replicas if phase[rid].bad]
    working = len(plan.replicas) - len(ready) - len(bad)
    if len(ready) >= plan.required:
        return Decision(Verdict.FLIP)
    if len(ready) + working + len(plan.spares) < plan.required:
        if not bad:
            return Decision(
                Verdict.FAIL,
                error={
                    "code": "not_enough_replicas",
                    "message": f"{len(plan.replicas)} targets, {plan.required} needed",
                },
            )
        first = bad[0]
        err = states[first].error or {"code": "replica_failed", "message": "failed"}
        return Decision(
            Verdict.FAIL,
            error={
                "code": err.get("code", "replica_failed"),
                "message": f"replica {first}: {err.get('message', '')}",
                "replica": first,
            },
        )
    if now >= deadline:
        waiting = [rid for rid in plan.replicas if not phase[rid].terminal]
        return Decision(
            Verdict.FAIL,
            error={
                "code": "rollout_timeout",
                "message": f"not ready in time: {', '.join(waiting) or 'none'} still "
                f"warming, {len(ready)}/{plan.required} ready",
            },
        )
    shortfall = plan.required - len(ready) - working
    return Decision(Verdict.WAIT, activate=tuple(plan.spares[: max(0, shortfall)]))
