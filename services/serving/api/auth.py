"""Who is calling the serving replica: the same hashed, scoped API keys as the control plane.

The serving replica authenticates against the database itself (it does not call the control
plane), so it keeps answering while the control plane restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Header
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform.auth import Principal, authenticate
from lorafleet.platform.auth.keys import DEFAULT_TENANT
from lorafleet.platform.domain.enums import Scope
from lorafleet.platform.domain.errors import Forbidden


def require_scope(sessions: sessionmaker[Session], scope: Scope) -> Callable[..., Principal]:
    """A FastAPI dependency: the caller's principal, which must hold ``scope``.

    Synchronous on purpose: FastAPI runs it in a worker thread, off the event loop that
    drives generation.
    """

    def dependency(authorization: Annotated[str | None, Header()] = None) -> Principal:
        with sessions() as session:
            principal = authenticate(session, authorization)
        principal.require(scope)
        return principal

    return dependency


def require_platform_admin(sessions: sessionmaker[Session]) -> Callable[..., Principal]:
    """An admin key of tenant ``default``: the operator (and the rollout controller acting for it).

    Replica-internal operations (warming and evicting adapters) change capacity every tenant
    shares, so a tenant's own admin key is not enough.
    """
    admin = require_scope(sessions, Scope.ADMIN)

    def dependency(authorization: Annotated[str | None, Header()] = None) -> Principal:
        principal = admin(authorization)
        if principal.tenant_name != DEFAULT_TENANT:
            raise Forbidden(
                "replica-internal endpoints need the platform admin (an admin key of tenant 'default')",
                code="platform_admin_required",
            )
        return principal

    return dependency
