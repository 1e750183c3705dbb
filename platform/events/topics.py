"""The events lorafleet publishes, with their payloads (one pydantic model per topic)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from lorafleet.platform.events.base import Callback, Event

log = logging.getLogger(__name__)

POLICY_POINTER_CHANGED = "policy_pointer_changed"
"""A policy's serving pointer moved (rollout reached serving, or a rollback)."""


class PolicyPointerChanged(BaseModel):
    """Payload of :data:`POLICY_POINTER_CHANGED`. Replicas point their cached pointer at
    ``revision_id`` when they already know it as a revision of ``policy_id`` and their cached
    pointer names ``previous_revision_id`` (else they drop it), then read the pointer from the
    database, which has the last word."""

    # Read by replicas of possibly other versions: tolerant of fields added later.
    model_config = ConfigDict(extra="ignore", frozen=True)

    tenant_id: str
    policy_id: str
    policy: str
    """The policy's name: the key of the serving resolver's cache."""
    revision_id: str
    """The revision the pointer names now."""
    previous_revision_id: str | None
    reason: str
    """``rollout`` or ``rollback``."""
    rollout_id: str | None = None


def on_pointer_change(handle: Callable[[PolicyPointerChanged], None]) -> Callback:
    """A :data:`POLICY_POINTER_CHANGED` subscriber that calls ``handle`` with each well-formed
    payload (a malformed one is logged and ignored: the resolver's TTL still bounds staleness)."""

    def callback(event: Event) -> None:
        try:
            change = PolicyPointerChanged.model_validate(event.payload)
        except ValidationError as exc:
            log.warning("ignored a malformed %s event: %s", POLICY_POINTER_CHANGED, exc)
            return
        handle(change)

    return callback


def on_pointer_changed(invalidate: Callable[[str, str], None]) -> Callback:
    """A :data:`POLICY_POINTER_CHANGED` subscriber that calls ``invalidate(tenant_id, policy_name)``,
    the serving resolver's cache hook: ``bus.subscribe(POLICY_POINTER_CHANGED,
    on_pointer_changed(resolver.invalidate))``."""
    return on_pointer_change(lambda change: invalidate(change.tenant_id, change.policy))
