"""The built-in ops page (``/ui``) and the JSON it reads (``/v1/ops/summary``).

The page is for the embedded mode, where no Grafana exists. ``/ui`` itself is a static shell
with no data in it, so it needs no key; it asks for one (kept in the tab's ``sessionStorage``,
never in the URL, where it would end up in access logs and history) and reads
``/v1/ops/summary`` with ``Authorization: Bearer``, which needs the ``read`` scope.

What a key sees: its own tenant's jobs, policies and rollouts. Replicas and the adapters
resident on them are platform-wide (revision ids of every tenant), so only the platform admin
(an admin key of tenant ``default``) gets them in detail; other keys get counts by role and state.
The latency charts are aggregates over every policy and name none.

Everything the page needs is inlined into one response under a per-response CSP nonce:
no CDN, no external font, no request anywhere but this origin.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from lorafleet.platform.auth import Principal
from lorafleet.platform.auth.keys import DEFAULT_TENANT
from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.domain.enums import JobStatus, Scope
from lorafleet.platform.metrics.history import (
    HistorySnapshot,
    MetricsHistory,
    PrometheusHistory,
    acquire_process_history,
    release_process_history,
)
from lorafleet.services.api.deps import ReadPrincipal, StateDep
from lorafleet.services.api.routes.common import unix

log = logging.getLogger(__name__)

MAX_JOBS = 50
MAX_POLICIES = 200
STALE_AFTER_SECONDS = 30.0
"""A replica whose last heartbeat is older than this shows as stale (beats come every 5 s)."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    settings = app.state.api.settings
    # Settings has no prometheus_url field yet; the environment variable is the stop-gap
    prometheus_url = getattr(settings, "prometheus_url", None) or os.environ.get("LORAFLEET_PROMETHEUS_URL")
    if prometheus_url:
        app.state.ops_history = PrometheusHistory(prometheus_url)
        yield {}
        return
    interval = float(getattr(settings, "metrics_history_interval_seconds", 15.0))
    app.state.ops_history = acquire_process_history(interval_seconds=interval)
    try:
        yield {}
    finally:
        release_process_history()


router = APIRouter(tags=["ops"], lifespan=_lifespan)


# -- the JSON ------------------------------------------------------------------------------------
class OpsJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    policy: str
    model: str
    method: str
    status: JobStatus
    step: int | None
    total_steps: int | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: str | None


class OpsRollout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    state: str
    revision: str
    from_revision: str | None
    updated_at: int
    error: str | None


class OpsPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    base_model: str
    serving_revision: str | None
    previous_revision: str | None
    rollout: OpsRollout | None
    """The policy's newest rollout, whatever its state."""


