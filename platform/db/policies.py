"""Policies and their revisions: the two writes every path that creates a revision shares
(a trainer's export, a PEFT import)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafleet.platform.db import models
from lorafleet.platform.domain.errors import Conflict
from lorafleet.platform.domain.ids import new_id


def get_or_create_policy(session: Session, *, tenant_id: str, name: str, base_model_id: str,
                         new_policy_id: str | None = None) -> models.Policy:
    """The tenant's policy of that name, locked for update, created (with no serving revision and
    id ``new_policy_id`` when given) when new."""
    policy = session.scalars(select(models.Policy).where(models.Policy.tenant_id == tenant_id,
                                                         models.Policy.name == name).with_for_update()).first()
    if policy is None:
        policy = models.Policy(
            id=new_policy_id or new_id("policy"), tenant_id=tenant_id, name=name, base_model_id=base_model_id
        )
        session.add(policy)
        session.flush()
    elif policy.base_model_id != base_model_id:
        raise Conflict(f"policy {name!r} is over base {policy.base_model_id}, not {base_model_id}",
                       code="policy_base_mismatch", param="policy")
    return policy


def add_revision(session: Session, policy: models.Policy, *, revision_id: str, uri: str, sha256: str, size: int,
                 rank: int, manifest: dict[str, Any], job_id: str | None = None, step: int | None = None,
                 handoff_seconds: float | None = None) -> models.AdapterRevision:
    """Commit-by-metadata: call only after every object of the revision is stored and verified.
    A policy's first revision becomes its serving revision at once (there is no traffic to
    protect); later ones move by rollout."""
    if session.get(models.AdapterRevision, revision_id) is not None:
        raise Conflict(f"revision {revision_id} is already committed", code="revision_exists")
    revision = models.AdapterRevision(
        id=revision_id, tenant_id=policy.tenant_id, policy_id=policy.id, base_model_id=policy.base_model_id,
        job_id=job_id, step=step, uri=uri, sha256=sha256, bytes=size, rank=rank, manifest=manifest,
        handoff_seconds=handoff_seconds)
    session.add(revision)
    if policy.serving_revision_id is None:
        policy.serving_revision_id = revision.id
    return revision
