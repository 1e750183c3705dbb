"""The replica agent: registers this serving replica in the database and heartbeats what it holds.

On start it upserts a ``replicas`` row (role ``serving``, base model, address, capacity), then
every ``heartbeat_seconds`` writes ``heartbeat_at`` and ``resident`` (the engine's adapters per
tier, see :class:`ResidentReport`). Warm and evict requests :meth:`poke` it so the new residency
is in the database at once rather than a period later. A heartbeat that finds its row gone
(an operator or a sweeper removed a replica it thought dead) writes it again. On stop the row
is marked ``down``, so routers stop sending traffic before the heartbeat would have gone stale.

The database work is blocking and runs in a worker thread; the loop itself is an asyncio task
on the serving event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform.db import record_heartbeat, transaction
from lorafleet.platform.domain.enums import ReplicaRole, ReplicaState
from lorafleet.platform.domain.ids import new_ulid
from lorafleet.services.serving.engine.base import Engine, ResidentAdapter, Tier

log = logging.getLogger(__name__)

class ResidentEntry(BaseModel):
    # Observed state, read by other processes of possibly other versions: unknown fields ignored.
    model_config = ConfigDict(extra="ignore")

    revision_id: str
    bytes: int
    pinned: bool = False
    in_flight: int = 0


class ResidentReport(BaseModel):
    """The ``replicas.resident`` column: adapters per tier, as of the last heartbeat."""

    model_config = ConfigDict(extra="ignore")

    tiers: dict[str, list[ResidentEntry]] = {}

    @classmethod
    def of(cls, adapters: list[ResidentAdapter]) -> ResidentReport:
        tiers: dict[str, list[ResidentEntry]] = {t.value: [] for t in Tier}
        for a in sorted(adapters, key=lambda a: a.revision_id):
            tiers[a.tier.value].append(
                ResidentEntry(revision_id=a.revision_id, bytes=a.bytes, pinned=a.pinned, in_flight=a.in_flight)
            )
        return cls(tiers=tiers)

    def holds(self, revision_id: str, tier: Tier) -> bool:
        return any(e.revision_id == revision_id for e in self.tiers.get(tier.value, []))


class ReplicaAgent:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        engine: Engine,
        replica_id: str,
        address: str,
        capacity: dict[str, Any],
        heartbeat_seconds: float = 5.0,
        poke_gap_seconds: float = 0.5,
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.replica_id = replica_id
        self.address = address
        self.incarnation = new_ulid()
        """This process's life: a replica that restarts (same id) reports a new one, so the rollout
        controller can tell that what it warmed before is gone without asking."""
        self.capacity = capacity | {"incarnation": self.incarnation}
        self.heartbeat_seconds = heartbeat_seconds
        self.poke_gap_seconds = min(poke_gap_seconds, heartbeat_seconds)
        """Poked beats come at most this often: a rollout of N revisions pokes after every warm,
        and one beat reports all that changed meanwhile."""
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_beat = 0.0

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Register (raising if the database is unreachable: a replica nobody can find is useless),
        then heartbeat in the background."""
        await anyio.to_thread.run_sync(self._beat, ReplicaState.UP)
        self._task = asyncio.create_task(self._loop(), name=f"heartbeat-{self.replica_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await anyio.to_thread.run_sync(self._beat, ReplicaState.DOWN)
        except SQLAlchemyError as exc:  # shutting down anyway; the stale heartbeat tells the rest
            log.warning("could not mark replica %s down: %s", self.replica_id, exc)

    def poke(self) -> None:
        """Heartbeat now (after a warm or an evict) instead of at the next period."""
        self._wake.set()

    # -- reporting -----------------------------------------------------------------------------------
    def report(self) -> ResidentReport:
        # The resident-adapter gauges are the engine's to keep (it knows every change, not only
        # the ones a heartbeat samples).
        return ResidentReport.of(self.engine.resident())

    async def heartbeat(self) -> None:
        await anyio.to_thread.run_sync(self._beat, ReplicaState.UP)

    def _beat(self, state: ReplicaState) -> None:
        self._last_beat = time.monotonic()
        # The report is built in the worker thread too: listing what is resident reads the disk
        # cache's index (file lock, JSON), which must not stall the event loop that streams tokens,
        # and a rollout pokes a heartbeat after every warm.
        self._write(state, self.report())

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.heartbeat_seconds)
            gap = self._last_beat + self.poke_gap_seconds - time.monotonic()
            if gap > 0:  # poked right after a beat: let more changes gather into the next one
                await asyncio.sleep(gap)
            self._wake.clear()
            try:
                await self.heartbeat()
            except SQLAlchemyError as exc:  # the database blinked: the next beat tries again
                log.warning("heartbeat of replica %s failed: %s", self.replica_id, exc)

    def _write(self, state: ReplicaState, report: ResidentReport) -> None:
        with transaction(self.sessions) as session:
            record_heartbeat(
                session,
                replica_id=self.replica_id,
                role=ReplicaRole.SERVING,
                state=state,
                base_model_id=self.engine.base_model_id,
                address=self.address,
                capacity=self.capacity,
                resident=report.model_dump(mode="json"),
            )
