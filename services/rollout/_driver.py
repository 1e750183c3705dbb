"""One rollout, driven by the controller that holds its lease: warm, smoke, confirm, flip, or fail.

Everything it learns it writes to the rollout row at once (fenced on the lease), so another
controller can take over from exactly there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform import metrics
from lorafleet.platform.auth import create_api_key
from lorafleet.platform.db import models, transaction
from lorafleet.platform.domain.enums import ROLLOUT_TRANSITIONS, ReplicaState, RolloutState, Scope
from lorafleet.platform.domain.errors import LorafleetError, Unavailable
from lorafleet.platform.events import POLICY_POINTER_CHANGED, PolicyPointerChanged
from lorafleet.platform.rollouts.requests import ACTIVE_STATES, flip_pointer
from lorafleet.platform.rollouts.schemas import (
    ReplicaPhase,
    ReplicaProgress,
    RolloutPlan,
    SmokeSpec,
    dump_states,
    parse_plan,
    parse_states,
)
from lorafleet.services.rollout.client import ReplicaError
from lorafleet.services.rollout.planner import ReplicaView, Verdict, decide, plan_targets

if TYPE_CHECKING:
    from lorafleet.services.rollout.controller import RolloutController

log = logging.getLogger(__name__)

SMOKE_KEY_PREFIX = "rollout-smoke:"
"""Name prefix of the short-lived infer keys the controller mints for smoke generations."""


class LeaseLost(Exception):
    """This controller no longer owns the rollout (another took it over): stop, touch nothing."""


class RolloutCancelled(Exception):
    """The rollout was cancelled through the API while this controller drove it."""


class RolloutFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "rollout failed"))
        self.error = error


_STARTS: dict[RolloutState, tuple[str, ...]] = {
    state: tuple(s.value for s in RolloutState if s.active and (s == state or state in ROLLOUT_TRANSITIONS[s]))
    for state in RolloutState
}
"""The active states a driver's write may move the row from into each state (itself included)."""


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Snapshot:
    """What a driver reads once from the row and the rows it names."""

    id: str
    tenant_id: str
    policy_id: str
    policy_name: str
    base_model_id: str
    revision_id: str
    serving_revision_id: str | None
    """The policy's serving revision when the driver started: kept warm for rollback at the flip."""
    state: RolloutState
    plan: RolloutPlan
    states: dict[str, ReplicaProgress]
    smoke: SmokeSpec | None
    created_at: datetime
    stage_seconds: dict[str, Any]


