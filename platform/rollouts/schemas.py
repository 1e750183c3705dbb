"""The values a rollout is made of: what the caller asked for, and what the controller records.

``TargetSpec`` and ``SmokeSpec`` come from the API (strict). ``RolloutPlan`` and
``ReplicaProgress`` are what the controller keeps in the rollout row's JSON columns
(``targets`` and ``replica_states``): read tolerantly, since a newer controller may have
written fields an older one does not know.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ReplicaCount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=1, le=1000)
    """Warm this many of the live serving replicas; a failed one is replaced by another live one."""


TargetSpec = Literal["all"] | list[str] | ReplicaCount
"""``"all"`` live serving replicas of the policy's base, these replica ids, or any ``{count}`` of them."""


class SmokeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=4000)
    """Sent as one user message to ``policy@revision`` on every target replica after the warm."""
    expect: str | None = Field(default=None, min_length=1, max_length=1000)
    """The answer must contain this substring (greedy decoding); absent: any answer passes."""
    max_tokens: int = Field(default=16, ge=1, le=512)


class ReplicaPhase(StrEnum):
    PENDING = "pending"
    LOADING = "loading"
    """Asked to warm the revision to its device tier, pinned."""
    SMOKE = "smoke"
    """Loaded; running the smoke generation."""
    READY = "ready"
    FAILED = "failed"
    """Load, verification or smoke failed; the error says which."""
    LOST = "lost"
    """Stopped heartbeating while the rollout needed it."""

    @property
    def terminal(self) -> bool:
        return self in (ReplicaPhase.READY, ReplicaPhase.FAILED, ReplicaPhase.LOST)

    @property
    def bad(self) -> bool:
        return self in (ReplicaPhase.FAILED, ReplicaPhase.LOST)


class ReplicaProgress(BaseModel):
    model_config = ConfigDict(extra="ignore")

    phase: ReplicaPhase = ReplicaPhase.PENDING
    error: dict[str, Any] | None = None
    """``{code, message}`` of what went wrong on this replica."""
    attempts: int = 0
    """Warm calls made (retries of refused loads included)."""
    load_seconds: dict[str, float] = {}
    """Per stage as the replica reported them (fetch, read, install); empty when already resident."""
    already_resident: bool | None = None
    smoke_output: str | None = None
    loaded: bool = False
    """The replica may hold the revision pinned: unpin it there if the rollout does not reach serving."""
    incarnation: str | None = None
    """The replica process that reported it loaded: while its heartbeat names the same one, the
    pin is still there and the flip needs no confirmation call."""
    updated_at: float = 0.0


class RolloutPlan(BaseModel):
    """The ``targets`` column."""

    model_config = ConfigDict(extra="ignore")

    spec: TargetSpec = "all"
    replicas: list[str] = []
    """The replicas being warmed (chosen when warming starts; replacements appended)."""
    spares: list[str] = []
    """Live candidates not yet used; only a ``{count}`` spec has any."""
    required: int = 0
    """How many of ``replicas`` must be ready before the pointer flips."""
    warming_started_at: float | None = None
    """Unix seconds; the rollout's deadline counts from here."""
    requested_by: str | None = None
    """``api:<key id>`` or ``job:<job id>`` (auto_rollout)."""
    drivers: list[str] = []
    """Every controller that claimed the rollout, in order (more than one after a takeover)."""


def parse_plan(raw: dict[str, Any] | None) -> RolloutPlan:
    return RolloutPlan.model_validate(raw or {})


def parse_states(raw: dict[str, Any] | None) -> dict[str, ReplicaProgress]:
    return {rid: ReplicaProgress.model_validate(v) for rid, v in (raw or {}).items()}


def dump_states(states: dict[str, ReplicaProgress]) -> dict[str, Any]:
    return {rid: p.model_dump(mode="json") for rid, p in states.items()}
