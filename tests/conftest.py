"""Test harness: real PostgreSQL, Redis and S3 (SeaweedFS) on 127.0.0.1.

PostgreSQL and Redis are started by ``make test`` (scripts/services.sh) when they are not
running; each test session gets its own PostgreSQL database and Redis key prefix. The S3
server is started by the fixture in ``tests/harness_s3.py`` in a fresh directory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.harness_s3"]

PG_ADMIN_URL = os.environ.get("LORAFLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LORAFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session (dropped afterwards)."""
    import psycopg

    name = f"lorafleet_test_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN_URL
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # a missing service is a failure, never a skip
        pytest.fail(f"PostgreSQL is not reachable at {admin}: run scripts/services.sh ({exc})")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_fresh_url(pg_url: str) -> Iterator[str]:
    """A fresh database per test, for tests that migrate up and down."""
    import psycopg

    name = f"lorafleet_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix private to one test; its keys are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: run scripts/services.sh ({exc})")
    prefix = f"lftest-{uuid.uuid4().hex[:10]}"
    yield prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_MODEL_DIR = Path(os.environ.get("LORAFLEET_TEST_MODEL_DIR", REPO_ROOT / ".lorafleet" / "test-models"))


@pytest.fixture(scope="session")
def tiny_moe_path() -> Path:
    """The built-in tiny-moe base, built once (about two minutes) and cached across sessions.
    ``LORAFLEET_TEST_TINY_MOE`` may name an already built directory instead."""
    from filelock import FileLock

    if os.environ.get("LORAFLEET_TEST_TINY_MOE"):
        return Path(os.environ["LORAFLEET_TEST_TINY_MOE"])

    from lorafleet.platform.modeling.tiny_moe import build_tiny_moe

    TEST_MODEL_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(str(TEST_MODEL_DIR / ".build.lock")):
        return build_tiny_moe(TEST_MODEL_DIR)