class OpsResident(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision_id: str
    bytes: int
    pinned: bool


class OpsReplica(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    role: str
    base_model: str | None
    state: str
    heartbeat_age_seconds: float
    stale: bool
    resident: dict[str, list[OpsResident]]
    """Tier (device, host, disk) to the revisions there, as of the last heartbeat."""


class OpsReplicaCount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    state: str
    count: int


class OpsSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["ops.summary"] = "ops.summary"
    tenant: str
    platform_admin: bool
    generated_at: int
    jobs: list[OpsJob]
    """The tenant's newest jobs, newest first."""
    job_counts: dict[str, int]
    policies: list[OpsPolicy]
    replicas: list[OpsReplica] | None
    """Only for the platform admin; None for everyone else."""
    replica_counts: list[OpsReplicaCount]
    history: HistorySnapshot


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _job(row: models.Job) -> OpsJob:
    progress = row.progress or {}
    error = row.error.get("message") if isinstance(row.error, dict) else None
    return OpsJob(id=row.id, policy=row.policy_name, model=row.base_model_id, method=row.method,
                  status=JobStatus(row.status), step=_int_or_none(progress.get("step")),
                  total_steps=_int_or_none(progress.get("total_steps")), created_at=unix(row.created_at) or 0,
                  started_at=unix(row.started_at), finished_at=unix(row.finished_at),
                  error=str(error) if error is not None else None)


def _resident(report: object) -> dict[str, list[OpsResident]]:
    """Tolerant reader of ``replicas.resident`` (written by serving agents of any version)."""
    tiers = report.get("tiers") if isinstance(report, dict) else None
    out: dict[str, list[OpsResident]] = {}
    if not isinstance(tiers, dict):
        return out
    for tier, entries in tiers.items():
        if not isinstance(entries, list):
            continue
        out[str(tier)] = [
            OpsResident(revision_id=str(e["revision_id"]), bytes=_int_or_none(e.get("bytes")) or 0,
                        pinned=bool(e.get("pinned", False)))
            for e in entries if isinstance(e, dict) and "revision_id" in e
        ]
    return out


def _is_platform_admin(principal: Principal) -> bool:
    return principal.tenant_name == DEFAULT_TENANT and Scope.ADMIN in principal.scopes


def _history(request: Request) -> HistorySnapshot:
    history: MetricsHistory | None = getattr(request.app.state, "ops_history", None)
    if history is None:  # the app was used without running its lifespan
        return HistorySnapshot(source="process", window_seconds=0, step_seconds=0, series=[],
                               error="the metrics history is not running in this process")
    return history.snapshot()


@router.get("/v1/ops/summary")
def ops_summary(request: Request, state: StateDep, principal: ReadPrincipal) -> OpsSummary:
    """What the ops page shows, in one read."""
    now = datetime.now(UTC)
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        jobs = [_job(r) for r in session.scalars(scope.select(models.Job).order_by(models.Job.id.desc())
                                                 .limit(MAX_JOBS))]
        counts = dict(session.execute(
            select(models.Job.status, func.count()).where(models.Job.tenant_id == principal.tenant_id)
            .group_by(models.Job.status)).all())
        policy_rows = list(session.scalars(scope.select(models.Policy).order_by(models.Policy.name)
                                           .limit(MAX_POLICIES)))
        latest: dict[str, models.Rollout] = {}
        if policy_rows:
            rollouts = session.scalars(
                scope.select(models.Rollout).where(models.Rollout.policy_id.in_([p.id for p in policy_rows]))
                .order_by(models.Rollout.created_at.desc(), models.Rollout.id.desc()))
            for ro in rollouts:
                latest.setdefault(ro.policy_id, ro)
        policies = [
            OpsPolicy(name=p.name, base_model=p.base_model_id, serving_revision=p.serving_revision_id,
                      previous_revision=p.previous_revision_id,
                      rollout=_rollout(latest[p.id]) if p.id in latest else None)
            for p in policy_rows
        ]
        replica_rows = list(session.scalars(select(models.Replica)
                                            .order_by(models.Replica.role, models.Replica.id)))
        replicas = [
            OpsReplica(id=r.id, role=r.role, base_model=r.base_model_id, state=r.state,
                       heartbeat_age_seconds=max(0.0, (now - r.heartbeat_at).total_seconds()),
                       stale=(now - r.heartbeat_at).total_seconds() > STALE_AFTER_SECONDS,
                       resident=_resident(r.resident))
            for r in replica_rows
        ]
    tally: dict[tuple[str, str], int] = {}
    for rep in replicas:
        key = (rep.role, "stale" if rep.stale and rep.state == "up" else rep.state)
        tally[key] = tally.get(key, 0) + 1
    admin = _is_platform_admin(principal)
    return OpsSummary(
        tenant=principal.tenant_name, platform_admin=admin, generated_at=int(now.timestamp()), jobs=jobs,
        job_counts={s.value: int(counts.get(s.value, 0)) for s in JobStatus}, policies=policies,
        replicas=replicas if admin else None,
        replica_counts=[OpsReplicaCount(role=k[0], state=k[1], count=v) for k, v in sorted(tally.items())],
        history=_history(request),
    )


def _rollout(row: models.Rollout) -> OpsRollout:
    error = row.error.get("message") if isinstance(row.error, dict) else None
    return OpsRollout(id=row.id, state=row.state, revision=row.revision_id,
                      from_revision=row.from_revision_id, updated_at=unix(row.updated_at) or 0,
                      error=str(error) if error is not None else None)


# -- the page ------------------------------------------------------------------------------------
@cache
def _assets() -> tuple[str, str, str]:
    root = resources.files("lorafleet.services.api") / "ui"
    return tuple((root / name).read_text(encoding="utf-8")  # type: ignore[return-value]
                 for name in ("index.html", "ops.css", "ops.js"))


@router.get("/ui", include_in_schema=False)
def ops_page() -> HTMLResponse:
    html, css, js = _assets()
    nonce = secrets.token_urlsafe(16)
    body = html.replace("__CSS__", css).replace("__JS__", js).replace("__NONCE__", nonce)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(body, headers={
        "Content-Security-Policy": csp, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    })


__all__ = ["OpsSummary", "router"]
