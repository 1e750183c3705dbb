"""How a replica learns that a policy's serving pointer moved: events first, the database always.

:class:`PointerWatch` subscribes the resolver's cache hook to ``policy_pointer_changed`` on the
deployment's bus (Redis pub/sub in production, the process's in-process bus in the embedded
mode), so the next request after a flip or a rollback resolves the new revision within
milliseconds: the replica points its cache at the announced revision at once when it already
knows that revision (it warmed it for the rollout, or served it before a rollback), then reads
the pointer and its revision from the database, which has the last word; so the first request
after a flip waits on the database in neither case. Events are at most once, so they only
make the repair sooner; the reconciliation is the resolver's own: a cached pointer is re-read
from the database once it is ``serving_resolve_ttl_seconds`` old. A subscription that is lost
(Redis down at start, or its callback failed) is made again every ``retry_seconds``, and every
cached pointer is dropped then, since flips published meanwhile were missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
from sqlalchemy.exc import SQLAlchemyError

from lorafleet.platform.domain.errors import Unavailable
from lorafleet.platform.events import (
    POLICY_POINTER_CHANGED,
    EventBus,
    PolicyPointerChanged,
    Subscription,
    on_pointer_change,
)
from lorafleet.services.serving.api.resolver import Resolver

log = logging.getLogger(__name__)


class PointerWatch:
    def __init__(self, bus: EventBus, resolver: Resolver, *, owns_bus: bool, retry_seconds: float = 5.0) -> None:
        self.bus = bus
        self.resolver = resolver
        self.owns_bus = owns_bus
        """Close the bus on stop (a Redis bus made for this replica; never the shared in-process one)."""
        self.retry_seconds = retry_seconds
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def subscribed(self) -> bool:
        return self._subscription is not None and self._subscription.alive

    async def start(self) -> None:
        """Subscribe (a replica that cannot reach the bus still serves: the TTL covers it), then keep
        the subscription alive in the background."""
        await anyio.to_thread.run_sync(self._subscribe)
        self._task = asyncio.create_task(self._keep_alive(), name="pointer-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await anyio.to_thread.run_sync(subscription.close)
        if self.owns_bus:
            await anyio.to_thread.run_sync(self.bus.close)

    def _changed(self, change: PolicyPointerChanged) -> None:
        """A flip: point the cache at the announced revision when that is safe (see
        :meth:`Resolver.apply_flip`), else drop the cached pointer; then read the new one (and its
        revision) ahead of the first request. A failed read leaves what the announcement set, or
        nothing, for that request to read."""
        applied = self.resolver.apply_flip(
            change.tenant_id,
            change.policy,
            policy_id=change.policy_id,
            revision_id=change.revision_id,
            previous_revision_id=change.previous_revision_id,
        )
        try:
            self.resolver.refresh(change.tenant_id, change.policy, keep_cached=applied)
        except SQLAlchemyError as exc:
            log.info("could not read the new pointer of %s ahead of its requests: %s", change.policy, exc)

    def _subscribe(self) -> bool:
        try:
            callback = on_pointer_change(self._changed)
            self._subscription = self.bus.subscribe(POLICY_POINTER_CHANGED, callback)
        except Unavailable as exc:
            log.warning("no pointer-change events (%s); pointers refresh every TTL until the bus is back", exc.message)
            return False
        return True

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.retry_seconds)
            if self.subscribed:
                continue
            if await anyio.to_thread.run_sync(self._subscribe):
                self.resolver.invalidate_all()  # flips published while we were deaf were missed
