"""Which base and adapter revision a request's ``model`` names, for the caller's tenant.

``model`` is one of:

- a base model id (``tiny-moe``): the plain base, no adapter;
- a policy name of the caller's tenant: the revision its serving pointer names now;
- ``policy@revision``: that revision of the caller's policy (pinned, for smoke checks and A/B).

Another tenant's policy, an unknown name and a revision of another policy all answer the same
404 ``model_not_found``: a caller cannot learn what other tenants named their policies.

Caching: revision rows never change, so revision → handle is kept in a bounded LRU. A policy's
serving pointer does change (rollout, rollback), so policy → revision is kept only
``ttl_seconds``; :meth:`Resolver.invalidate` drops it at once, and :meth:`Resolver.refresh`
reads it again at once: the hook the rollout events (pointer flips) call, so the next request
after a flip sees the new revision without waiting on the database for it.
Misses are not cached: a policy created a moment ago is visible on its first request.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store import RevisionRef
from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.domain.errors import Conflict, NotFound
from lorafleet.services.serving.engine.base import AdapterHandle

BASE_LIST_TTL_SECONDS = 60.0


@dataclass(frozen=True)
class Target:
    """What a request runs on."""

    base_model_id: str
    adapter: AdapterHandle | None
    """None: the plain base model."""
    policy: str | None = None
    pinned: bool = False
    """Named as ``policy@revision`` (smoke checks, A/B), not through the policy's serving pointer."""

    @property
    def fingerprint(self) -> str:
        """Reported to the client as ``system_fingerprint``: the revision, or the base id."""
        return self.adapter.revision_id if self.adapter else self.base_model_id


@dataclass(frozen=True)
class _Revision:
    handle: AdapterHandle
    policy_id: str


@dataclass(frozen=True)
class _Pointer:
    expires: float
    policy_id: str
    base_model_id: str
    revision_id: str | None


def _not_found(model: str) -> NotFound:
    return NotFound(
        f"the model {model!r} does not exist or you do not have access to it",
        code="model_not_found",
        param="model",
    )


