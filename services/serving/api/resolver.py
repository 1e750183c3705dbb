"""Which base and adapter revision a request's ``model`` names, for the caller's tenant.

``model`` is one of:

- a base model id (``tiny-moe``): the plain base, no adapter;
- a policy name of the caller's tenant: the revision its serving pointer names now;
- ``policy@revision``: that revision of the caller's policy (pinned, for smoke checks and A/B).

Another tenant's policy, an unknown name and a revision of another policy all answer the same
404 ``model_not_found``: a caller cannot learn what other tenants named their policies.

Caching: revision rows never change, so revision → handle is kept in a bounded LRU (shared
with the replica's warm endpoint, so a revision warmed for a rollout is known before its flip).
A policy's serving pointer does change (rollout, rollback), so policy → revision is kept only
``ttl_seconds``; :meth:`Resolver.invalidate` drops it at once. A flip's announcement calls
:meth:`Resolver.apply_flip`, which points the cache at the new revision without the database when
that is safe (the revision is known to belong to that tenant's policy, and the cached pointer, if
any, names the flip's previous revision), then :meth:`Resolver.refresh` reads the pointer from
the database and wins: the announcement only lets the first request after a flip skip the read
(it would otherwise race the refresh to the database), it never decides the pointer for longer
than that read takes. A read that began before a change to its pointer is not cached (it may
have seen the old value). Misses are not cached: a policy created a moment ago is visible on its
first request.
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
class KnownRevision:
    """A committed revision row, as the replica caches it (rows never change)."""

    handle: AdapterHandle
    policy_id: str
    base_model_id: str


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
        self._revisions: OrderedDict[str, KnownRevision] = OrderedDict()
        self._bases: frozenset[str] = frozenset()
        self._bases_expire = float("-inf")
        self._epoch = 0
        """Bumped by every change to the pointer cache other than a read's own store: a read
        that began before a change does not store what it read (it may predate the flip)."""

    # -- the hook for pointer-flip events ------------------------------------------------------------
    def invalidate(self, tenant_id: str, policy: str | None = None) -> None:
        """Forget the cached serving pointer of ``policy`` (or of every policy of the tenant)."""
        with self._lock:
            self._epoch += 1
            for key in [k for k in self._pointers if k[0] == tenant_id and (policy is None or k[1] == policy)]:
                del self._pointers[key]

    def apply_flip(
        self, tenant_id: str, policy: str, *, policy_id: str, revision_id: str, previous_revision_id: str | None
    ) -> bool:
        """Point the cached pointer of ``policy`` at ``revision_id`` as a flip's announcement says,
        without the database, when that is safe: the revision is cached as one of this tenant's
        ``policy_id`` (this replica warmed or served it), and the pointer is not cached or names the
        flip's ``previous_revision_id`` (an announcement that arrives out of order does not match
        and changes nothing). Returns whether it applied; :meth:`refresh` should follow either way."""
        with self._lock:
            entry = self._revisions.get(revision_id)
            if entry is None or entry.handle.tenant_id != tenant_id or entry.policy_id != policy_id:
                return False
            cached = self._pointers.get((tenant_id, policy))
            if cached is not None and (cached.policy_id != policy_id or cached.revision_id != previous_revision_id):
                return False
            self._epoch += 1
            self._revisions.move_to_end(revision_id)
            self._pointers[(tenant_id, policy)] = _Pointer(
                self._clock() + self._ttl, policy_id, entry.base_model_id, revision_id
            )
            return True

    def refresh(self, tenant_id: str, policy: str, *, keep_cached: bool = False) -> None:
        """Read the pointer of ``policy`` from the database now, with its revision, so that the
        next request after a flip finds both cached instead of paying the reads (the hook for
        pointer-flip events, on their delivery thread; blocking). The cached pointer is dropped
        first unless ``keep_cached`` (it was just set by :meth:`apply_flip`: requests keep using it
        while the read runs, and the read replaces it)."""
        if not keep_cached:
            self.invalidate(tenant_id, policy)
        pointer = self._pointer(tenant_id, policy, read=True)
        if pointer is not None and pointer.revision_id is not None:
            self._revision(tenant_id, pointer.revision_id, policy_id=pointer.policy_id, policy=policy)

    def invalidate_all(self) -> None:
        with self._lock:
            self._epoch += 1
            self._pointers.clear()
            self._bases_expire = float("-inf")

    def revision(self, revision_id: str) -> KnownRevision | None:
        """The revision row (cached; None when there is none), for the replica's warm endpoint:
        caching it here is what lets :meth:`apply_flip` serve its flip without the database."""
        with self._lock:
            entry = self._revisions.get(revision_id)
            if entry is not None:
                self._revisions.move_to_end(revision_id)
                return entry
        return self._read_revision(revision_id, policy=None)

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

    def _pointer(self, tenant_id: str, name: str, *, read: bool = False) -> _Pointer | None:
        """The cached pointer while fresh, else (or when ``read``) the one in the database."""
        now = self._clock()
        key = (tenant_id, name)
        with self._lock:
            cached = self._pointers.get(key)
            if not read and cached is not None and cached.expires > now:
                return cached
            epoch = self._epoch
        with self._sessions() as session:
            row = session.scalars(
                TenantScope(session, tenant_id).select(models.Policy).where(models.Policy.name == name)
            ).first()
            if row is None:
                return None
            pointer = _Pointer(now + self._ttl, row.id, row.base_model_id, row.serving_revision_id)
        with self._lock:
            if self._epoch == epoch:
                self._pointers[key] = pointer
        return pointer

    def _revision(self, tenant_id: str, revision_id: str, *, policy_id: str, policy: str) -> AdapterHandle | None:
        """The revision as a handle, if it is one of this tenant's ``policy_id``; else None."""
        with self._lock:
            entry = self._revisions.get(revision_id)
            if entry is not None:
                self._revisions.move_to_end(revision_id)
        if entry is None:
            entry = self._read_revision(revision_id, policy=policy)
        if entry is None or entry.handle.tenant_id != tenant_id or entry.policy_id != policy_id:
            return None
        return entry.handle

    def _read_revision(self, revision_id: str, *, policy: str | None) -> KnownRevision | None:
        """Read and cache the row; ``policy``: its policy's name when the caller knows it."""
        with self._sessions() as session:
            row = session.get(models.AdapterRevision, revision_id)
            if row is None:
                return None
            if policy is None:
                policy = session.scalar(select(models.Policy.name).where(models.Policy.id == row.policy_id))
            entry = KnownRevision(
                AdapterHandle(
                    revision_id=row.id,
                    ref=RevisionRef(revision_id=row.id, uri=row.uri, manifest_sha256=row.sha256),
                    policy=policy,
                    tenant_id=row.tenant_id,
                ),
                policy_id=row.policy_id,
                base_model_id=row.base_model_id,
            )
        with self._lock:
            self._revisions[revision_id] = entry
            while len(self._revisions) > self._max_revisions:
                self._revisions.popitem(last=False)
        return entry
