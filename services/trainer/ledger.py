"""The trainer's database side: job lifecycle, events, progress, checkpoints and the revision commit.

Every state change goes through :class:`JobLedger`, which checks the transition table and
writes the matching job event in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform.db import models, transaction
from lorafleet.platform.db.policies import add_revision, get_or_create_policy
from lorafleet.platform.domain.enums import JobStatus
from lorafleet.platform.domain.errors import Conflict
from lorafleet.platform.domain.ids import new_id, new_ulid
from lorafleet.platform.rollouts.requests import request_rollout


@dataclass(frozen=True)
class JobSnapshot:
    """What a trainer needs of a job row, read once when it starts the job."""

    id: str
    tenant_id: str
    base_model_id: str
    method: str
    hyperparameters: dict[str, Any]
    lora: dict[str, Any]
    policy_name: str
    training_file_id: str
    validation_file_id: str | None
    seed: int
    attempts: int
    auto_rollout: bool
    policy_id: str
    revision_id: str
    """Chosen once and kept across restarts, so a resumed job exports the same revision exactly once."""


class JobLedger:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def _event(self, session: Session, job: models.Job, message: str, *, type: str = "message",
               level: str = "info", data: dict[str, Any] | None = None) -> None:
        session.add(models.JobEvent(id=new_id("event"), job_id=job.id, tenant_id=job.tenant_id, level=level,
                                    type=type, message=message, data=data))

    def start(self, job_id: str, *, worker: str, resolved: dict[str, Any]) -> JobSnapshot | None:
        """queued -> running, or resume a running job whose previous trainer died.

        Returns None when the job is finished or gone (a stale queue message)."""
        with transaction(self.sessions) as s:
            job = s.scalars(select(models.Job).where(models.Job.id == job_id).with_for_update()).first()
            if job is None or JobStatus(job.status).terminal:
                return None
            resumed = job.status == JobStatus.RUNNING
            if not resumed:
                JobStatus(job.status).check_transition(JobStatus.RUNNING)
                job.status = JobStatus.RUNNING
                job.started_at = datetime.now(UTC)
            job.attempts += 1
            job.result_revision_id = job.result_revision_id or new_ulid()
            policy = self._policy(s, job)
            if resolved:
                job.hyperparameters = resolved
            self._event(s, job, f"{'resumed' if resumed else 'started'} on trainer {worker} "
                        f"(attempt {job.attempts})", type="status",
                        data={"status": "running", "worker": worker, "hyperparameters": job.hyperparameters})
            return JobSnapshot(id=job.id, tenant_id=job.tenant_id, base_model_id=job.base_model_id, method=job.method,
                               hyperparameters=dict(job.hyperparameters), lora=dict(job.lora),
                               policy_name=job.policy_name, training_file_id=job.training_file_id,
                               validation_file_id=job.validation_file_id, seed=job.seed, attempts=job.attempts,
                               auto_rollout=job.auto_rollout, policy_id=policy.id,
                               revision_id=job.result_revision_id)

    @staticmethod
    def _policy(session: Session, job: models.Job) -> models.Policy:
        return get_or_create_policy(session, tenant_id=job.tenant_id, name=job.policy_name,
                                    base_model_id=job.base_model_id)

    def progress(self, job_id: str, *, step: int, total_steps: int, metrics: dict[str, float]) -> bool:
        """Record one step. Returns True when cancellation was requested."""
        with transaction(self.sessions) as s:
            job = s.get(models.Job, job_id)
            if job is None:
                return True
            job.progress = {"step": step, "total_steps": total_steps, **metrics}
            self._event(s, job, f"step {step}/{total_steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                        type="metrics", data={"step": step, **metrics})
            return bool(job.cancel_requested)

    def message(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with transaction(self.sessions) as s:
            job = s.get(models.Job, job_id)
            if job is not None:
                self._event(s, job, message, level=level, data=data)

    def cancel_requested(self, job_id: str) -> bool:
        with self.sessions() as s:
            return bool(s.scalar(select(models.Job.cancel_requested).where(models.Job.id == job_id)))

    def finish(self, job_id: str, status: JobStatus, *, error: dict[str, Any] | None = None) -> None:
        with transaction(self.sessions) as s:
            job = s.scalars(select(models.Job).where(models.Job.id == job_id).with_for_update()).one()
            JobStatus(job.status).check_transition(status)
            job.status = status
            job.error = error
            job.finished_at = datetime.now(UTC)
            text = f"job {status}" + (f": {error['message']}" if error else "")
            self._event(s, job, text, type="status", level="error" if error else "info",
                        data={"status": status.value, **({"error": error} if error else {})})

    def requeue(self, job_id: str, reason: str) -> None:
        """Give a running job back to the queue (its trainer is shutting down)."""
        with transaction(self.sessions) as s:
            job = s.get(models.Job, job_id)
            if job is not None and job.status == JobStatus.RUNNING:
                job.status = JobStatus.QUEUED
                self._event(s, job, f"requeued: {reason}", type="status", data={"status": "queued"})

    # checkpoints -------------------------------------------------------------------------------
    def add_checkpoint(self, job: JobSnapshot, *, step: int, object_key: str, sha256: str,
                       metrics: dict[str, Any], keep: int) -> list[str]:
        """Record a checkpoint; returns the object keys of checkpoints beyond the newest ``keep``,
        whose rows are deleted here (the caller deletes their objects after commit)."""
        with transaction(self.sessions) as s:
            s.add(models.Checkpoint(id=new_id("checkpoint"), job_id=job.id, tenant_id=job.tenant_id, step=step,
                                    object_key=object_key, sha256=sha256, metrics=metrics))
            s.flush()
            rows = list(s.scalars(select(models.Checkpoint).where(models.Checkpoint.job_id == job.id)
                                  .order_by(models.Checkpoint.step.desc())))
            stale = rows[keep:]
            for row in stale:
                s.delete(row)
            return [r.object_key for r in stale]

    def latest_checkpoint(self, job_id: str) -> models.Checkpoint | None:
        with self.sessions() as s:
            return s.scalars(select(models.Checkpoint).where(models.Checkpoint.job_id == job_id)
                             .order_by(models.Checkpoint.step.desc()).limit(1)).first()

    # the handoff -------------------------------------------------------------------------------
    def commit_revision(self, job: JobSnapshot, *, uri: str, sha256: str, size: int, manifest: dict[str, Any],
                        rank: int, step: int, handoff_seconds: float) -> models.AdapterRevision:
        """Write the AdapterRevision row and finish the job in one transaction (the revision becomes
        visible only now)."""
        with transaction(self.sessions) as s:
            row = s.scalars(select(models.Job).where(models.Job.id == job.id).with_for_update()).one()
            policy = self._policy(s, row)
            revision = add_revision(s, policy, revision_id=job.revision_id, uri=uri, sha256=sha256, size=size,
                                    rank=rank, manifest=manifest, job_id=job.id, step=step,
                                    handoff_seconds=handoff_seconds)
            JobStatus(row.status).check_transition(JobStatus.SUCCEEDED)
            row.status = JobStatus.SUCCEEDED
            row.finished_at = datetime.now(UTC)
            self._event(s, row, f"exported revision {revision.id} of policy {policy.name} "
                        f"(handoff {handoff_seconds:.3f}s)", type="status",
                        data={"status": "succeeded", "revision": revision.id, "handoff_seconds": handoff_seconds})
            if job.auto_rollout:
                self._auto_rollout(s, row, policy_id=policy.id, revision_id=revision.id)
            return revision

    def _auto_rollout(self, session: Session, job: models.Job, *, policy_id: str, revision_id: str) -> None:
        """Ask for a rollout of the new revision; a rollout already in progress is recorded, not queued."""
        try:
            with session.begin_nested():
                rollout = request_rollout(session, job.tenant_id, policy_id, revision_id,
                                          requested_by=f"job:{job.id}")
        except Conflict as exc:
            self._event(session, job, f"auto rollout not started: {exc.message}", level="warning",
                        data={"code": exc.code})
            return
        if rollout is not None:
            self._event(session, job, f"auto rollout {rollout.id} requested", data={"rollout": rollout.id})