class Resolver:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        served_base_ids: frozenset[str],
        ttl_seconds: float = 1.0,
        max_revisions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._served = served_base_ids
        self._ttl = ttl_seconds
        self._max_revisions = max_revisions
        self._clock = clock
        self._lock = threading.Lock()
        self._pointers: dict[tuple[str, str], _Pointer] = {}
        self._revisions: OrderedDict[str, _Revision] = OrderedDict()
        self._bases: frozenset[str] = frozenset()
        self._bases_expire = float("-inf")

    # -- the hook for pointer-flip events ------------------------------------------------------------
    def invalidate(self, tenant_id: str, policy: str | None = None) -> None:
        """Forget the cached serving pointer of ``policy`` (or of every policy of the tenant)."""
        with self._lock:
            for key in [k for k in self._pointers if k[0] == tenant_id and (policy is None or k[1] == policy)]:
                del self._pointers[key]

    def refresh(self, tenant_id: str, policy: str) -> None:
        """Forget the cached pointer of ``policy`` and read it again now, with its revision, so that
        the next request after a flip finds both cached instead of paying the reads (the hook for
        pointer-flip events, on their delivery thread; blocking)."""
        self.invalidate(tenant_id, policy)
        pointer = self._pointer(tenant_id, policy)
        if pointer is not None and pointer.revision_id is not None:
            self._revision(tenant_id, pointer.revision_id, policy_id=pointer.policy_id, policy=policy)

    def invalidate_all(self) -> None:
        with self._lock:
            self._pointers.clear()
            self._bases_expire = float("-inf")

    # -- resolution ----------------------------------------------------------------------------------
    def resolve(self, tenant_id: str, model: str) -> Target:
        """Blocking (database on a cache miss): call it from a worker thread in async code."""
        name, _, pinned = model.partition("@")
        if pinned:
            return self._pinned(tenant_id, model, name, pinned)
        if self._is_base(name):
            return self._served_target(Target(base_model_id=name, adapter=None), model)
        pointer = self._pointer(tenant_id, name)
        if pointer is None:
            raise _not_found(model)
        if pointer.revision_id is None:
            raise Conflict(
                f"policy {name!r} has no serving revision yet: roll one out, or name a revision as '{name}@<revision>'",
                code="policy_not_serving",
                param="model",
            )
        handle = self._revision(tenant_id, pointer.revision_id, policy_id=pointer.policy_id, policy=name)
        if handle is None:  # the pointer names a row that is gone (policy deleted meanwhile)
            raise _not_found(model)
        return self._served_target(Target(pointer.base_model_id, handle, name), model)

    def _served_target(self, target: Target, model: str) -> Target:
        if target.base_model_id not in self._served:
            raise NotFound(
                f"{model!r} runs on base model {target.base_model_id}, which this replica does not "
                f"serve (it serves {', '.join(sorted(self._served))})",
                code="model_not_served",
                param="model",
            )
        return target

    def _pinned(self, tenant_id: str, model: str, name: str, revision_id: str) -> Target:
        with self._sessions() as session:
            policy = session.scalars(
                TenantScope(session, tenant_id).select(models.Policy).where(models.Policy.name == name)
            ).first()
            if policy is None:
                raise _not_found(model)
            policy_id, base_id = policy.id, policy.base_model_id
        handle = self._revision(tenant_id, revision_id, policy_id=policy_id, policy=name)
        if handle is None:
            raise _not_found(model)
        return self._served_target(Target(base_id, handle, name, pinned=True), model)

    def _is_base(self, name: str) -> bool:
        """Whether ``name`` is a registered base; the list of bases is read at most once a minute
        (bases are registered rarely, and a request naming a policy must not pay a query for it)."""
        now = self._clock()
        with self._lock:
            if now < self._bases_expire:
                return name in self._bases
        with self._sessions() as session:
            bases = frozenset(session.scalars(select(models.BaseModelRow.id)))
        with self._lock:
            self._bases, self._bases_expire = bases, now + BASE_LIST_TTL_SECONDS
        return name in bases

    def _pointer(self, tenant_id: str, name: str) -> _Pointer | None:
        now = self._clock()
        key = (tenant_id, name)
        with self._lock:
            cached = self._pointers.get(key)
            if cached is not None and cached.expires > now:
                return cached
        with self._sessions() as session:
            row = session.scalars(
                TenantScope(session, tenant_id).select(models.Policy).where(models.Policy.name == name)
            ).first()
            if row is None:
                return None
            pointer = _Pointer(now + self._ttl, row.id, row.base_model_id, row.serving_revision_id)
        with self._lock:
            self._pointers[key] = pointer
        return pointer

    def _revision(self, tenant_id: str, revision_id: str, *, policy_id: str, policy: str) -> AdapterHandle | None:
        """The revision as a handle, if it is one of this tenant's ``policy_id``; else None."""
        with self._lock:
            entry = self._revisions.get(revision_id)
            if entry is not None:
                self._revisions.move_to_end(revision_id)
        if entry is None:
            with self._sessions() as session:
                row = session.get(models.AdapterRevision, revision_id)
                if row is None:
                    return None
                entry = _Revision(
                    AdapterHandle(
                        revision_id=row.id,
                        ref=RevisionRef(revision_id=row.id, uri=row.uri, manifest_sha256=row.sha256),
                        policy=policy,
                        tenant_id=row.tenant_id,
                    ),
                    policy_id=row.policy_id,
                )
            with self._lock:
                self._revisions[revision_id] = entry
                while len(self._revisions) > self._max_revisions:
                    self._revisions.popitem(last=False)
        if entry.handle.tenant_id != tenant_id or entry.policy_id != policy_id:
            return None
        return entry.handle
