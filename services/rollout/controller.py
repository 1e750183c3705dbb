"""The rollout controller: drives each rollout from ``pending`` through warm → expose.

One loop per controller process:

1. **Claim.** Active rollouts (``pending``, ``warming``, ``ready``) whose lease is free or
   expired are claimed with one conditional ``UPDATE`` each, so two controllers never drive the
   same rollout; the driver renews its lease, and every write it makes is fenced on
   ``lease_owner`` (a controller that stalled past its lease and lost it cannot write, let alone
   flip). A controller that dies leaves its lease to expire; the next one resumes from what the
   row records (targets and per-replica phases): warm calls are idempotent, so it re-issues
   them for replicas that were not yet ready.
2. **Warm (stage 1).** For each target replica (live ``replicas`` row: role serving, same base,
   state up, heartbeat fresher than ``heartbeat_timeout``) the agent is asked to load the
   revision to its device tier, pinned; then the smoke generation runs against
   ``policy@revision`` on that replica and is checked. Refusals by the replica's admission
   control (503 + Retry-After) and transport errors are retried with backoff; anything else,
   a replica whose heartbeat goes stale, or the rollout deadline fails the replica, and with
   it the rollout (a ``{count}`` rollout replaces it by a spare live replica instead).
3. **Expose (stage 2).** When enough targets are ready, each is confirmed (the warm is
   re-issued: instant when resident, a reload if the replica restarted meanwhile), and then
   the policy's pointer flips in one transaction (``previous`` = the old revision), the rollout
   becomes ``serving``, and ``policy_pointer_changed`` is published so replicas drop their
   cached pointer at once (they also re-read it every resolver TTL: a lost event costs that).
4. **Failure.** The rollout becomes ``failed`` with an error body; the pointer is untouched;
   the revision is unpinned where it was loaded.
5. **Pins.** A periodic reconciliation unpins, on every live replica, each pinned revision that
   no active rollout needs and that is neither the serving nor the previous revision of a
   policy whose pointer moved within ``keep_warm_seconds``. So the old revision stays warm for
   an instant rollback during that window, and after it both revisions are ordinary
   LRU-managed adapters. Pins on serving replicas are the controller's: it removes any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import anyio
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform import metrics
from lorafleet.platform.db import models, transaction
from lorafleet.platform.domain.enums import ReplicaRole, ReplicaState, RolloutState
from lorafleet.platform.domain.ids import new_ulid
from lorafleet.platform.events import EventBus
from lorafleet.platform.rollouts.requests import ACTIVE_STATES
from lorafleet.services.rollout._driver import SMOKE_KEY_PREFIX, Driver, now_utc
from lorafleet.services.rollout.client import ReplicaClient, ReplicaError
from lorafleet.services.rollout.options import ControllerOptions
from lorafleet.services.rollout.planner import ReplicaView

log = logging.getLogger(__name__)
T = TypeVar("T")

GAUGES_EVERY_SECONDS = 5.0
"""How often the controller recounts rollouts by state for its own /metrics (a query; polls are
more frequent, and a scrape every 15 s or so needs no fresher count)."""

VIEWS_MAX_AGE_SECONDS = 0.25
"""How stale the replica rows that drivers share may be (and never more than half a poll)."""


class RolloutController:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        client: ReplicaClient,
        bus: EventBus,
        options: ControllerOptions | None = None,
    ) -> None:
        self.sessions = sessions
        self.client = client
        self.bus = bus
        self.options = options or ControllerOptions()
        self.id = self.options.rollout_controller_id or f"{socket.gethostname()}-{os.getpid()}-{new_ulid()[-6:]}"
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._last_reconcile = 0.0
        self._gauges_at = float("-inf")
        self._views: list[ReplicaView] | None = None
        self._views_at = 0.0
        self._views_lock = asyncio.Lock()

    # -- the loop -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Claim and drive rollouts until ``stop`` is set; then release the leases it holds."""
        log.info("rollout controller %s started", self.id)
        try:
            while not stop.is_set():
                try:
                    await self.poll_once()
                    if time.monotonic() - self._last_reconcile >= self.options.rollout_reconcile_seconds:
                        await self.reconcile()
                except SQLAlchemyError as exc:  # the database blinked: the next poll tries again
                    log.warning("rollout controller %s: database error, retrying: %s", self.id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.options.rollout_poll_seconds)
        finally:
            for task in self._drivers.values():
                task.cancel()
            await asyncio.gather(*self._drivers.values(), return_exceptions=True)
            log.info("rollout controller %s stopped", self.id)

    async def poll_once(self) -> list[str]:
        """Claim what is free and start a driver for each; returns the ids claimed now."""
        room = self.options.rollout_max_concurrent - len(self._drivers)
        claimed = await self._db(self._claim, room) if room > 0 else []
        for rid in claimed:
            task = asyncio.create_task(self.drive(rid), name=f"rollout-{rid}")
            self._drivers[rid] = task
            task.add_done_callback(functools.partial(self._driver_done, rid))
        if time.monotonic() - self._gauges_at >= GAUGES_EVERY_SECONDS:
            self._gauges_at = time.monotonic()
            await self._db(self._refresh_gauges)
        return claimed

    def _driver_done(self, rollout_id: str, task: asyncio.Task[None]) -> None:
        self._drivers.pop(rollout_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug, not a rollout outcome: the rollout keeps its state and lease; this controller
            # claims it again at its next poll (its own lease), and the traceback is in the log.
            log.error("driver of rollout %s crashed", rollout_id, exc_info=exc)

    async def wait_idle(self) -> None:
        """Wait for the drivers running now to end (tests, shutdown)."""
        await asyncio.gather(*list(self._drivers.values()), return_exceptions=True)

    @property
    def driving(self) -> frozenset[str]:
        return frozenset(self._drivers)

    async def drive(self, rollout_id: str) -> None:
        await Driver(self, rollout_id).run()

    async def reconcile(self) -> int:
        """Unpin what nothing needs any more; revoke leftover smoke keys. Returns the unpins made."""
        self._last_reconcile = time.monotonic()
        await self._db(self._revoke_stale_smoke_keys)
        plan = await self._db(self._unpin_plan)
        done = 0
        for address, revision_id in plan:
            try:
                await self.client.unpin(address, revision_id)
                done += 1
            except ReplicaError as exc:  # the next reconciliation tries again
                log.warning("could not unpin %s on %s: %s", revision_id, address, exc.message)
        return done

    async def replica_views(self) -> list[ReplicaView]:
        """The serving replicas' rows, read once for all drivers at most every
        ``VIEWS_MAX_AGE_SECONDS`` (each of N concurrent rollouts checks its targets' liveness on
        every turn of its loop); heartbeat ages include the time since the read."""
        max_age = min(VIEWS_MAX_AGE_SECONDS, self.options.rollout_poll_seconds / 2)
        async with self._views_lock:
            if self._views is None or time.monotonic() - self._views_at > max_age:
                self._views = await self._db(self._read_replica_views)
                self._views_at = time.monotonic()
            views, read_at = self._views, self._views_at
        since = time.monotonic() - read_at
        return [dataclasses.replace(v, heartbeat_age_seconds=v.heartbeat_age_seconds + since) for v in views]

    # -- database work (blocking; run in a worker thread) -------------------------------------------
    def _read_replica_views(self) -> list[ReplicaView]:
        now = now_utc()
        with self.sessions() as session:
            rows = list(session.scalars(select(models.Replica).where(models.Replica.role == ReplicaRole.SERVING.value)))
            return [
                ReplicaView(
                    id=r.id,
                    role=r.role,
                    base_model_id=r.base_model_id,
                    state=r.state,
                    heartbeat_age_seconds=(now - r.heartbeat_at).total_seconds(),
                    device_revisions=frozenset(
                        e["revision_id"]
                        for e in (r.resident or {}).get("tiers", {}).get("device", [])
                        if isinstance(e, dict) and "revision_id" in e
                    ),
                    address=r.address or None,
                    incarnation=(r.capacity or {}).get("incarnation"),
                )
                for r in rows
            ]

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    def _claim(self, limit: int) -> list[str]:
        """Take up to ``limit`` active rollouts whose lease is free, expired or already ours (and
        that no driver of ours runs), oldest first, in one conditional UPDATE. On PostgreSQL the
        candidates are locked with SKIP LOCKED, so concurrent controllers split them instead of
        waiting on each other; the UPDATE re-checks the lease either way."""
        if limit <= 0:
            return []
        now = now_utc()
        free = or_(
            models.Rollout.lease_owner.is_(None),
            models.Rollout.lease_expires_at < now,
            models.Rollout.lease_owner == self.id,
        )
        candidates = (
            select(models.Rollout.id)
            .where(models.Rollout.state.in_(ACTIVE_STATES), free)
            .order_by(models.Rollout.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if self._drivers:
            candidates = candidates.where(models.Rollout.id.not_in(list(self._drivers)))
        with transaction(self.sessions) as session:
            claimed = session.scalars(
                update(models.Rollout)
                .where(
                    models.Rollout.id.in_(candidates.scalar_subquery()),
                    models.Rollout.state.in_(ACTIVE_STATES),
                    free,
                )
                .values(
                    lease_owner=self.id,
                    lease_expires_at=now + timedelta(seconds=self.options.rollout_lease_seconds),
                )
                .returning(models.Rollout.id)
                .execution_options(synchronize_session=False)
            ).all()
        return list(claimed)

    def _refresh_gauges(self) -> None:
        with self.sessions() as session:
            rows = session.execute(select(models.Rollout.state, func.count()).group_by(models.Rollout.state)).all()
        counts = {state: n for state, n in rows}
        for state in RolloutState:
            metrics.ROLLOUTS.labels(state=state.value).set(counts.get(state.value, 0))

    def _revoke_stale_smoke_keys(self) -> None:
        with transaction(self.sessions) as session:
            keys = session.scalars(
                select(models.ApiKey).where(
                    models.ApiKey.name.like(f"{SMOKE_KEY_PREFIX}%"), models.ApiKey.revoked_at.is_(None)
                )
            )
            for key in keys:
                rollout = session.get(models.Rollout, key.name.removeprefix(SMOKE_KEY_PREFIX))
                if rollout is None or rollout.state not in ACTIVE_STATES:
                    key.revoked_at = now_utc()

    def _unpin_plan(self) -> list[tuple[str, str]]:
        """(replica address, revision) pairs to unpin: pinned per the replicas' last heartbeat,
        and needed neither by an active rollout nor by a pointer that moved within the window."""
        cutoff = now_utc() - timedelta(seconds=self.options.rollout_heartbeat_timeout_seconds)
        with self.sessions() as session:
            replicas = list(
                session.scalars(
                    select(models.Replica).where(
                        models.Replica.role == ReplicaRole.SERVING.value,
                        models.Replica.state == ReplicaState.UP,
                        models.Replica.heartbeat_at >= cutoff,
                    )
                )
            )
            pinned = {r.id: (r.address, _pinned_revisions(r.resident)) for r in replicas if r.address}
            every = set().union(*(p for _, p in pinned.values())) if pinned else set()
            if not every:
                return []
            needed = set(
                session.scalars(
                    select(models.Rollout.revision_id).where(
                        models.Rollout.state.in_(ACTIVE_STATES), models.Rollout.revision_id.in_(every)
                    )
                )
            )
            policy_ids = set(
                session.scalars(select(models.AdapterRevision.policy_id).where(models.AdapterRevision.id.in_(every)))
            )
            window_start = now_utc() - timedelta(seconds=self.options.rollout_keep_warm_seconds)
            for policy in session.scalars(select(models.Policy).where(models.Policy.id.in_(policy_ids))):
                if policy.updated_at >= window_start:
                    needed |= {policy.serving_revision_id, policy.previous_revision_id} - {None}  # type: ignore[arg-type]
        return [
            (address, rev) for _, (address, revs) in sorted(pinned.items()) for rev in sorted(revs - needed) if address
        ]


def _pinned_revisions(resident: dict[str, Any] | None) -> set[str]:
    """Pinned revisions in a replica's heartbeat report (``{"tiers": {tier: [{revision_id, pinned}]}}``)."""
    out: set[str] = set()
    tiers = (resident or {}).get("tiers", {})
    if isinstance(tiers, dict):
        for entries in tiers.values():
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and entry.get("pinned") and isinstance(entry.get("revision_id"), str):
                    out.add(entry["revision_id"])
    return out
