from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.domain.enums import FileStatus, JobStatus
from lorafleet.platform.domain.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from lorafleet.platform.domain.ids import new_id
from lorafleet.platform.domain.jobs import FILE_KINDS_FOR_METHOD, Method
from lorafleet.platform.domain.lora import LoraConfig
from lorafleet.services.api.deps import ReadPrincipal, StateDep, TrainPrincipal
from lorafleet.services.api.routes.common import ListPage, unix
from lorafleet.services.api.state import JOBS_QUEUE

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

POLICY_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    """A registered base model id."""
    training_file: str
    validation_file: str | None = None
    method: Method
    lora: LoraConfig = LoraConfig()
    policy: str = Field(pattern=POLICY_NAME)
    """The policy this job's adapter becomes a revision of; created when new."""
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    """A second create with the same key returns the first job instead of a new one."""
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    auto_rollout: bool = False
    """Roll the resulting revision out to serving when the job succeeds."""


class JobErrorPublic(BaseModel):
    code: str
    message: str
    param: str | None = None
    step: int | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    policy: str
    status: JobStatus
    method: dict[str, Any]
    lora: dict[str, Any]
    training_file: str
    validation_file: str | None
    seed: int
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: JobErrorPublic | None
    progress: dict[str, Any]
    cancel_requested: bool
    auto_rollout: bool
    result_revision: str | None
    metadata: dict[str, str]

    @classmethod
    def of(cls, row: models.Job) -> JobPublic:
        return cls(
            id=row.id, model=row.base_model_id, policy=row.policy_name, status=JobStatus(row.status),
            method={"type": row.method, "hyperparameters": row.hyperparameters}, lora=row.lora,
            training_file=row.training_file_id, validation_file=row.validation_file_id, seed=row.seed,
            created_at=unix(row.created_at) or 0, started_at=unix(row.started_at),
            finished_at=unix(row.finished_at), error=JobErrorPublic(**row.error) if row.error else None,
            progress=row.progress or {}, cancel_requested=row.cancel_requested, auto_rollout=row.auto_rollout,
            result_revision=row.result_revision_id, metadata=row.user_metadata or {},
        )


class JobEventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: models.JobEvent) -> JobEventPublic:
        return cls(id=row.id, created_at=unix(row.created_at) or 0, level=row.level, type=row.type,
                   message=row.message, data=row.data)


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    fine_tuning_job_id: str
    step_number: int
    created_at: int
    metrics: dict[str, Any]

    @classmethod
    def of(cls, row: models.Checkpoint) -> CheckpointPublic:
        return cls(id=row.id, fine_tuning_job_id=row.job_id, step_number=row.step,
                   created_at=unix(row.created_at) or 0, metrics=row.metrics)


def _validated_file(scope: TenantScope, file_id: str, *, param: str, method: str) -> models.FileRow:
    try:
        row = scope.get(models.FileRow, file_id, param=param)
    except NotFound as exc:
        raise NotFound(f"no file with id {file_id!r}", code="file_not_found", param=param) from exc
    if row.status != FileStatus.VALIDATED:
        raise InvalidRequest(f"file {file_id} is {row.status}, not validated", code="file_not_validated",
                             param=param)
    if row.kind not in FILE_KINDS_FOR_METHOD[method]:
        raise InvalidRequest(
            f"a {method} job needs a file of kind {' or '.join(FILE_KINDS_FOR_METHOD[method])}; "
            f"{file_id} is {row.kind}", code="file_kind_mismatch", param=param)
    return row


def _same_request(job: models.Job, body: JobCreate) -> bool:
    return (job.base_model_id, job.training_file_id, job.policy_name, job.method) == (
        body.model, body.training_file, body.policy, body.method.type)


def create_job_row(session: Session, *, tenant_id: str, body: JobCreate, max_active: int) -> tuple[models.Job, bool]:
    """Validate and insert a job. Returns (job, created); created is False for an idempotent replay."""
    scope = TenantScope(session, tenant_id)
    if body.idempotency_key:
        existing = session.scalars(
            scope.select(models.Job).where(models.Job.idempotency_key == body.idempotency_key)
        ).first()
        if existing is not None:
            if not _same_request(existing, body):
                raise Conflict("this idempotency key was used for a different job", code="idempotency_key_reused",
                               param="idempotency_key")
            return existing, False
    base = session.get(models.BaseModelRow, body.model)
    if base is None:
        raise NotFound(f"no base model {body.model!r}", code="model_not_found", param="model")
    if body.lora.rank > base.max_lora_rank:
        raise InvalidRequest(f"rank {body.lora.rank} exceeds the base model's limit {base.max_lora_rank}",
                             code="rank_exceeds_base_limit", param="lora.rank")
    method = body.method.type
    _validated_file(scope, body.training_file, param="training_file", method=method)
    if body.validation_file:
        _validated_file(scope, body.validation_file, param="validation_file", method=method)
    active = [JobStatus.QUEUED, JobStatus.RUNNING]
    tenant = session.get(models.Tenant, tenant_id)
    limit = (tenant.max_queued_jobs if tenant and tenant.max_queued_jobs else None) or max_active
    if scope.count(models.Job, models.Job.status.in_(active)) >= limit:
        raise QuotaExceeded(f"the tenant already has {limit} queued or running jobs", code="job_quota_exceeded")
    policy = session.scalars(scope.select(models.Policy).where(models.Policy.name == body.policy)).first()
    if policy is not None and policy.base_model_id != body.model:
        raise Conflict(f"policy {body.policy!r} is over base {policy.base_model_id}, not {body.model}",
                       code="policy_base_mismatch", param="policy")
    busy = session.scalars(
        scope.select(models.Job).where(models.Job.policy_name == body.policy, models.Job.status.in_(active)).limit(1)
    ).first()
    if busy is not None:
        raise Conflict(f"policy {body.policy!r} is being trained by {busy.id}; train a parallel branch "
                       "under a new policy name", code="policy_busy", param="policy")
    job = models.Job(
        id=new_id("job"), base_model_id=body.model, method=method,
        hyperparameters=body.method.model_dump(mode="json")["hyperparameters"]
        | ({"grader": body.method.model_dump(mode="json")["grader"]} if method == "reinforcement" else {}),
        lora=body.lora.model_dump(mode="json"), policy_name=body.policy, training_file_id=body.training_file,
        validation_file_id=body.validation_file, seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        status=JobStatus.QUEUED, idempotency_key=body.idempotency_key, user_metadata=body.metadata or {},
        auto_rollout=body.auto_rollout, progress={},
    )
    scope.add(job)
    session.flush()
    session.add(models.JobEvent(id=new_id("event"), job_id=job.id, tenant_id=tenant_id, type="status",
                                message="job created and queued", data={"status": "queued"}))
    return job, True


