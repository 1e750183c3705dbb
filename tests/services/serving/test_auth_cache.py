"""The replica's key cache: a verified key skips the database for its TTL, a revoked one stops
working once that has passed, failures are never cached, and scopes still apply."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.platform.auth import create_api_key, ensure_default_tenant
from lorafleet.platform.auth.keys import revoke
from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.enums import Scope
from lorafleet.platform.domain.errors import Forbidden, Unauthorized
from lorafleet.services.serving.api.auth import KeyCache, require_scope
from tests.services.serving._http_support import fresh_database

pytestmark = pytest.mark.integration


@pytest.fixture
def sessions() -> Iterator[sessionmaker[Session]]:
    with fresh_database() as url:
        engine = make_engine(url)
        factory = make_sessionmaker(engine)
        with transaction(factory) as s:
            ensure_default_tenant(s)
        yield factory
        engine.dispose()


def new_key(sessions: sessionmaker[Session], scopes: list[Scope]) -> tuple[str, str]:
    with transaction(sessions) as s:
        tenant, _ = ensure_default_tenant(s)
        row, secret = create_api_key(s, tenant_id=tenant.id, scopes=scopes)
        return row.id, secret


def set_revoked(sessions: sessionmaker[Session], key_id: str, revoked: bool) -> None:
    with transaction(sessions) as s:
        row = s.get(models.ApiKey, key_id)
        assert row is not None
        if revoked:
            revoke(s, row)
        else:
            row.revoked_at = None


def test_revocation_applies_once_the_ttl_has_passed(sessions: sessionmaker[Session]) -> None:
    clock = [0.0]
    keys = KeyCache(sessions, ttl_seconds=5.0, timer=lambda: clock[0])
    key_id, secret = new_key(sessions, [Scope.INFER])
    principal = keys.principal(f"Bearer {secret}")
    assert principal.key_id == key_id and Scope.INFER in principal.scopes

    set_revoked(sessions, key_id, True)
    clock[0] = 4.9
    assert keys.principal(f"Bearer {secret}") == principal  # trusted from the cache, no database
    clock[0] = 5.1
    with pytest.raises(Unauthorized) as refused:
        keys.principal(f"Bearer {secret}")
    assert refused.value.code == "invalid_api_key"


def test_failures_are_not_cached(sessions: sessionmaker[Session]) -> None:
    keys = KeyCache(sessions, ttl_seconds=60.0)
    key_id, secret = new_key(sessions, [Scope.INFER])
    set_revoked(sessions, key_id, True)
    with pytest.raises(Unauthorized):
        keys.principal(f"Bearer {secret}")
    set_revoked(sessions, key_id, False)  # a refusal must not linger for the TTL
    assert keys.principal(f"Bearer {secret}").key_id == key_id
    with pytest.raises(Unauthorized) as missing:
        keys.principal(None)
    assert missing.value.code == "missing_api_key"
    with pytest.raises(Unauthorized):
        keys.principal("Bearer lf_not_a_key")


def test_ttl_zero_asks_the_database_every_time(sessions: sessionmaker[Session]) -> None:
    keys = KeyCache(sessions, ttl_seconds=0)
    key_id, secret = new_key(sessions, [Scope.INFER])
    assert keys.principal(f"Bearer {secret}").key_id == key_id
    set_revoked(sessions, key_id, True)
    with pytest.raises(Unauthorized):
        keys.principal(f"Bearer {secret}")


def test_scopes_are_checked_on_cached_principals(sessions: sessionmaker[Session]) -> None:
    keys = KeyCache(sessions, ttl_seconds=60.0)
    _, read_only = new_key(sessions, [Scope.READ])
    _, infer = new_key(sessions, [Scope.INFER])
    needs_infer = require_scope(keys, Scope.INFER)
    assert needs_infer(f"Bearer {infer}").scopes == frozenset({Scope.INFER})
    assert needs_infer(f"Bearer {infer}").scopes == frozenset({Scope.INFER})  # the cached one
    keys.principal(f"Bearer {read_only}")  # cached, but still without the scope
    with pytest.raises(Forbidden):
        needs_infer(f"Bearer {read_only}")