class Driver:
    """Drives one claimed rollout to its end (or until the lease is lost)."""

    def __init__(self, controller: RolloutController, rollout_id: str) -> None:
        self.c = controller
        self.o = controller.options
        self.id = rollout_id
        self.snap: _Snapshot | None = None
        self._write_lock = asyncio.Lock()
        self._changes = 0
        """Changes made to the snapshot so far (each :meth:`_save` call counts one)..."""
        self._written = 0
        """...and how many of them the row holds: a save whose change an earlier write already
        carried returns at once, so replicas reporting together cost one write."""
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._addresses: dict[str, str] = {}
        self._smoke_key: str | None = None
        self._smoke_key_lock = asyncio.Lock()
        self._interrupt: BaseException | None = None

    @property
    def s(self) -> _Snapshot:
        if self.snap is None:
            raise LeaseLost(f"rollout {self.id} was not loaded")
        return self.snap

    async def run(self) -> None:
        renew = asyncio.create_task(self._renew_lease(), name=f"lease-{self.id}")
        try:
            self.snap = await self.c._db(self._load)
            self.s.plan.drivers.append(self.c.id)
            if self.s.state != RolloutState.PENDING:  # a pending rollout records it with its first state
                await self._save()
            if self.s.state == RolloutState.PENDING:
                await self._start_warming()
            if self.s.state == RolloutState.WARMING:
                await self._warm_until_ready()
            elif self.s.state == RolloutState.READY:  # resumed between the stages: re-check, then flip
                await self._check_liveness()
                deadline = (self.s.plan.warming_started_at or time.time()) + self.o.rollout_timeout_seconds
                if not await self._confirm_ready(deadline):
                    bad = next(rid for rid, p in self.s.states.items() if p.phase.bad)
                    err = self.s.states[bad].error or {}
                    raise RolloutFailed(
                        {
                            "code": err.get("code", "replica_failed"),
                            "message": f"replica {bad}: {err.get('message', '')}",
                            "replica": bad,
                        }
                    )
            if self.s.state == RolloutState.READY:
                await self._flip()
        except RolloutFailed as exc:
            await self._fail(exc.error)
        except RolloutCancelled:
            log.info("rollout %s was cancelled; cleaning up", self.id)
            metrics.ROLLOUT_SECONDS.labels(stage="total", outcome="cancelled").observe(
                time.time() - self.s.created_at.timestamp()
            )
            await self.c._db(self._release)  # first: it is over, whatever the unpins take
            await self._unpin_loaded()
        except LeaseLost as exc:
            log.warning("rollout %s: lease lost (%s); leaving it to its new owner", self.id, exc)
        except asyncio.CancelledError:
            # Shutting down: hand the rollout back now instead of making the next controller wait
            # for the lease to expire. A crash skips this; the lease expiry covers it.
            with contextlib.suppress(LorafleetError, LeaseLost, RolloutCancelled):
                await asyncio.shield(self.c._db(self._release))
            raise
        finally:
            renew.cancel()
            for task in self._workers.values():
                task.cancel()
            await asyncio.gather(renew, *self._workers.values(), return_exceptions=True)
            if self._smoke_key is not None:
                await asyncio.shield(self.c._db(self._revoke_smoke_key))

    # -- stage 0: choose targets --------------------------------------------------------------------
    async def _start_warming(self) -> None:
        views = await self._replica_views()
        try:
            plan = plan_targets(
                self.s.plan.spec,
                views,
                base_model_id=self.s.base_model_id,
                revision_id=self.s.revision_id,
                heartbeat_timeout=self.o.rollout_heartbeat_timeout_seconds,
            )
        except LorafleetError as exc:
            raise RolloutFailed({"code": exc.code, "message": exc.message}) from exc
        plan.requested_by = self.s.plan.requested_by
        plan.drivers = self.s.plan.drivers
        plan.warming_started_at = time.time()
        self.s.plan = plan
        self.s.states = {rid: ReplicaProgress(updated_at=time.time()) for rid in plan.replicas}
        await self._save(state=RolloutState.WARMING)

    # -- stage 1: warm and smoke --------------------------------------------------------------------
    async def _warm_until_ready(self) -> None:
        started = self.s.plan.warming_started_at or time.time()
        deadline = started + self.o.rollout_timeout_seconds
        while True:
            if self._interrupt is not None:
                raise self._interrupt
            await self._check_liveness()
            decision = decide(self.s.plan, self.s.states, now=time.time(), deadline=deadline)
            if decision.verdict == Verdict.FAIL:
                raise RolloutFailed(decision.error or {"code": "rollout_failed", "message": "failed"})
            if decision.verdict == Verdict.FLIP:
                if await self._confirm_ready(deadline):
                    break
                continue
            if decision.activate:
                for rid in decision.activate:
                    self.s.plan.spares.remove(rid)
                    self.s.plan.replicas.append(rid)
                    self.s.states[rid] = ReplicaProgress(updated_at=time.time())
                await self._save()
            await self._start_workers(deadline)
            pending = [t for t in self._workers.values() if not t.done()]
            if pending:
                await asyncio.wait(
                    pending,
                    timeout=min(1.0, self.o.rollout_poll_seconds),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            else:
                await asyncio.sleep(min(1.0, self.o.rollout_poll_seconds))
        self.s.stage_seconds["warming"] = round(time.time() - started, 4)
        metrics.ROLLOUT_SECONDS.labels(stage="warming", outcome="ready").observe(self.s.stage_seconds["warming"])
        await self._save(state=RolloutState.READY)

    async def _start_workers(self, deadline: float) -> None:
        """A worker for each target that is not done and has none: all of them recorded as loading
        (from here each may hold a pin) in one write, before any warm is sent."""
        fresh = [
            rid for rid in self.s.plan.replicas if not self.s.states[rid].phase.terminal and rid not in self._workers
        ]
        if not fresh:
            return
        now = time.time()
        for rid in fresh:
            progress = self.s.states[rid]
            if rid in self._addresses:
                progress.phase, progress.loaded = ReplicaPhase.LOADING, True
            else:
                progress.phase = ReplicaPhase.FAILED
                progress.error = {"code": "replica_unreachable", "message": "the replica has no address"}
            progress.updated_at = now
        await self._save()
        for rid in fresh:
            if self.s.states[rid].phase == ReplicaPhase.LOADING:
                self._start_worker(rid, deadline)

    def _start_worker(self, rid: str, deadline: float) -> None:
        task = asyncio.create_task(self._warm_one(rid, deadline), name=f"warm-{self.id}-{rid}")
        self._workers[rid] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._workers.get(rid) is t:
                del self._workers[rid]
            if not t.cancelled() and t.exception() is not None and self._interrupt is None:
                self._interrupt = t.exception()  # lease lost, cancelled, or a bug: the driver stops on it

        task.add_done_callback(done)

    async def _warm_one(self, rid: str, deadline: float) -> None:
        """Warm (and smoke) one target that :meth:`_start_workers` recorded as loading."""
        progress = self.s.states[rid]
        address = self._addresses[rid]
        try:

            def attempt() -> None:
                progress.attempts += 1

            report = await self.c.client.retrying(
                lambda: self.c.client.warm(address, self.s.revision_id, tier=self.o.rollout_warm_tier, pin=True),
                within_seconds=deadline - time.time(),
                on_attempt=attempt,
            )
            progress.load_seconds = dict(report.seconds)
            progress.already_resident = report.already_resident
            progress.incarnation = report.incarnation
            await self._keep_previous_warm(rid, address)
            if self.s.smoke is not None:
                await self._set(rid, phase=ReplicaPhase.SMOKE)
                await self._smoke(rid, address, self.s.smoke, deadline)
            await self._set(rid, phase=ReplicaPhase.READY, error=None)
        except ReplicaError as exc:
            await self._set(rid, phase=ReplicaPhase.FAILED, error=exc.body())

    async def _smoke(self, rid: str, address: str, smoke: SmokeSpec, deadline: float) -> None:
        key = await self._smoke_api_key()
        model = f"{self.s.policy_name}@{self.s.revision_id}"
        answer = await self.c.client.retrying(
            lambda: self.c.client.smoke(
                address, api_key=key, model=model, prompt=smoke.prompt, max_tokens=smoke.max_tokens
            ),
            within_seconds=deadline - time.time(),
        )
        self.s.states[rid].smoke_output = answer.text[:1000]
        if answer.revision_id is not None and answer.revision_id != self.s.revision_id:
            raise ReplicaError(
                f"the smoke generation ran on {answer.revision_id}, not {self.s.revision_id}",
                code="smoke_wrong_revision",
                status=200,
                retryable=False,
            )
        if smoke.expect is not None and smoke.expect not in answer.text:
            raise ReplicaError(
                f"the smoke answer does not contain {smoke.expect!r}: {answer.text[:200]!r}",
                code="smoke_failed",
                status=200,
                retryable=False,
            )

    async def _smoke_api_key(self) -> str:
        async with self._smoke_key_lock:  # the workers of all targets ask at once; mint one key
            if self._smoke_key is None:
                self._smoke_key = await self.c._db(self._mint_smoke_key)
            return self._smoke_key

    async def _check_liveness(self) -> None:
        """Replicas of the plan that stopped heartbeating are lost (their worker is stopped)."""
        views = {v.id: v for v in await self._replica_views()}
        changed = False
        for rid in self.s.plan.replicas:
            progress = self.s.states[rid]
            if progress.phase.bad:
                continue
            view = views.get(rid)
            if (
                view is not None
                and view.state == ReplicaState.UP
                and view.heartbeat_age_seconds <= self.o.rollout_heartbeat_timeout_seconds
            ):
                continue
            worker = self._workers.pop(rid, None)
            if worker is not None:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
            age = f"{view.heartbeat_age_seconds:.1f}s ago" if view else "never"
            progress.phase = ReplicaPhase.LOST
            progress.error = {"code": "replica_lost", "message": f"stopped heartbeating (last {age})"}
            progress.updated_at = time.time()
            changed = True
        if changed:
            await self._save()

    async def _keep_previous_warm(self, rid: str, address: str) -> None:
        """Pin the revision serving now where it is resident, so that a rollback within the
        keep-warm window loads nothing. Tier "disk" promotes nothing: it pins the revision
        wherever it is resident (on the device, where it has been serving) and only fetches its
        bundle if it is not. Best effort: a rollback would load it on demand."""
        previous = self.s.serving_revision_id
        if previous is None or previous == self.s.revision_id:
            return
        try:
            await self.c.client.warm(address, previous, tier="disk", pin=True)
        except ReplicaError as exc:
            log.info("rollout %s: could not keep %s warm on %s: %s", self.id, previous, rid, exc.message)

    async def _confirm_ready(self, deadline: float) -> bool:
        """Right before the flip, on every ready target: make sure the new revision is still
        pinned there. A target whose heartbeat still comes from the process that reported it
        loaded (same incarnation) holds the pin: nothing to ask. Any other (restarted since, or a
        replica that does not report incarnations) is asked to warm again: instant when resident,
        a reload if not, and the previous revision is pinned there again. False when a target
        failed the confirmation: decide again."""
        ready = [rid for rid in self.s.plan.replicas if self.s.states[rid].phase == ReplicaPhase.READY]
        views = {v.id: v for v in await self._replica_views()}

        async def confirm(rid: str) -> None:
            progress = self.s.states[rid]
            view = views.get(rid)
            if progress.incarnation is not None and view is not None and view.incarnation == progress.incarnation:
                return
            address = self._addresses[rid]
            try:
                report = await self.c.client.retrying(
                    lambda: self.c.client.warm(address, self.s.revision_id, tier=self.o.rollout_warm_tier, pin=True),
                    within_seconds=max(1.0, deadline - time.time()),
                )
            except ReplicaError as exc:
                await self._set(rid, phase=ReplicaPhase.FAILED, error=exc.body())
                return
            progress.incarnation = report.incarnation
            await self._keep_previous_warm(rid, address)

        await asyncio.gather(*(confirm(rid) for rid in ready))
        return all(self.s.states[rid].phase == ReplicaPhase.READY for rid in ready)

    # -- stage 2: expose ----------------------------------------------------------------------------
    async def _flip(self) -> None:
        t0 = time.time()
        event = await self.c._db(self._flip_tx)
        self.s.state = RolloutState.SERVING
        flip = time.time() - t0
        total = time.time() - self.s.created_at.timestamp()
        metrics.ROLLOUT_SECONDS.labels(stage="flip", outcome="serving").observe(flip)
        metrics.ROLLOUT_SECONDS.labels(stage="total", outcome="serving").observe(total)
        try:
            await self.c._db(self.c.bus.publish, POLICY_POINTER_CHANGED, event.model_dump(mode="json"))
        except Unavailable as exc:  # committed already; replicas re-read the pointer within their TTL
            log.warning("pointer flip of %s committed but not announced: %s", self.s.policy_name, exc.message)
        log.info("rollout %s: policy %s now serves %s", self.id, self.s.policy_name, self.s.revision_id)

    def _flip_tx(self) -> PolicyPointerChanged:
        with transaction(self.sessions) as session:
            row = self._owned_row(session)
            state = RolloutState(row.state)
            if state == RolloutState.WARMING:
                state.check_transition(RolloutState.READY)
                state = RolloutState.READY
            state.check_transition(RolloutState.SERVING)
            policy = session.scalars(
                select(models.Policy).where(models.Policy.id == row.policy_id).with_for_update()
            ).one()
            if session.get(models.AdapterRevision, row.revision_id) is None:
                raise RolloutFailed({"code": "revision_not_found", "message": f"revision {row.revision_id} is gone"})
            old = flip_pointer(policy, row.revision_id)
            stages = dict(self.s.stage_seconds)
            stages["total"] = round(time.time() - row.created_at.timestamp(), 4)
            row.state = RolloutState.SERVING.value
            row.from_revision_id = old
            row.stage_seconds = stages
            row.replica_states = dump_states(self.s.states)
            row.lease_owner = None
            row.lease_expires_at = None
            session.add(
                models.AuditLog(
                    tenant_id=row.tenant_id,
                    actor_key_id=None,
                    action="policy.pointer_flip",
                    object_type="policy",
                    object_id=policy.id,
                    data={"rollout": row.id, "from": old, "to": row.revision_id, "controller": self.c.id},
                )
            )
            return PolicyPointerChanged(
                tenant_id=row.tenant_id,
                policy_id=policy.id,
                policy=policy.name,
                revision_id=row.revision_id,
                previous_revision_id=old,
                reason="rollout",
                rollout_id=row.id,
            )

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.c.sessions

    # -- failure ------------------------------------------------------------------------------------
    async def _fail(self, error: dict[str, Any]) -> None:
        log.warning("rollout %s failed: %s", self.id, error.get("message"))
        started = self.s.plan.warming_started_at
        if started is not None and "warming" not in self.s.stage_seconds:
            self.s.stage_seconds["warming"] = round(time.time() - started, 4)
            metrics.ROLLOUT_SECONDS.labels(stage="warming", outcome="failed").observe(self.s.stage_seconds["warming"])
        total = time.time() - self.s.created_at.timestamp()
        self.s.stage_seconds["total"] = round(total, 4)
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        try:
            await self._save(state=RolloutState.FAILED, error=error, release=True)
        except RolloutCancelled:
            pass  # cancelled meanwhile: that is its end state, the unpin below still applies
        except LeaseLost as exc:  # another controller owns it now and decides its fate
            log.warning("rollout %s: lease lost while recording its failure (%s)", self.id, exc)
            return
        metrics.ROLLOUT_SECONDS.labels(stage="total", outcome="failed").observe(total)
        await self._unpin_loaded()

    async def _unpin_loaded(self) -> None:
        """Best effort, all targets at once: the pin reconciliation repairs what this cannot reach now
        (a lost replica is not even tried; if it comes back, its heartbeat shows the pin)."""

        async def unpin(rid: str, address: str) -> None:
            try:
                await self.c.client.unpin(address, self.s.revision_id)
            except ReplicaError as exc:
                log.info("rollout %s: unpin on %s deferred to reconciliation: %s", self.id, rid, exc.message)

        await asyncio.gather(
            *(
                unpin(rid, address)
                for rid, p in self.s.states.items()
                if p.loaded and p.phase != ReplicaPhase.LOST and (address := self._addresses.get(rid))
            )
        )

    # -- lease --------------------------------------------------------------------------------------
    async def _renew_lease(self) -> None:
        every = max(0.05, self.o.rollout_lease_seconds / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await self.c._db(self._extend)
            except (LeaseLost, RolloutCancelled) as exc:
                self._interrupt = exc
                for task in self._workers.values():
                    task.cancel()
                return

    def _extend(self) -> None:
        with transaction(self.sessions) as session:
            row = self._owned_row(session)
            row.lease_expires_at = now_utc() + timedelta(seconds=self.o.rollout_lease_seconds)

    def _release(self) -> None:
        with transaction(self.sessions) as session:
            session.execute(
                update(models.Rollout)
                .where(models.Rollout.id == self.id, models.Rollout.lease_owner == self.c.id)
                .values(lease_owner=None, lease_expires_at=None)
            )

    def _owned_row(self, session: Session) -> models.Rollout:
        """The rollout row, locked, if this controller still holds it; else LeaseLost / RolloutCancelled."""
        row = session.scalars(select(models.Rollout).where(models.Rollout.id == self.id).with_for_update()).first()
        if row is None:
            raise LeaseLost("the rollout row is gone")
        if row.lease_owner != self.c.id:
            raise LeaseLost(f"now held by {row.lease_owner}")
        if row.state == RolloutState.CANCELLED:
            raise RolloutCancelled()
        if row.state not in ACTIVE_STATES:
            raise LeaseLost(f"it is {row.state} already")
        return row

    # -- persistence --------------------------------------------------------------------------------
    async def _set(self, rid: str, **changes: Any) -> None:
        progress = self.s.states[rid]
        for name, value in changes.items():
            setattr(progress, name, value)
        progress.updated_at = time.time()
        await self._save()

    async def _save(
        self, *, state: RolloutState | None = None, error: dict[str, Any] | None = None, release: bool = False
    ) -> None:
        self._changes += 1
        change = self._changes
        async with self._write_lock:
            if state is None and error is None and not release and self._written >= change:
                return  # a write that started after this change recorded it already (group commit)
            upto = self._changes
            plan = self.s.plan.model_dump(mode="json")
            states = dump_states(self.s.states)
            stages = dict(self.s.stage_seconds)
            await self.c._db(self._write, plan, states, stages, state, error, release)
            self._written = upto
            if state is not None:
                self.s.state = state

    def _write(
        self,
        plan: dict[str, Any],
        states: dict[str, Any],
        stages: dict[str, Any],
        state: RolloutState | None,
        error: dict[str, Any] | None,
        release: bool,
    ) -> None:
        """One conditional UPDATE, fenced on the lease and on a state the change may start from;
        only when it matches nothing is the row read, to say why (lease lost, cancelled, or a
        transition the table forbids)."""
        values: dict[str, Any] = {
            "targets": plan,
            "replica_states": states,
            "stage_seconds": stages,
            "lease_expires_at": None if release else now_utc() + timedelta(seconds=self.o.rollout_lease_seconds),
        }
        if release:
            values["lease_owner"] = None
        if error is not None:
            values["error"] = error
        starts = ACTIVE_STATES
        if state is not None:
            values["state"] = state.value
            starts = _STARTS[state]
        with transaction(self.sessions) as session:
            result = session.execute(
                update(models.Rollout)
                .where(
                    models.Rollout.id == self.id,
                    models.Rollout.lease_owner == self.c.id,
                    models.Rollout.state.in_(starts),
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                return
            row = self._owned_row(session)  # raises LeaseLost / RolloutCancelled
            if state is not None:
                RolloutState(row.state).check_transition(state)  # raises InvalidTransition
            raise LeaseLost(f"the rollout row did not match ({row.state})")

    def _load(self) -> _Snapshot:
        with self.sessions() as session:
            row = session.get(models.Rollout, self.id)
            if row is None or row.lease_owner != self.c.id:
                raise LeaseLost("not ours")
            policy = session.get(models.Policy, row.policy_id)
            if policy is None:  # deleted meanwhile (its rollouts go with it, by cascade)
                raise LeaseLost(f"policy {row.policy_id} is gone")
            return _Snapshot(
                id=row.id,
                tenant_id=row.tenant_id,
                policy_id=row.policy_id,
                policy_name=policy.name,
                base_model_id=policy.base_model_id,
                revision_id=row.revision_id,
                serving_revision_id=policy.serving_revision_id,
                state=RolloutState(row.state),
                plan=parse_plan(row.targets),
                states=parse_states(row.replica_states),
                smoke=SmokeSpec.model_validate(row.smoke) if row.smoke else None,
                created_at=row.created_at,
                stage_seconds=dict(row.stage_seconds or {}),
            )

    async def _replica_views(self) -> list[ReplicaView]:
        views = await self.c.replica_views()
        self._addresses.update({v.id: v.address for v in views if v.address})
        return views

    def _mint_smoke_key(self) -> str:
        with transaction(self.sessions) as session:
            _, secret = create_api_key(
                session, tenant_id=self.s.tenant_id, scopes=[Scope.INFER], name=f"{SMOKE_KEY_PREFIX}{self.id}"
            )
            return secret

    def _revoke_smoke_key(self) -> None:
        with transaction(self.sessions) as session:
            for key in session.scalars(
                select(models.ApiKey).where(
                    models.ApiKey.name == f"{SMOKE_KEY_PREFIX}{self.id}", models.ApiKey.revoked_at.is_(None)
                )
            ):
                key.revoked_at = now_utc()