@router.post("", status_code=201)
def create_job(body: JobCreate, state: StateDep, principal: TrainPrincipal, response: Response) -> JobPublic:
    with state.tx() as session:
        job, created = create_job_row(session, tenant_id=principal.tenant_id, body=body,
                                      max_active=state.settings.max_queued_jobs_per_tenant)
        if created:
            state.audit(session, tenant_id=principal.tenant_id, actor=principal.key_id, action="job.create",
                        object_type="job", object_id=job.id)
        public = JobPublic.of(job)
    if created:
        state.queue.enqueue(JOBS_QUEUE, {"job_id": job.id}, dedupe_key=job.id)
    else:
        response.status_code = 200
    return public


@router.get("")
def list_jobs(
    state: StateDep,
    principal: ReadPrincipal,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
) -> ListPage[JobPublic]:
    """Newest first; pass the last id seen as ``after`` for the next page."""
    with state.tx() as session:
        stmt = TenantScope(session, principal.tenant_id).select(models.Job)
        if status is not None:
            stmt = stmt.where(models.Job.status == status)
        if after:
            stmt = stmt.where(models.Job.id < after)
        rows = list(session.scalars(stmt.order_by(models.Job.id.desc()).limit(limit + 1)))
    page = [JobPublic.of(r) for r in rows[:limit]]
    return ListPage(data=page, has_more=len(rows) > limit, last_id=page[-1].id if page else None)


@router.get("/{job_id}")
def get_job(job_id: str, state: StateDep, principal: ReadPrincipal) -> JobPublic:
    with state.tx() as session:
        return JobPublic.of(TenantScope(session, principal.tenant_id).get(models.Job, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, state: StateDep, principal: TrainPrincipal) -> JobPublic:
    """A queued job is cancelled at once; a running one stops within one training step and keeps
    its last checkpoint. A finished job answers 409."""
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        job = scope.get(models.Job, job_id, for_update=True)
        status = JobStatus(job.status)
        if status == JobStatus.QUEUED:
            status.check_transition(JobStatus.CANCELLED)
            job.status = JobStatus.CANCELLED
            job.finished_at = models.utcnow()
            session.add(models.JobEvent(id=new_id("event"), job_id=job.id, tenant_id=job.tenant_id, type="status",
                                        message="job cancelled", data={"status": "cancelled"}))
        elif status == JobStatus.RUNNING:
            job.cancel_requested = True
            session.add(models.JobEvent(id=new_id("event"), job_id=job.id, tenant_id=job.tenant_id,
                                        type="message", message="cancellation requested"))
        else:
            status.check_transition(JobStatus.CANCELLED)
        state.audit(session, tenant_id=principal.tenant_id, actor=principal.key_id, action="job.cancel",
                    object_type="job", object_id=job.id)
        return JobPublic.of(job)


@router.get("/{job_id}/events")
def list_events(
    job_id: str,
    state: StateDep,
    principal: ReadPrincipal,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ListPage[JobEventPublic]:
    """Oldest first, so ``after`` (the last event id seen) follows a running job."""
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        scope.get(models.Job, job_id)
        stmt = scope.select(models.JobEvent).where(models.JobEvent.job_id == job_id)
        if after:
            seq = session.scalar(select(models.JobEvent.seq).where(models.JobEvent.id == after,
                                                                   models.JobEvent.job_id == job_id))
            if seq is None:
                raise NotFound(f"no event {after!r} in job {job_id}", param="after")
            stmt = stmt.where(models.JobEvent.seq > seq)
        rows = list(session.scalars(stmt.order_by(models.JobEvent.seq).limit(limit + 1)))
    page = [JobEventPublic.of(r) for r in rows[:limit]]
    return ListPage(data=page, has_more=len(rows) > limit, last_id=page[-1].id if page else None)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, state: StateDep, principal: ReadPrincipal) -> ListPage[CheckpointPublic]:
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        scope.get(models.Job, job_id)
        rows = session.scalars(
            scope.select(models.Checkpoint).where(models.Checkpoint.job_id == job_id)
            .order_by(models.Checkpoint.step.desc())
        )
        page = [CheckpointPublic.of(r) for r in rows]
    return ListPage(data=page, last_id=page[-1].id if page else None)
