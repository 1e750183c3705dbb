"""Who is calling the serving replica: the same hashed, scoped API keys as the control plane.

The serving replica authenticates against the database itself (it does not call the control
plane), so it keeps answering while the control plane restarts. A key it verified is kept
``ttl_seconds`` (:class:`KeyCache`, ``serving_auth_cache_seconds``), so a request costs no
database round trip for its key: revoking a key takes effect on replicas within that time.
Failures are never cached (a key created a moment ago works on its first request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Annotated

from cachetools import TTLCache
from fastapi import Header
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform.auth import Principal, authenticate
from lorafleet.platform.auth.keys import DEFAULT_TENANT, hash_key
from lorafleet.platform.domain.enums import Scope
from lorafleet.platform.domain.errors import Forbidden


class KeyCache:
    """Principals of verified keys, by key hash, for ``ttl_seconds`` (0: always ask the database)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        ttl_seconds: float,
        max_keys: int = 10_000,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._cache: TTLCache[str, Principal] | None = (
            TTLCache(maxsize=max_keys, ttl=ttl_seconds, timer=timer) if ttl_seconds > 0 else None
        )

    def principal(self, authorization: str | None) -> Principal:
        """The caller's principal; ``Unauthorized`` for a missing, unknown or revoked key."""
        if self._cache is None or not authorization or not authorization.startswith("Bearer "):
            return self._verify(authorization)
        digest = hash_key(authorization.removeprefix("Bearer ").strip())
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None:
            return cached
        principal = self._verify(authorization)
        with self._lock:
            self._cache[digest] = principal
        return principal

    def _verify(self, authorization: str | None) -> Principal:
        with self.sessions() as session:
            return authenticate(session, authorization)


def require_scope(keys: KeyCache, scope: Scope) -> Callable[..., Principal]:
    """A FastAPI dependency: the caller's principal (checked through the replica's key cache),
    which must hold ``scope``.

    Synchronous on purpose: FastAPI runs it in a worker thread, off the event loop that
    drives generation.
    """

    def dependency(authorization: Annotated[str | None, Header()] = None) -> Principal:
        principal = keys.principal(authorization)
        principal.require(scope)
        return principal

    return dependency


def require_platform_admin(keys: KeyCache) -> Callable[..., Principal]:
    """An admin key of tenant ``default``: the operator (and the rollout controller acting for it).

    Replica-internal operations (warming and evicting adapters) change capacity every tenant
    shares, so a tenant's own admin key is not enough.
    """
    admin = require_scope(keys, Scope.ADMIN)

    def dependency(authorization: Annotated[str | None, Header()] = None) -> Principal:
        principal = admin(authorization)
        if principal.tenant_name != DEFAULT_TENANT:
            raise Forbidden(
                "replica-internal endpoints need the platform admin (an admin key of tenant 'default')",
                code="platform_admin_required",
            )
        return principal

    return dependency
